"""Align irregular multichannel readings onto a stream's regular sample grid."""

from __future__ import annotations

import numpy as np

from edgetok.tokenizers.base import TokenizeError
from edgetok.tokenizers.series import MAX_SERIES_SAMPLES


def align(timestamps: np.ndarray, values: np.ndarray, *, start: float, rate_hz: float,
          length: int) -> tuple[np.ndarray, np.ndarray]:
    """Place readings (n,) x (n, C) on `length` slots from `start` at `rate_hz`.

    Readings are reordered by time and exact duplicates dropped. Each reading lands in its
    nearest slot; later readings in a slot overwrite only the channels they carry (NaN means
    "this reading has no value for that channel"). Slots nobody hit stay NaN: gaps are masked
    downstream, never interpolated. Returns values (C, length) and slot timestamps (length,).
    """
    ts = np.asarray(timestamps, dtype=np.float64)
    vals = np.asarray(values, dtype=np.float64)
    if vals.ndim != 2 or ts.ndim != 1 or vals.shape[0] != ts.shape[0]:
        raise TokenizeError("bad_shape", f"readings {vals.shape} do not match timestamps "
                            f"{ts.shape}")
    if not rate_hz > 0 or length <= 0:
        raise TokenizeError("bad_rate", f"rate {rate_hz} Hz and length {length} must be > 0")
    if length * max(vals.shape[1], 1) > MAX_SERIES_SAMPLES:
        raise TokenizeError("too_large", f"{vals.shape[1]}x{length} slots exceed "
                            f"{MAX_SERIES_SAMPLES}")
    grid = start + np.arange(length, dtype=np.float64) / rate_hz
    out = np.full((vals.shape[1], length), np.nan)
    if ts.size == 0:
        return out, grid
    # A reading without a usable time cannot be placed; it is a gap, not an error.
    known = np.isfinite(ts)
    if not known.all():
        ts, vals = ts[known], vals[known]
    order = np.lexsort((np.arange(ts.size), ts))  # stable by arrival within equal times
    ts, vals = ts[order], vals[order]
    pos = np.rint((ts - start) * rate_hz)
    inside = (pos >= 0) & (pos < length)  # filter before the cast: huge floats overflow int64
    slots, vals = pos[inside].astype(np.int64), vals[inside]
    for c in range(vals.shape[1]):
        have = ~np.isnan(vals[:, c])
        # Fancy assignment keeps the last write per slot: the latest reading wins.
        out[c, slots[have]] = vals[have, c]
    return out, grid
