"""ONNX Runtime sessions for bundle variants, with a bounded cache (no torch here)."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np

# onnxruntime 1.31 on Linux records a device id for telemetry unless told not to.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort

from edgetok.models.bundle import BundleError, Manifest, load_manifest

log = logging.getLogger(__name__)

Part = Literal["head", "tail"]


class Runtime:
    """Runs heads and tails of one verified bundle; keeps at most `max_sessions` open."""

    def __init__(self, root: Path | str, *, threads: int = 0, max_sessions: int = 8,
                 preload: Iterable[str] = ()) -> None:
        self.root = Path(root)
        self.manifest: Manifest = load_manifest(self.root)
        self.threads = threads
        self.max_sessions = max(1, max_sessions)
        self._sessions: OrderedDict[tuple[str, Part], ort.InferenceSession] = OrderedDict()
        self._pinned: set[tuple[str, Part]] = set()
        for vid in preload:
            for part in ("head", "tail"):
                if self._file(vid, part) is not None:
                    self._pinned.add((vid, part))
                    self.session(vid, part)

    def _file(self, variant_id: str, part: Part) -> str | None:
        v = self.manifest.variant(variant_id)
        return v.head if part == "head" else v.tail

    def session(self, variant_id: str, part: Part) -> ort.InferenceSession:
        """The (cached) session for a variant's head or tail."""
        key = (variant_id, part)
        sess = self._sessions.get(key)
        if sess is not None:
            self._sessions.move_to_end(key)
            return sess
        name = self._file(variant_id, part)
        if name is None:
            raise BundleError(f"variant {variant_id} has no {part}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(self.root / name), sess_options=opts,
                                    providers=["CPUExecutionProvider"])
        self._sessions[key] = sess
        self._evict()
        return sess

    def _evict(self) -> None:
        while len(self._sessions) > self.max_sessions:
            victim = next((k for k in self._sessions if k not in self._pinned), None)
            if victim is None:
                return
            del self._sessions[victim]
            log.debug("evicted ONNX session %s", victim)

    def run(self, variant_id: str, part: Part, x: np.ndarray) -> np.ndarray:
        """Run one part on a batch; the part's single input and first output."""
        sess = self.session(variant_id, part)
        name = sess.get_inputs()[0].name
        out = sess.run(None, {name: x})[0]
        return np.asarray(out)

    def full(self, variant_id: str, tokens: np.ndarray) -> np.ndarray:
        """Head then tail in-process: the unsplit output of a variant."""
        v = self.manifest.variant(variant_id)
        x = self.run(variant_id, "head", tokens) if v.head else tokens
        return self.run(variant_id, "tail", x) if v.tail else x

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)
