"""The one output type of every tokenizer, and the errors they raise."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol

import numpy as np


class Modality(IntEnum):
    """Modality ids carried by every token, so mixed sequences stay decodable."""

    SERIES = 0
    AUDIO = 1
    IMAGE = 2
    TEXT = 3
    EVENT = 4
    LOCATION = 5


class TokenizeError(ValueError):
    """Input a tokenizer refuses; `reason` is a short stable code for dead letters and metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True, slots=True)
class TokenBatch:
    """A batch of token sequences: ids into a vocabulary, or vectors for a learned projection.

    Shapes: ids (B, N) int64 or vectors (B, N, D) float32; modality, timestamps and mask are
    (B, N). mask is True where the position holds real data, False for missing or padding.
    `aux` keeps per-window side information, e.g. instance-norm statistics to undo scaling.
    """

    modality: np.ndarray
    timestamps: np.ndarray
    mask: np.ndarray
    ids: np.ndarray | None = None
    vectors: np.ndarray | None = None
    aux: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.ids is None) == (self.vectors is None):
            raise ValueError("a TokenBatch holds either ids or vectors, exactly one")
        lead = self.mask.shape
        for name in ("modality", "timestamps"):
            if getattr(self, name).shape != lead:
                raise ValueError(f"{name} shape {getattr(self, name).shape} != mask {lead}")
        body = self.ids if self.ids is not None else self.vectors
        assert body is not None
        if body.shape[:2] != lead:
            raise ValueError(f"token shape {body.shape} does not match mask {lead}")

    @property
    def batch_size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def model_input(self) -> np.ndarray:
        """The array a model consumes: vectors as float32, or ids as int64."""
        if self.vectors is not None:
            return np.ascontiguousarray(self.vectors, dtype=np.float32)
        assert self.ids is not None
        return np.ascontiguousarray(self.ids, dtype=np.int64)


def concat(batches: Sequence[TokenBatch]) -> TokenBatch:
    """Join sequences from several modalities along the token axis into one model input.

    Vector batches must share their width D; id batches share one id space by the caller's
    choice of offsets. Mixing ids and vectors is refused.
    """
    if not batches:
        raise ValueError("nothing to concatenate")
    kinds = {b.ids is None for b in batches}
    if len(kinds) != 1:
        raise ValueError("cannot concatenate id tokens with vector tokens")
    cat = (lambda name: np.concatenate([getattr(b, name) for b in batches], axis=1))
    aux: dict[str, np.ndarray] = {}
    for i, b in enumerate(batches):
        aux.update({f"{i}.{k}": v for k, v in b.aux.items()})
    if batches[0].ids is None:
        return TokenBatch(cat("modality"), cat("timestamps"), cat("mask"),
                          vectors=cat("vectors"), aux=aux)
    return TokenBatch(cat("modality"), cat("timestamps"), cat("mask"), ids=cat("ids"), aux=aux)


class Tokenizer(Protocol):
    """Anything that turns a batch of raw windows into a TokenBatch in one call."""

    def tokenize(self, windows: Sequence[Any]) -> TokenBatch: ...


@dataclass(frozen=True, slots=True)
class SeriesWindow:
    """One aligned multichannel window: values (C, T) with NaN gaps, timestamps (T,)."""

    values: np.ndarray
    timestamps: np.ndarray
