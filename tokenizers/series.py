"""Shared input checks for the time-series tokenizers (patch, quantizer, SAX)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from edgetok.tokenizers.base import SeriesWindow, TokenizeError

NanPolicy = Literal["mask", "reject"]

# Upper bound on samples per series window (channels x time). A gateway window is a few
# thousand samples; the cap only exists so a misconfigured stream cannot allocate gigabytes.
MAX_SERIES_SAMPLES = 1 << 22


def stack_windows(windows: Sequence[SeriesWindow]) -> tuple[np.ndarray, np.ndarray]:
    """Stack same-shaped windows into x (B, C, T) float32 and t (B, T) float64."""
    if not windows:
        raise TokenizeError("empty", "no windows to tokenize")
    first = windows[0].values.shape
    for i, w in enumerate(windows):
        if w.values.ndim != 2 or w.values.shape != first:
            raise TokenizeError("bad_shape", f"window values {w.values.shape} differ from "
                                f"the batch's {first} or are not (channels, time)", i)
        if w.timestamps.shape != (first[1],):
            raise TokenizeError("bad_shape", f"timestamps {w.timestamps.shape} do not match "
                                f"{first[1]} samples", i)
    x = np.stack([w.values for w in windows]).astype(np.float32, copy=False)
    t = np.stack([w.timestamps for w in windows]).astype(np.float64, copy=False)
    return x, t


def check_series(x: np.ndarray, t: np.ndarray, *, num_channels: int | None,
                 window_len: int | None, nan_policy: NanPolicy) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (B, C, T) batch; returns x with non-finite samples as NaN, and the finite mask.

    Raises TokenizeError for a wrong shape, channel count or length, NaN/inf under "reject",
    and any window with no finite sample at all.
    """
    if x.ndim != 3 or 0 in x.shape:
        raise TokenizeError("bad_shape", f"expected non-empty (batch, channels, time), got "
                            f"{x.shape}")
    b, c, length = x.shape
    if t.shape != (b, length):
        raise TokenizeError("bad_shape", f"timestamps {t.shape} do not match values {x.shape}")
    if c * length > MAX_SERIES_SAMPLES:
        raise TokenizeError("too_large", f"{c}x{length} samples exceed {MAX_SERIES_SAMPLES}")
    if num_channels is not None and c != num_channels:
        raise TokenizeError("bad_shape", f"{c} channels, the stream declares {num_channels}")
    if window_len is not None and length != window_len:
        raise TokenizeError("bad_shape", f"{length} samples, the stream declares {window_len}")
    finite = np.isfinite(x)
    if finite.all():
        return x, finite
    if nan_policy == "reject":
        bad = int(np.flatnonzero(~finite.all(axis=(1, 2)))[0])
        raise TokenizeError("non_finite", "window holds NaN or inf samples", bad)
    dead = ~finite.any(axis=(1, 2))
    if dead.any():
        raise TokenizeError("empty", "a window has no finite samples", int(np.flatnonzero(dead)[0]))
    return np.where(finite, x, np.float32(np.nan)), finite
