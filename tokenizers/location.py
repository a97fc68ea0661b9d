"""Location: latitude/longitude fixes to geohash tokens, or to normalised coordinates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgetok.tokenizers.base import (
    MISSING_ID,
    NUM_SPECIAL,
    PAD_ID,
    LocationWindow,
    Modality,
    TokenBatch,
    TokenizeError,
    WindowKind,
)

# The geohash base-32 alphabet (digits and lower-case letters without a, i, l, o).
BASE32 = "0123456789bcdefghjkmnpqrstuvwxyz"
# One id per cell means a vocabulary of 32^precision: beyond 4 characters (about 20 km x
# 20 km cells, 2^20 ids) an embedding table stops being reasonable; use chars instead.
MAX_CELL_PRECISION = 4


def _cell(v: np.ndarray, lo: float, span: float, bits: int) -> np.ndarray:
    """Index of the 2^bits equal cells over [lo, lo + span] holding v; boundaries go up.

    That is what `bits` rounds of interval bisection give: every midpoint the bisection
    computes is exactly a grid line lo + k * span / 2^bits (dyadic, no rounding for bits
    <= 30), so a floor guess corrected against the exact grid lines agrees on ties too.
    """
    m = 1 << bits
    w = span / m
    k = np.clip(np.floor((v - lo) / w), 0, m - 1).astype(np.int64)
    k -= v < lo + k * w
    k += (v >= lo + (k + 1) * w) & (k < m - 1)
    return k


def _spread(x: np.ndarray) -> np.ndarray:
    """Move bit i of a (<= 32-bit) integer to bit 2i: the Morton-code interleave step."""
    x = x & 0xFFFFFFFF
    x = (x | (x << 16)) & 0x0000FFFF0000FFFF
    x = (x | (x << 8)) & 0x00FF00FF00FF00FF
    x = (x | (x << 4)) & 0x0F0F0F0F0F0F0F0F
    x = (x | (x << 2)) & 0x3333333333333333
    return (x | (x << 1)) & 0x5555555555555555


def geohash_codes(lat: np.ndarray, lon: np.ndarray, precision: int) -> np.ndarray:
    """Integer geohash codes (5*precision bits, longitude bit first) of points in degrees.

    Equal to the textbook bisection (a bit is 1 when the coordinate is at or above the
    midpoint), computed as two cell indices whose bits are interleaved.
    """
    n = 5 * precision
    lon_cell = _spread(_cell(np.asarray(lon, np.float64), -180.0, 360.0, (n + 1) // 2))
    lat_cell = _spread(_cell(np.asarray(lat, np.float64), -90.0, 180.0, n // 2))
    # The first (most significant) bit is longitude: it lands on an odd bit when n is even.
    if n % 2 == 0:
        return (lon_cell << 1) | lat_cell
    return lon_cell | (lat_cell << 1)


def geohash(lat: float, lon: float, precision: int) -> str:
    """Geohash string of one point."""
    code = int(geohash_codes(np.array([lat]), np.array([lon]), precision)[0])
    return "".join(BASE32[(code >> (5 * (precision - 1 - k))) & 31] for k in range(precision))


class LocationConfig(BaseModel):
    """Position fixes to tokens: geohash characters, geohash cells, or normalised values."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # What the gateway feeds tokenize(): see WindowKind in base.py.
    window_kind: ClassVar[WindowKind] = "location"

    type: Literal["location"] = Field("location", description="Tokenizer key.")
    encoding: Literal["geohash_chars", "geohash_cell", "normalized"] = Field(
        "geohash_chars", description="'geohash_chars': one id per geohash character "
        "(precision tokens per fix); 'geohash_cell': one id per fix; 'normalized': vectors "
        "(lat/90, lon/180).")
    precision: int = Field(6, ge=1, le=12, description="Geohash characters per fix.")
    max_fixes: int = Field(16, ge=1, le=4096, description="Fixes per window (padded).")
    overflow: Literal["truncate", "reject"] = Field(
        "truncate", description="More fixes: keep the latest max_fixes, or refuse.")
    nan_policy: Literal["mask", "reject"] = Field(
        "mask", description="NaN/inf coordinates: 'mask' emits a missing fix, 'reject' refuses.")

    @model_validator(mode="after")
    def _cell_small(self) -> LocationConfig:
        if self.encoding == "geohash_cell" and self.precision > MAX_CELL_PRECISION:
            raise ValueError(f"geohash_cell needs precision <= {MAX_CELL_PRECISION}")
        return self

    @property
    def vocab_size(self) -> int:
        """Ids in total for the geohash encodings, the special ids included."""
        if self.encoding == "geohash_cell":
            return 32 ** self.precision + NUM_SPECIAL
        return 32 + NUM_SPECIAL

    def num_tokens(self) -> int:
        """Tokens per window."""
        return self.max_fixes * (self.precision if self.encoding == "geohash_chars" else 1)

    def build(self) -> LocationTokenizer:
        """The tokenizer this config describes."""
        return LocationTokenizer(self)


