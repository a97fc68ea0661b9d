"""Runtime memory: C API sessions sharing weights give ORT's own outputs; eviction frees them."""

from __future__ import annotations

import gc
import threading
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgetok.models import ortcapi, runtime
from edgetok.models.ortcapi import OrtError, external_initializers
from edgetok.models.runtime import Runtime


def _parts(rt: Runtime) -> list[tuple[str, runtime.Part, str]]:
    return [(v.id, part, f) for v in rt.manifest.variants
            for part, f in (("head", v.head), ("tail", v.tail)) if f]


def _input(rt: Runtime, vid: str, part: runtime.Part, batch: int = 3) -> np.ndarray:
    """A seeded input batch of the right shape for one part."""
    m = rt.manifest
    v = m.variant(vid)
    shape = (m.variant(f"r{v.pruning_ratio:.2f}-s0").feature_shape if part == "head"
             or v.split == 0 else v.feature_shape)
    return np.random.default_rng(v.split).standard_normal((batch, *shape)).astype(np.float32)


def _reference(path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), sess_options=opts,
                                providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])


def test_shared_weight_sessions_match_onnxruntime_bit_for_bit(tiny_bundle: Path) -> None:
    """Every head and tail, all open at once and sharing weights, equals InferenceSession."""
    rt = Runtime(tiny_bundle, threads=1, max_sessions=64)
    assert rt.backend == "capi" and rt.share_weights
    for vid, part, name in _parts(rt):
        x = _input(rt, vid, part)
        got = rt.run(vid, part, x)
        assert got.flags.writeable and got.dtype == np.float32
        np.testing.assert_array_equal(got, _reference(tiny_bundle / name, x))
    ratios = {f"r{v.pruning_ratio:.2f}.weights.bin" for v in rt.manifest.variants}
    assert set(rt.weight_files) == ratios  # one mapping per ratio, not one per session


def test_shared_and_unshared_and_python_backends_agree(
        tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same windows give the same logits whichever way the sessions were opened."""
    shared = Runtime(tiny_bundle, threads=1, max_sessions=64)
    alone = Runtime(tiny_bundle, threads=1, max_sessions=64, share_weights=False)
    monkeypatch.setattr(runtime, "capi", lambda: None)  # as where no libonnxruntime exists
    python = Runtime(tiny_bundle, threads=1, max_sessions=64)
    assert (alone.weight_files, python.backend, python.share_weights) == ([], "python", False)
    for v in shared.manifest.variants:
        x = _input(shared, v.id, "head", batch=5)
        want = shared.full(v.id, x)
        assert want.shape == (5, len(shared.manifest.labels))
        np.testing.assert_array_equal(alone.full(v.id, x), want)
        np.testing.assert_array_equal(python.full(v.id, x), want)


def test_evicting_a_ratios_last_session_unmaps_its_weights(tiny_bundle: Path) -> None:
    """With room for one session, opening another ratio releases the first and its weights."""
    rt = Runtime(tiny_bundle, threads=1, max_sessions=1)
    L = rt.manifest.num_layers
    first = rt.session("r0.00-s1", "head")
    gone = weakref.ref(first)
    x = _input(rt, "r0.00-s1", "head")
    before = rt.run("r0.00-s1", "head", x)
    assert rt.weight_files == ["r0.00.weights.bin"]
    del first
    rt.session(f"r0.50-s{L}", "head")
    gc.collect()
    assert gone() is None and rt.open_sessions == 1
    assert rt.weight_files == ["r0.50.weights.bin"]
    # Reopened from scratch (a fresh mapping and container), it still gives the same output.
    np.testing.assert_array_equal(rt.run("r0.00-s1", "head", x), before)


def test_a_run_in_flight_survives_eviction_of_its_session(tiny_bundle: Path) -> None:
    """A session evicted while another thread runs it stays valid until that run returns."""
    rt = Runtime(tiny_bundle, threads=1, max_sessions=1)
    L = rt.manifest.num_layers
    vid = f"r0.00-s{L}"
    x = _input(rt, vid, "head", batch=8)
    want = rt.run(vid, "head", x)
    sess = rt.session(vid, "head")
    results: list[np.ndarray] = []
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set() or len(results) < 20:
            results.append(sess.run(None, {"tokens": x})[0])

    t = threading.Thread(target=worker)
    t.start()
    for i in range(40):  # evict and reopen the worker's session over and over
        rt.session(f"r0.50-s{1 + i % (L - 1)}", "head")
        rt.session(vid, "head")
    stop.set()
    t.join()
    assert all(np.array_equal(r, want) for r in results)


def test_concurrent_requests_open_one_session(tiny_bundle: Path) -> None:
    """Threads asking for the same variant at once all get the one cached session."""
    rt = Runtime(tiny_bundle, threads=1)
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(rt.session("r0.50-s1", "tail")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(s) for s in got}) == 1 and rt.open_sessions == 1


def test_external_initializers_read_like_the_onnx_package(tiny_bundle: Path) -> None:
    """The protobuf reader finds the same external tensors, shapes and offsets as onnx."""
    for path in sorted(tiny_bundle.glob("*.onnx")):
        model = onnx.load(str(path), load_external_data=False)
        want = {}
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                ext = {e.key: e.value for e in t.external_data}
                want[t.name] = (tuple(t.dims), ext["location"], int(ext.get("offset", 0)),
                                onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
        got = {t.name: (t.dims, t.location, t.offset, t.dtype)
               for t in external_initializers(path)}
        assert got == want


def test_bad_input_raises_a_runtime_error_naming_the_call(tiny_bundle: Path) -> None:
    """ORT's refusal surfaces as OrtError (a RuntimeError), and the session stays usable."""
    rt = Runtime(tiny_bundle, threads=1)
    x = _input(rt, "r0.00-s1", "tail")
    with pytest.raises(OrtError, match="Run"):
        rt.run("r0.00-s1", "tail", x[:, :, :-1])
    with pytest.raises(OrtError, match="unsupported tensor type"):
        rt.run("r0.00-s1", "tail", x.astype(np.complex64))
    assert isinstance(OrtError("x"), RuntimeError)
    assert rt.run("r0.00-s1", "tail", x).shape == (3, len(rt.manifest.labels))


def test_device_runtime_does_not_load_the_python_onnxruntime_module() -> None:
    """The gateway opens sessions without importing onnxruntime's Python package."""
    import subprocess
    import sys

    code = ("import sys, edgetok.gateway.daemon, edgetok.models.ortcapi as o; "
            "assert o.capi() is not None; "
            "print(any(m.split('.')[0] == 'onnxruntime' for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
    assert ortcapi.capi() is not None
