"""The one output type of every tokenizer, and the errors they raise."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Literal, Protocol

import numpy as np

# What a tokenizer's tokenize() takes, per window: "series" a SeriesWindow (tokenize_array
# takes (B, C, T) directly), "payload" a Payload or raw bytes, "labels" a LabelWindow,
# "location" a LocationWindow. Each config class declares its kind as `window_kind`.
WindowKind = Literal["series", "payload", "labels", "location"]


class Modality(IntEnum):
    """Modality ids carried by every token, so mixed sequences stay decodable."""

    SERIES = 0
    AUDIO = 1
    IMAGE = 2
    TEXT = 3
    EVENT = 4
    LOCATION = 5


# Special ids shared by every id-emitting tokenizer, so id sequences concatenate cleanly.
PAD_ID = 0
MISSING_ID = 1
NUM_SPECIAL = 2

# The stable `TokenizeError.reason` codes: dead-letter reasons and metric labels.
REASONS = frozenset({
    "empty",          # no windows, or a window with no usable data
    "bad_shape",      # wrong dimensions, channel count or length
    "bad_rate",       # declared sample rate differs from the stream's
    "non_finite",     # NaN or inf under nan_policy="reject"
    "too_large",      # payload or sequence over its configured limit
    "undecodable",    # bytes that are not valid audio, image or UTF-8
    "out_of_range",   # values outside their physical domain (e.g. latitude)
    "unknown_value",  # a categorical state missing from the declared vocabulary
})


class TokenizeError(ValueError):
    """Input a tokenizer refuses; `reason` is a short stable code for dead letters and metrics.

    `window` is the index of the offending window inside the batch when known, so a caller
    can dead-letter that one window and retry the rest.
    """

    def __init__(self, reason: str, detail: str, window: int | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.window = window
        where = "" if window is None else f" (window {window})"
        super().__init__(f"{reason}: {detail}{where}")


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
        """Number of windows in the batch."""
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        """Tokens per window."""
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

    def cat(name: str) -> np.ndarray:
        """One field of every batch, joined along the token axis."""
        return np.concatenate([getattr(b, name) for b in batches], axis=1)

    aux: dict[str, np.ndarray] = {}
    for i, b in enumerate(batches):
        aux.update({f"{i}.{k}": v for k, v in b.aux.items()})
    if batches[0].ids is None:
        return TokenBatch(cat("modality"), cat("timestamps"), cat("mask"),
                          vectors=cat("vectors"), aux=aux)
    return TokenBatch(cat("modality"), cat("timestamps"), cat("mask"), ids=cat("ids"), aux=aux)


class Tokenizer(Protocol):
    """Anything that turns a batch of raw windows into a TokenBatch in one call."""

    def tokenize(self, windows: Sequence[Any]) -> TokenBatch:
        """Tokenize a batch of windows in one call."""
        ...


@dataclass(frozen=True, slots=True)
class SeriesWindow:
    """One aligned multichannel window: values (C, T) with NaN gaps, timestamps (T,)."""

    values: np.ndarray
    timestamps: np.ndarray


@dataclass(frozen=True, slots=True)
class Payload:
    """One binary MQTT payload (audio PCM, image, text) with the metadata its sender declared.

    `sample_rate` is only meaningful for audio; None means "the stream's configured rate".
    """

    data: bytes
    timestamp: float = 0.0
    sample_rate: int | None = None


@dataclass(frozen=True, slots=True)
class LabelWindow:
    """A window of categorical states (None = no reading), one per timestamp."""

    labels: tuple[str | None, ...]
    timestamps: np.ndarray


@dataclass(frozen=True, slots=True)
class LocationWindow:
    """A window of position fixes: latitude and longitude in degrees, one per timestamp."""

    lat: np.ndarray
    lon: np.ndarray
    timestamps: np.ndarray
