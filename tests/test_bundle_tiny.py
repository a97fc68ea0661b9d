"""The tiny bundle: manifest integrity, ONNX contract, split equivalence, pruning, tampering."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from aeon.datasets import load_classification

from edgetok.frames import dequantize, quantize
from edgetok.models.build.export import MIN_SHARED_BYTES
from edgetok.models.bundle import BundleError, load_manifest, sha256_file
from edgetok.models.runtime import Runtime
from edgetok.tokenizers.patch import PatchConfig

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def runtime(tiny_bundle: Path) -> Runtime:
    """A runtime over the session's tiny bundle."""
    return Runtime(tiny_bundle, threads=1, max_sessions=64)


@pytest.fixture(scope="module")
def test_tokens(runtime: Runtime) -> tuple[np.ndarray, np.ndarray]:
    """BasicMotions test windows tokenized as the gateway does, with label indices."""
    x, y = load_classification("BasicMotions", split="test")
    spec = runtime.manifest.input
    t = np.broadcast_to(np.arange(spec.window) / spec.rate_hz, (len(x), spec.window))
    tokens = (PatchConfig(**spec.tokenizer).build()
              .tokenize_array(x.astype(np.float32), np.ascontiguousarray(t)).model_input())
    labels = runtime.manifest.labels
    return tokens, np.array([labels.index(str(v)) for v in y])


def test_manifest_checks_out(tiny_bundle: Path) -> None:
    """Every listed file exists with its sha256, and every ONNX file is listed."""
    m = load_manifest(tiny_bundle)
    assert m.files
    for name, digest in m.files.items():
        assert sha256_file(tiny_bundle / name) == digest
    assert {p.name for p in tiny_bundle.iterdir()
            if p.suffix in (".onnx", ".bin")} == set(m.files)
    assert m.input.modality == "series" and m.input.window == 100
    assert m.input.channels == ["acc_x", "acc_y", "acc_z", "gyr_x", "gyr_y", "gyr_z"]
    assert m.input.rate_hz == 10.0
    assert sorted(m.labels) == ["badminton", "running", "standing", "walking"]


def test_every_ratio_has_every_split(tiny_bundle: Path) -> None:
    """Variant ids follow r{ratio:.2f}-s{split} for each ratio and s in 0..L."""
    m = load_manifest(tiny_bundle)
    ratios = sorted({v.pruning_ratio for v in m.variants})
    assert ratios == [0.0, 0.5]
    expected = {f"r{r:.2f}-s{s}" for r in ratios for s in range(m.num_layers + 1)}
    assert {v.id for v in m.variants} == expected
    for v in m.variants:
        assert (v.head is None) == (v.split == 0)
        assert (v.tail is None) == (v.split == m.num_layers)


def test_onnx_io_follows_the_contract(tiny_bundle: Path, runtime: Runtime,
                                      test_tokens: tuple[np.ndarray, np.ndarray]) -> None:
    """Input/output names per part, dynamic batch, feature_shape equal to what crosses."""
    m = runtime.manifest
    tokens = test_tokens[0]
    for v in m.variants:
        if v.head:
            sess = runtime.session(v.id, "head")
            assert [i.name for i in sess.get_inputs()] == ["tokens"]
            out = "logits" if v.split == m.num_layers else "hidden"
            assert [o.name for o in sess.get_outputs()] == [out]
        if v.tail:
            sess = runtime.session(v.id, "tail")
            assert [i.name for i in sess.get_inputs()] == ["tokens" if v.split == 0 else
                                                            "hidden"]
            assert [o.name for o in sess.get_outputs()] == ["logits"]
        for batch in (1, 5):
            x = tokens[:batch]
            sent = runtime.run(v.id, "head", x) if v.head else x
            assert list(sent.shape[1:]) == v.feature_shape
            assert runtime.full(v.id, x).shape == (batch, len(m.labels))


def test_every_split_equals_the_unsplit_model(runtime: Runtime,
                                              test_tokens: tuple[np.ndarray, np.ndarray]
                                              ) -> None:
    """Head then tail matches the one-file model (s = 0 tail, s = L head) within 1e-4."""
    m = runtime.manifest
    tokens = test_tokens[0]
    for ratio in sorted({v.pruning_ratio for v in m.variants}):
        whole_server = runtime.run(f"r{ratio:.2f}-s0", "tail", tokens)
        whole_device = runtime.run(f"r{ratio:.2f}-s{m.num_layers}", "head", tokens)
        np.testing.assert_allclose(whole_device, whole_server, atol=TOLERANCE)
        for s in range(1, m.num_layers):
            got = runtime.full(f"r{ratio:.2f}-s{s}", tokens)
            assert np.abs(got - whole_server).max() <= TOLERANCE


def test_profile_accuracy_is_what_the_files_score(runtime: Runtime,
                                                  test_tokens: tuple[np.ndarray, np.ndarray]
                                                  ) -> None:
    """fp32 accuracy in the profile is the ONNX files' accuracy on the test split."""
    tokens, y = test_tokens
    for v in runtime.manifest.variants:
        acc = float((runtime.full(v.id, tokens).argmax(1) == y).mean())
        assert v.profile.accuracy["fp32"] == pytest.approx(acc)


