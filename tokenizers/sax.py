"""SAX: piecewise aggregate approximation, then equiprobable Gaussian breakpoints to symbols."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgetok.tokenizers.base import (
    MISSING_ID,
    NUM_SPECIAL,
    Modality,
    SeriesWindow,
    TokenBatch,
    TokenizeError,
    WindowKind,
)
from edgetok.tokenizers.normal import gaussian_breakpoints
from edgetok.tokenizers.series import check_series, stack_windows

# A channel whose standard deviation is below this is flat: it is centred but not scaled,
# the same threshold aeon uses, so noise on a constant signal does not become symbols.
FLAT_STD = 1e-8


@lru_cache(maxsize=64)
def segment_starts(length: int, segments: int) -> np.ndarray:
    """Start index of each PAA segment: the first length % segments get one extra sample."""
    base, extra = divmod(length, segments)
    sizes = np.full(segments, base, np.int64)
    sizes[:extra] += 1
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    starts.flags.writeable = False
    return starts


class SAXConfig(BaseModel):
    """Symbolic aggregate approximation per channel; one id per segment and channel."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # What the gateway feeds tokenize(): see WindowKind in base.py.
    window_kind: ClassVar[WindowKind] = "series"

    type: Literal["sax"] = Field("sax", description="Tokenizer key.")
    segments: int = Field(8, ge=1, le=4096, description="PAA segments per channel and window.")
    alphabet: int = Field(4, ge=2, le=256, description="Symbols, i.e. equiprobable regions.")
    normalize: bool = Field(
        True, description="Z-normalise each channel of each window before PAA, as SAX assumes.")
    nan_policy: Literal["mask", "reject"] = Field(
        "mask", description="NaN/inf samples: 'mask' skips them (an all-missing segment gets "
        "the MISSING id), 'reject' refuses the window.")
    num_channels: int | None = Field(
        None, ge=1, le=4096, description="Expected channel count; None accepts any.")
    window_len: int | None = Field(
        None, ge=1, description="Expected samples per window; None accepts any.")

    @property
    def vocab_size(self) -> int:
        """Ids in total, the special ids included."""
        return self.alphabet + NUM_SPECIAL

    def build(self) -> SAXTokenizer:
        """The tokenizer this config describes."""
        return SAXTokenizer(self)

    def num_tokens(self, length: int, channels: int) -> int:
        """One token per segment and channel."""
        return self.segments * channels


class SAXTokenizer:
    """Batched SAX of series windows (B, C, T) into ids (B, C*segments), channel-major."""

    def __init__(self, config: SAXConfig) -> None:
        self.config = config
        self.breakpoints = gaussian_breakpoints(config.alphabet)

    def symbols(self, x: np.ndarray) -> np.ndarray:
        """Symbols 0..alphabet-1 per (B, C, segment), -1 where a segment has no finite sample."""
        cfg = self.config
        x = np.asarray(x, dtype=np.float64)
        length = x.shape[2]
        if length < cfg.segments:
            raise TokenizeError("bad_shape", f"{length} samples cannot fill {cfg.segments} "
                                "segments")
        finite = np.isfinite(x)
        xz = np.where(finite, x, 0.0)
        if cfg.normalize:
            cnt = np.maximum(finite.sum(axis=2, keepdims=True), 1)
            mean = xz.sum(axis=2, keepdims=True) / cnt
            dev = np.where(finite, x - mean, 0.0)
            std = np.sqrt((dev * dev).sum(axis=2, keepdims=True) / cnt)
            xz = dev / np.where(std > FLAT_STD, std, 1.0)
        starts = segment_starts(length, cfg.segments)
        sums = np.add.reduceat(xz, starts, axis=2)
        counts = np.add.reduceat(finite, starts, axis=2, dtype=np.int64)
        paa = sums / np.maximum(counts, 1)
        sym = np.searchsorted(self.breakpoints, paa, side="right")
        return np.where(counts > 0, sym, -1)

    def tokenize(self, windows: Sequence[SeriesWindow]) -> TokenBatch:
        """Tokenize windows that share one shape."""
        x, t = stack_windows(windows)
        return self.tokenize_array(x, t)

    def tokenize_array(self, x: np.ndarray, t: np.ndarray) -> TokenBatch:
        """Tokenize a (B, C, T) array with (B, T) timestamps; NaN marks gaps."""
        cfg = self.config
        x = np.asarray(x)
        t = np.asarray(t, dtype=np.float64)
        x, _ = check_series(x, t, num_channels=cfg.num_channels, window_len=cfg.window_len,
                            nan_policy=cfg.nan_policy)
        b, c, length = x.shape
        sym = self.symbols(x)
        ids = np.where(sym >= 0, sym + NUM_SPECIAL, MISSING_ID).astype(np.int64)
        ids = ids.reshape(b, c * cfg.segments)
        mask = ids != MISSING_ID
        ts = np.tile(t[:, segment_starts(length, cfg.segments)], (1, c))
        modality = np.full(mask.shape, Modality.SERIES, np.int16)
        return TokenBatch(modality, ts, mask, ids=ids)
