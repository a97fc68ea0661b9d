"""PatchTST/MOMENT-style patch tokenizer with reversible instance normalisation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgetok.tokenizers.base import Modality, SeriesWindow, TokenBatch, TokenizeError, WindowKind
from edgetok.tokenizers.series import check_series, stack_windows

# Keeps flat channels (a sensor at rest) from dividing by ~0 and exploding.
NORM_EPS = 1e-5


class PatchConfig(BaseModel):
    """Cut each channel into patches; tokens are patch vectors for a learned projection."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # What the gateway feeds tokenize(): see WindowKind in base.py.
    window_kind: ClassVar[WindowKind] = "series"

    type: Literal["patch"] = Field("patch", description="Tokenizer key.")
    patch_len: int = Field(10, ge=1, le=4096, description="Samples per patch.")
    stride: int = Field(10, ge=1, le=4096, description="Samples between patch starts.")
    pad: Literal["none", "end"] = Field(
        "end", description="'end' pads the tail so the last samples form a (masked) patch.")
    channels: Literal["mixed", "independent"] = Field(
        "mixed", description="'mixed': one token per time patch across all channels (width "
        "C*patch_len); 'independent': one token per channel and patch (width patch_len).")
    normalize: bool = Field(True, description="Per-window, per-channel instance normalisation.")
    nan_policy: Literal["mask", "reject"] = Field(
        "mask", description="NaN/inf samples: 'mask' treats them as gaps, 'reject' refuses.")
    num_channels: int | None = Field(
        None, ge=1, le=4096, description="Expected channel count; None accepts any.")
    window_len: int | None = Field(
        None, ge=1, description="Expected samples per window; None accepts any.")

    @model_validator(mode="after")
    def _stride_fits(self) -> PatchConfig:
        if self.stride > self.patch_len and self.pad == "end":
            raise ValueError("stride > patch_len with pad='end' leaves gaps between patches")
        return self

    def build(self) -> PatchTokenizer:
        """The tokenizer this config describes."""
        return PatchTokenizer(self)

    def num_tokens(self, length: int, channels: int) -> int:
        """Token count for a window of `length` samples and `channels` channels."""
        n = _num_patches(length, self.patch_len, self.stride, self.pad)
        return n * channels if self.channels == "independent" else n

    def token_dim(self, channels: int) -> int:
        """Width of each token vector."""
        return self.patch_len * (channels if self.channels == "mixed" else 1)


def _num_patches(length: int, patch_len: int, stride: int, pad: str) -> int:
    """Patches that cover `length` samples; with pad='end' the tail gets one padded patch."""
    if length < patch_len:
        return 1 if pad == "end" else 0
    n = (length - patch_len) // stride + 1
    if pad == "end" and (length - patch_len) % stride:
        n += 1
    return n


class PatchTokenizer:
    """Batched patching of aligned series windows (B, C, T)."""

    def __init__(self, config: PatchConfig) -> None:
        self.config = config

    def tokenize(self, windows: Sequence[SeriesWindow]) -> TokenBatch:
        """Tokenize windows that share one shape."""
        x, t = stack_windows(windows)
        return self.tokenize_array(x, t)

    def tokenize_array(self, x: np.ndarray, t: np.ndarray) -> TokenBatch:
        """Tokenize a (B, C, T) array with (B, T) timestamps; NaN marks gaps."""
        cfg = self.config
        x = np.asarray(x, dtype=np.float32)
        t = np.asarray(t, dtype=np.float64)
        x, finite = check_series(x, t, num_channels=cfg.num_channels,
                                 window_len=cfg.window_len, nan_policy=cfg.nan_policy)
        b, c, length = x.shape
        n = _num_patches(length, cfg.patch_len, cfg.stride, cfg.pad)
        if n == 0:
            raise TokenizeError("bad_shape", f"window of {length} samples is shorter than one "
                                f"patch ({cfg.patch_len}) and padding is off")
        loc = np.zeros((b, c, 1), np.float32)
        scale = np.ones((b, c, 1), np.float32)
        if cfg.normalize:
            cnt = np.maximum(finite.sum(axis=2, keepdims=True), 1)
            xz = np.where(finite, x, 0.0)
            loc = (xz.sum(axis=2, keepdims=True) / cnt).astype(np.float32)
            var = (np.where(finite, (x - loc) ** 2, 0.0).sum(axis=2, keepdims=True) / cnt)
            scale = np.sqrt(var + NORM_EPS).astype(np.float32)
            x = (x - loc) / scale
        need = (n - 1) * cfg.stride + cfg.patch_len
        if need > length:
            x = np.concatenate([x, np.full((b, c, need - length), np.nan, np.float32)], axis=2)
            t = np.concatenate([t, np.repeat(t[:, -1:], need - length, axis=1)], axis=1)
        idx = np.arange(n)[:, None] * cfg.stride + np.arange(cfg.patch_len)[None, :]
        patches = x[:, :, idx]  # (B, C, N, P)
        seen = np.isfinite(patches)
        patches = np.where(seen, patches, 0.0).astype(np.float32)
        tok_ts = t[:, idx[:, 0]]  # (B, N): time of each patch's first sample
        if cfg.channels == "mixed":
            vectors = patches.transpose(0, 2, 1, 3).reshape(b, n, c * cfg.patch_len)
            mask = seen.any(axis=(1, 3))
            ts = tok_ts
        else:
            vectors = patches.reshape(b, c * n, cfg.patch_len)
            mask = seen.any(axis=3).reshape(b, c * n)
            ts = np.tile(tok_ts, (1, c))
        modality = np.full(mask.shape, Modality.SERIES, np.int16)
        return TokenBatch(modality, ts, mask, vectors=np.ascontiguousarray(vectors),
                          aux={"loc": loc[..., 0], "scale": scale[..., 0]})

    @staticmethod
    def denormalize(values: np.ndarray, aux: dict[str, np.ndarray]) -> np.ndarray:
        """Undo instance normalisation on (B, C, T) values."""
        return values * aux["scale"][..., None] + aux["loc"][..., None]