class LocationTokenizer:
    """Batched geohashing or normalisation of position windows."""

    def __init__(self, config: LocationConfig) -> None:
        self.config = config
        self.shifts = 5 * np.arange(config.precision - 1, -1, -1, dtype=np.int64)

    def _gather(self, windows: Sequence[LocationWindow]) -> tuple[np.ndarray, ...]:
        """Padded lat, lon, timestamps (B, max_fixes), with present and finite masks."""
        cfg = self.config
        if not windows:
            raise TokenizeError("empty", "no windows to tokenize")
        b, n = len(windows), cfg.max_fixes
        lat, lon, ts = np.zeros((b, n)), np.zeros((b, n)), np.zeros((b, n))
        present = np.zeros((b, n), bool)
        for i, w in enumerate(windows):
            la, lo, t = (np.asarray(a, np.float64) for a in (w.lat, w.lon, w.timestamps))
            if la.ndim != 1 or la.shape != lo.shape or la.shape != t.shape:
                raise TokenizeError("bad_shape", f"lat {la.shape}, lon {lo.shape}, "
                                    f"timestamps {t.shape} differ", i)
            if la.size == 0:
                raise TokenizeError("empty", "window holds no fixes", i)
            if la.size > n:
                if cfg.overflow == "reject":
                    raise TokenizeError("too_large", f"{la.size} fixes > max_fixes {n}", i)
                la, lo, t = la[-n:], lo[-n:], t[-n:]
            k = la.size
            lat[i, :k], lon[i, :k], ts[i, :k], present[i, :k] = la, lo, t, True
        finite = np.isfinite(lat) & np.isfinite(lon)
        if not finite[present].all():
            if cfg.nan_policy == "reject":
                bad = int(np.flatnonzero((present & ~finite).any(axis=1))[0])
                raise TokenizeError("non_finite", "NaN or inf coordinate", bad)
            lat, lon = np.where(finite, lat, 0.0), np.where(finite, lon, 0.0)
        outside = (np.abs(lat) > 90) | (np.abs(lon) > 180)
        if outside.any():
            bad = int(np.flatnonzero(outside.any(axis=1))[0])
            raise TokenizeError("out_of_range", "latitude outside [-90, 90] or longitude "
                                "outside [-180, 180]", bad)
        return lat, lon, ts, present, present & finite

    def tokenize(self, windows: Sequence[LocationWindow]) -> TokenBatch:
        """Geohash ids (B, max_fixes[*precision]) or vectors (B, max_fixes, 2)."""
        cfg = self.config
        lat, lon, ts, present, good = self._gather(windows)
        b, n = lat.shape
        if cfg.encoding == "normalized":
            vec = np.stack([lat / 90.0, lon / 180.0], axis=-1).astype(np.float32)
            vec[~good] = 0.0
            modality = np.full(good.shape, Modality.LOCATION, np.int16)
            return TokenBatch(modality, ts, good, vectors=vec)
        codes = geohash_codes(lat, lon, cfg.precision)
        if cfg.encoding == "geohash_cell":
            ids = codes + NUM_SPECIAL
            mask, stamps = good, ts
            fill = np.where(present, MISSING_ID, PAD_ID)
        else:
            ids = ((codes[..., None] >> self.shifts) & 31) + NUM_SPECIAL  # (B, n, precision)
            ids = ids.reshape(b, n * cfg.precision)
            mask = np.repeat(good, cfg.precision, axis=1)
            stamps = np.repeat(ts, cfg.precision, axis=1)
            fill = np.repeat(np.where(present, MISSING_ID, PAD_ID), cfg.precision, axis=1)
        ids = np.where(mask, ids, fill).astype(np.int64)
        modality = np.full(mask.shape, Modality.LOCATION, np.int16)
        return TokenBatch(modality, stamps, mask, ids=ids)
