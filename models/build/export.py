"""Split export: for one pruned model, a head and a tail ONNX file per split point, verified."""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
import onnxruntime as ort
import torch
from edgetok.models.build import BuildError
from edgetok.models.build.backbone import Encoder
from edgetok.models.build.train import predict

log = logging.getLogger(__name__)

# The contract's bound on |head∘tail − unsplit| (float32 ORT vs torch reorderings sit ~1e-6).
SPLIT_TOLERANCE = 1e-4
# Initializers at least this big move to the ratio's shared weights file: every split of a
# ratio reuses the same layer matrices, so a bundle stores each matrix once (MiniLM: 7x less
# disk). Smaller ones stay inline, where a separate read would cost more than it saves.
MIN_SHARED_BYTES = 1024
# Offsets in the shared file are aligned so ONNX Runtime may map tensors without copying.
ALIGN = 64


class ExportError(BuildError, RuntimeError):
    """An exported variant does not reproduce the unsplit model."""


@dataclass(frozen=True, slots=True)
class SplitFiles:
    """The files of one (ratio, split) variant and what crosses the link."""

    variant_id: str
    ratio: float
    split: int
    head: str | None
    tail: str | None
    feature_shape: list[int]


def variant_id(ratio: float, split: int) -> str:
    """The contract's id: r{ratio:.2f}-s{split}."""
    return f"r{ratio:.2f}-s{split}"


class WeightStore:
    """One external-data file per pruning ratio; identical tensors are written once."""

    def __init__(self, root: Path, name: str) -> None:
        self.path = root / name
        self.path.write_bytes(b"")
        self._index: dict[str, int] = {}

    def externalize(self, model: onnx.ModelProto) -> None:
        """Point the model's big initializers into the shared file, appending new ones."""
        for init in model.graph.initializer:
            raw = numpy_helper.to_array(init).tobytes()
            if len(raw) < MIN_SHARED_BYTES:
                continue
            key = hashlib.sha256(f"{init.data_type}:{list(init.dims)}:".encode() + raw)
            offset = self._index.get(key.hexdigest())
            if offset is None:
                with self.path.open("ab") as f:
                    pad = -f.tell() % ALIGN
                    f.write(b"\0" * pad)
                    offset = f.tell()
                    f.write(raw)
                self._index[key.hexdigest()] = offset
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                init.ClearField(field)
            init.data_location = onnx.TensorProto.EXTERNAL
            del init.external_data[:]
            for k, v in (("location", self.path.name), ("offset", str(offset)),
                         ("length", str(len(raw)))):
                entry = init.external_data.add()
                entry.key, entry.value = k, v


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path, in_name: str,
            out_name: str, opset: int, store: WeightStore | None = None) -> None:
    module.eval()
    with warnings.catch_warnings():
        # torch >= 2.9 deprecates the TorchScript exporter; the dynamo one needs onnxscript
        # and takes seconds per file, too slow for the dozens of parts a bundle holds.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(module, (example,), str(path), input_names=[in_name],
                          output_names=[out_name], dynamic_axes={in_name: {0: "batch"},
                                                                  out_name: {0: "batch"}},
                          opset_version=opset, dynamo=False)
    if store is not None:
        model = onnx.load(str(path))
        store.externalize(model)
        onnx.save(model, str(path))
    onnx.checker.check_model(str(path))


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def export_splits(model: Encoder, ratio: float, splits: list[int], out: Path,
                  sample: np.ndarray, opset: int, shared: bool = True) -> list[SplitFiles]:
    """Write head/tail files for every split, checking each against the torch model."""
    model.eval()
    ex = torch.from_numpy(sample[:2])
    n_hidden = sample.shape[1] + 1
    num_layers = model.num_layers
    reference = predict(model, sample)
    made: list[SplitFiles] = []
    tag = f"r{ratio:.2f}"
    store = WeightStore(out, f"{tag}.weights.bin") if shared else None
    for s in splits:
        head = f"{tag}-s{s}.head.onnx" if s > 0 else None
        tail = f"{tag}-s{s}.tail.onnx" if s < num_layers else None
        if head is not None:
            with torch.no_grad():
                _export(model.part(0, s), ex, out / head, "tokens",
                        "logits" if s == num_layers else "hidden", opset, store)
        if tail is not None:
            with torch.no_grad():
                mid = ex if s == 0 else model.hidden_states(ex, upto=s)
            _export(model.part(s, num_layers), mid, out / tail,
                    "tokens" if s == 0 else "hidden", "logits", opset, store)
        if s == 0:
            shape = list(sample.shape[1:])
        elif s == num_layers:
            shape = [len(reference[0])]
        else:
            shape = [n_hidden, model.shape.hidden]
        files = SplitFiles(variant_id(ratio, s), ratio, s, head, tail, shape)
        got = run_split(out, files, sample)
        err = float(np.abs(got - reference).max())
        if err > SPLIT_TOLERANCE:
            raise ExportError(f"{files.variant_id}: head∘tail differs from the unsplit model "
                              f"by {err:.2e} > {SPLIT_TOLERANCE}")
        log.debug("%s ok, max error %.2e", files.variant_id, err)
        made.append(files)
    return made


def run_split(root: Path, files: SplitFiles, tokens: np.ndarray) -> np.ndarray:
    """Head then tail through ONNX Runtime: a variant's logits."""
    x = tokens
    if files.head is not None:
        x = np.asarray(_session(root / files.head).run(None, {"tokens": x})[0])
    if files.tail is not None:
        sess = _session(root / files.tail)
        x = np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])
    return x