def test_int8_profile_uses_the_wire_quantizer(runtime: Runtime,
                                              test_tokens: tuple[np.ndarray, np.ndarray]
                                              ) -> None:
    """int8 accuracy equals the accuracy after frames.quantize/dequantize per window."""
    tokens, y = test_tokens
    v = runtime.manifest.variant("r0.00-s1")
    hidden = runtime.run(v.id, "head", tokens)
    back = np.stack([dequantize(*_q(h), ) for h in hidden])
    acc = float((runtime.run(v.id, "tail", back).argmax(1) == y).mean())
    assert v.profile.accuracy["int8"] == pytest.approx(acc)
    assert v.profile.int8_scale > 0
    assert v.profile.feature_bytes == {"fp32": hidden[0].size * 4, "fp16": hidden[0].size * 2,
                                       "int8": hidden[0].size}


def _q(h: np.ndarray) -> tuple[bytes, tuple[int, ...], str, float, int]:
    data, scale, zp = quantize(h, "int8")
    return data, h.shape, "int8", scale, zp


def _weights(path: Path) -> dict[str, list[int]]:
    return {i.name: list(i.dims) for i in onnx.load(str(path)).graph.initializer}


def test_pruning_really_shrinks_matrices(tiny_bundle: Path) -> None:
    """At ratio 0.5 the Q/K/V and FFN matrices in the ONNX file are half as wide."""
    m = load_manifest(tiny_bundle)
    full = _weights(tiny_bundle / m.variant(f"r0.00-s{m.num_layers}").head)  # type: ignore[operator]
    half = _weights(tiny_bundle / m.variant(f"r0.50-s{m.num_layers}").head)  # type: ignore[operator]
    for i in range(m.num_layers):
        for name in ("attn.query", "attn.key", "attn.value", "inter"):
            key = f"layers.{i}.{name}.bias"
            assert half[key][0] == full[key][0] // 2
    n_full = sum(int(np.prod(d)) for d in full.values())
    n_half = sum(int(np.prod(d)) for d in half.values())
    assert n_half < n_full
    pf = m.variant("r0.00-s0").profile
    ph = m.variant("r0.50-s0").profile
    assert ph.params_tail < pf.params_tail and ph.flops_tail < pf.flops_tail
    assert ph.param_distortion > 0 and pf.param_distortion == 0
    assert ph.output_distortion > 0 and pf.output_distortion == 0


def test_split_profile_is_consistent(tiny_bundle: Path) -> None:
    """Head plus tail parameters and FLOPs add up to the whole model's at every split."""
    m = load_manifest(tiny_bundle)
    for ratio in (0.0, 0.5):
        whole = m.variant(f"r{ratio:.2f}-s0").profile
        for s in range(m.num_layers + 1):
            p = m.variant(f"r{ratio:.2f}-s{s}").profile
            assert p.params_head + p.params_tail == whole.params_tail
            assert p.flops_head + p.flops_tail == pytest.approx(whole.flops_tail)
            assert (p.head_ms_1t > 0) == (s > 0) and (p.tail_ms_1t > 0) == (s < m.num_layers)


def test_tampered_file_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    """One flipped byte in one ONNX file stops the loader and the runtime, naming the file."""
    copy = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, copy)
    victim = sorted(copy.glob("*.tail.onnx"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=victim.name):
        load_manifest(copy)
    with pytest.raises(BundleError, match="does not match"):
        Runtime(copy)


def test_tampered_shared_weights_are_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    """The shared weights file is covered by its checksum like the ONNX files."""
    copy = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, copy)
    victim = copy / "r0.50.weights.bin"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"r0\.50\.weights\.bin"):
        load_manifest(copy)


def test_each_matrix_is_stored_once(tiny_bundle: Path) -> None:
    """All splits of a ratio share one weights file holding its parameters once."""
    m = load_manifest(tiny_bundle)
    for ratio in ("0.00", "0.50"):
        params = m.variant(f"r{ratio}-s0").profile.params_tail
        stored = (tiny_bundle / f"r{ratio}.weights.bin").stat().st_size
        # Small tensors stay inline and offsets are 64-byte aligned: bounds, not equality.
        assert 0.5 * params * 4 < stored < params * 4 + 64 * 64
        for v in m.variants:
            for name in (v.head, v.tail):
                if name is None or v.pruning_ratio != float(ratio):
                    continue
                graph = onnx.load(str(tiny_bundle / name), load_external_data=False).graph
                for init in graph.initializer:
                    if init.data_location == onnx.TensorProto.EXTERNAL:
                        where = {e.key: e.value for e in init.external_data}
                        assert where["location"] == f"r{ratio}.weights.bin"
                        assert int(where["offset"]) + int(where["length"]) <= stored
                    else:
                        assert len(init.raw_data) < MIN_SHARED_BYTES


def test_missing_file_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    """A bundle missing one of its files is refused."""
    copy = tmp_path / "missing"
    shutil.copytree(tiny_bundle, copy)
    victim = sorted(copy.glob("*.head.onnx"))[0]
    victim.unlink()
    with pytest.raises(BundleError, match="missing"):
        load_manifest(copy)


def test_report_beside_the_bundle(tiny_bundle: Path) -> None:
    """report.json and its PNG plots are written next to the manifest."""
    import json

    report = json.loads((tiny_bundle / "report.json").read_text())
    assert set(report["ratios"]) == {"0.00", "0.50"}
    for name in report["plots"]:
        assert (tiny_bundle / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(report["plots"]) == 3
    raw = report["ratios"]["0.50"]["before_recovery"]
    assert raw["param_distortion"] > 0 and 0 <= raw["accuracy"] <= 1
    assert report["ratios"]["0.00"]["before_recovery"] is None
    assert set(report["distortion_bound"]) == {"after_recovery", "before_recovery"}
