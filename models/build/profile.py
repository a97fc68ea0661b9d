"""Profiling of exported variants: ORT latency, feature bytes, accuracy per wire precision."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from edgetok.models.build.export import SplitFiles

from edgetok.frames import Precision, dequantize, quantize

BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


@dataclass(frozen=True, slots=True)
class Timing:
    """Median latency (ms) of one ONNX file for one window."""

    default_ms: float
    single_ms: float


def _session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def latency(path: Path, x: np.ndarray, repeats: int, warmup: int) -> Timing:
    """Median wall time of one window through a file, default threads and one thread."""
    out = []
    for threads in (0, 1):
        sess = _session(path, threads)
        feed = {sess.get_inputs()[0].name: x}
        for _ in range(warmup):
            sess.run(None, feed)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append((time.perf_counter() - t0) * 1000.0)
        out.append(statistics.median(times))
    return Timing(out[0], out[1])


def feature_bytes(files: SplitFiles, num_layers: int,
                  precisions: list[Precision]) -> dict[str, int]:
    """Payload bytes per window on the uplink; nothing is sent when the device runs it all."""
    size = int(np.prod(files.feature_shape))
    return {p: 0 if files.split == num_layers else size * BYTES[p] for p in precisions}


@dataclass(frozen=True, slots=True)
class WireQuality:
    """Test accuracy after the features cross the wire at each precision."""

    accuracy: dict[str, float]
    int8_scale: float
    int8_zero_point: int


def wire_quality(root: Path, files: SplitFiles, tokens: np.ndarray, y: np.ndarray,
                 precisions: list[Precision]) -> WireQuality:
    """Run head, quantize each window's features as a frame would, dequantize, run the tail."""
    feats = tokens
    if files.head is not None:
        feats = np.asarray(_session(root / files.head, 0).run(None, {"tokens": tokens})[0])
    tail = _session(root / files.tail, 0) if files.tail is not None else None
    acc: dict[str, float] = {}
    scales: list[float] = []
    zps: list[int] = []
    for p in precisions:
        if tail is None:
            logits = feats
        else:
            rows = []
            for f in feats:
                data, scale, zp = quantize(f, p)
                if p == "int8":
                    scales.append(scale)
                    zps.append(zp)
                rows.append(dequantize(data, f.shape, p, scale, zp))
            name = tail.get_inputs()[0].name
            logits = np.asarray(tail.run(None, {name: np.stack(rows)})[0])
        acc[p] = float((logits.argmax(axis=1) == y).mean())
    return WireQuality(acc, float(np.median(scales)) if scales else 0.0,
                       int(np.median(zps)) if zps else 0)


def output_distortion(y_ref: np.ndarray, y_pruned: np.ndarray) -> float:
    """E||y − y_ρ||² / E||y||² over calibration windows."""
    den = float((y_ref ** 2).sum(axis=1).mean())
    return float(((y_ref - y_pruned) ** 2).sum(axis=1).mean()) / den if den else 0.0
