"""ONNX Runtime sessions for bundle variants, with a bounded cache (no torch here).

Sessions come from `edgetok.models.ortcapi` (ORT's C API): all open sessions of one pruning
ratio share one mapped and one pre-packed copy of that ratio's weights file. Where the C API
is unavailable the Python API is used, each session then holding its own copy.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np

from edgetok.models.bundle import BundleError, Manifest, load_manifest
from edgetok.models.ortcapi import (
    CSession,
    Initializer,
    Session,
    Weights,
    capi,
    external_initializers,
    malloc_trim,
)

log = logging.getLogger(__name__)

Part = Literal["head", "tail"]


# While a session is built, its weights file's resident pages are dropped this often: each
# period lets ORT page in (and count in RSS) what it reads in that time, about 10 MB at
# most here; shorter periods cost more madvise calls for little gain.
DROP_PERIOD_S = 0.005


def _drop_until(done: threading.Event, weights: list[Weights]) -> None:
    while not done.wait(DROP_PERIOD_S):
        for w in weights:
            w.drop_pages()


class Runtime:
    """Runs heads and tails of one verified bundle; keeps at most `max_sessions` open.

    With `share_weights` (the default) all open sessions of a pruning ratio hold one mapped
    and one pre-packed copy of that ratio's weights; off, each session loads its own through
    the Python API.
    """

    def __init__(self, root: Path | str, *, threads: int = 0, max_sessions: int = 8,
                 preload: Iterable[str] = (), share_weights: bool = True) -> None:
        self.root = Path(root)
        self.manifest: Manifest = load_manifest(self.root)
        self.threads = threads
        self.max_sessions = max(1, max_sessions)
        # Off, the plain Python API: also the way out should the C API binding misbehave.
        self.api = capi() if share_weights else None
        self.share_weights = self.api is not None
        self._sessions: OrderedDict[tuple[str, Part], Session] = OrderedDict()
        self._pinned: set[tuple[str, Part]] = set()
        # Weak: a ratio's mapping and packed weights go with its last open session.
        self._weights: weakref.WeakValueDictionary[Path, Weights] = \
            weakref.WeakValueDictionary()
        self._lock = threading.RLock()
        for vid in preload:
            for part in ("head", "tail"):
                if self._file(vid, part) is not None:
                    self._pinned.add((vid, part))
                    self.session(vid, part)

    def _file(self, variant_id: str, part: Part) -> str | None:
        v = self.manifest.variant(variant_id)
        return v.head if part == "head" else v.tail

    def _shared(self, model: Path) -> list[tuple[Weights, Initializer]]:
        """The model's external tensors, each with the (cached) weights file it lives in."""
        out = []
        root = self.root.resolve()
        for t in external_initializers(model):
            path = (model.parent / t.location).resolve()
            if not path.is_relative_to(root):
                raise BundleError(f"{model.name}: external data {t.location} is outside "
                                  "the bundle")
            w = self._weights.get(path)
            if w is None:
                assert self.api is not None
                w = self._weights[path] = Weights(self.api, path)
            out.append((w, t))
        return out

    def _open(self, model: Path) -> Session:
        if self.api is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            return ort.InferenceSession(str(model), sess_options=opts,
                                        providers=["CPUExecutionProvider"])
        shared = self._shared(model) if self.share_weights else []
        weights = list({id(w): w for w, _ in shared}.values())
        if not weights:
            return CSession(self.api, model, self.threads)
        # ORT reads each weight once while it pre-packs; the pages it has read would stay
        # resident until the session is built, so the whole file would briefly count twice.
        # Dropping them while it works (the call releases the GIL) bounds that transient.
        done = threading.Event()
        dropper = threading.Thread(target=_drop_until, args=(done, weights), daemon=True)
        dropper.start()
        try:
            return CSession(self.api, model, self.threads, shared)
        finally:
            done.set()
            dropper.join()
            for w in weights:
                w.drop_pages()

    def session(self, variant_id: str, part: Part) -> Session:
        """The (cached) session for a variant's head or tail."""
        key = (variant_id, part)
        with self._lock:  # two threads asking for one variant must not both open it
            sess = self._sessions.get(key)
            if sess is not None:
                self._sessions.move_to_end(key)
                return sess
            name = self._file(variant_id, part)
            if name is None:
                raise BundleError(f"variant {variant_id} has no {part}")
            sess = self._sessions[key] = self._open(self.root / name)
            self._evict()
            return sess

    def _evict(self) -> None:
        evicted = 0
        while len(self._sessions) > self.max_sessions:
            victim = next((k for k in self._sessions if k not in self._pinned), None)
            if victim is None:
                break
            # Dropping the reference is enough: a run in progress on another thread keeps
            # the session alive until it returns; the finalizer then releases it.
            del self._sessions[victim]
            evicted += 1
            log.debug("evicted ONNX session %s", victim)
        if evicted:
            malloc_trim()

    def run(self, variant_id: str, part: Part, x: np.ndarray) -> np.ndarray:
        """Run one part on a batch; the part's single input and first output."""
        sess = self.session(variant_id, part)
        feed = {sess.get_inputs()[0].name: x}
        return np.asarray(sess.run([sess.get_outputs()[0].name], feed)[0])

    def full(self, variant_id: str, tokens: np.ndarray) -> np.ndarray:
        """Head then tail in-process: the unsplit output of a variant."""
        v = self.manifest.variant(variant_id)
        x = self.run(variant_id, "head", tokens) if v.head else tokens
        return self.run(variant_id, "tail", x) if v.tail else x

    @property
    def open_sessions(self) -> int:
        """Sessions currently cached."""
        return len(self._sessions)

    def is_open(self, variant_id: str, part: Part) -> bool:
        """Whether the session of a variant's part is cached now."""
        with self._lock:
            return (variant_id, part) in self._sessions

    @property
    def session_names(self) -> list[str]:
        """The cached sessions as 'variant/part', oldest use first."""
        with self._lock:
            return [f"{v}/{p}" for v, p in self._sessions]

    @property
    def weight_files(self) -> list[str]:
        """Weights files currently mapped and shared (one per pruning ratio in use)."""
        return sorted(p.name for p in list(self._weights))

    @property
    def backend(self) -> Literal["capi", "python"]:
        """Which ONNX Runtime binding opens sessions ("python" shares no weights)."""
        return "python" if self.api is None else "capi"
