"""Events and text: UTF-8 byte-level ids, and a categorical-state vocabulary from config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgetok.tokenizers.base import (
    MISSING_ID,
    NUM_SPECIAL,
    PAD_ID,
    LabelWindow,
    Modality,
    Payload,
    TokenBatch,
    TokenizeError,
    WindowKind,
)

# Categorical ids: PAD, MISSING, then UNKNOWN for states outside the declared vocabulary.
UNKNOWN_ID = NUM_SPECIAL
_FIRST_STATE = NUM_SPECIAL + 1

_MODALITY = {"text": Modality.TEXT, "event": Modality.EVENT}


class ByteConfig(BaseModel):
    """UTF-8 bytes as ids (byte + 2), padded to a fixed length; no external vocabulary."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # What the gateway feeds tokenize(): see WindowKind in base.py.
    window_kind: ClassVar[WindowKind] = "payload"

    type: Literal["bytes"] = Field("bytes", description="Tokenizer key.")
    max_tokens: int = Field(256, ge=1, le=1 << 16, description="Tokens per window (padded).")
    overflow: Literal["truncate", "reject"] = Field(
        "truncate", description="Longer input: keep the first max_tokens bytes, or refuse.")
    modality: Literal["text", "event"] = Field("text", description="Modality id to stamp.")
    max_bytes: int = Field(1 << 16, ge=1, description="Largest payload accepted, in bytes; "
                           "checked before any decoding.")
    validate_utf8: bool = Field(True, description="Refuse payloads that are not valid UTF-8.")

    @property
    def vocab_size(self) -> int:
        """Ids in total: 256 byte values plus the special ids."""
        return 256 + NUM_SPECIAL

    def num_tokens(self) -> int:
        """Tokens per window."""
        return self.max_tokens

    def build(self) -> ByteTokenizer:
        """The tokenizer this config describes."""
        return ByteTokenizer(self)


class ByteTokenizer:
    """Batched byte-level tokenization of text or event payloads."""

    def __init__(self, config: ByteConfig) -> None:
        self.config = config

    def tokenize(self, windows: Sequence[Payload | bytes | str]) -> TokenBatch:
        """Ids (B, max_tokens): byte + NUM_SPECIAL, PAD_ID after the end."""
        cfg = self.config
        if not windows:
            raise TokenizeError("empty", "no payloads to tokenize")
        b, n = len(windows), cfg.max_tokens
        ids = np.full((b, n), PAD_ID, np.int64)
        lens = np.empty(b, np.int64)
        stamps = np.empty(b, np.float64)
        for i, w in enumerate(windows):
            data = _as_bytes(w, i, cfg.max_bytes)
            if not data:
                raise TokenizeError("empty", "empty payload", i)
            if cfg.validate_utf8 and not isinstance(w, str):
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise TokenizeError("undecodable", f"not UTF-8: {e}", i) from e
            if len(data) > n and cfg.overflow == "reject":
                raise TokenizeError("too_large", f"{len(data)} bytes > max_tokens {n}", i)
            k = min(len(data), n)
            ids[i, :k] = np.frombuffer(data, np.uint8, count=k)
            ids[i, :k] += NUM_SPECIAL
            lens[i] = k
            stamps[i] = w.timestamp if isinstance(w, Payload) else 0.0
        mask = np.arange(n)[None, :] < lens[:, None]
        modality = np.full(mask.shape, _MODALITY[cfg.modality], np.int16)
        return TokenBatch(modality, np.repeat(stamps[:, None], n, axis=1), mask, ids=ids)


def _as_bytes(w: Payload | bytes | str, index: int, limit: int) -> bytes:
    """The raw bytes of a window, refusing anything over `limit` before copying it."""
    if isinstance(w, str):
        # A str of k characters encodes to at most 4k bytes: check before encoding it.
        if len(w) > limit:
            raise TokenizeError("too_large", f"{len(w)} characters > max_bytes {limit}", index)
        try:
            data = w.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates have no UTF-8 form
            raise TokenizeError("undecodable", f"text is not encodable: {e}", index) from e
    elif isinstance(w, Payload):
        data = w.data
    else:
        data = w
    if len(data) > limit:
        raise TokenizeError("too_large", f"{len(data)} bytes > max_bytes {limit}", index)
    return bytes(data)


class CategoricalConfig(BaseModel):
    """Categorical states (e.g. 'idle', 'run', 'fault') to ids from a vocabulary in config."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    window_kind: ClassVar[WindowKind] = "labels"

    type: Literal["categorical"] = Field("categorical", description="Tokenizer key.")
    states: tuple[str, ...] = Field(..., min_length=1, max_length=1 << 16,
                                    description="The vocabulary, in id order (ids start at 3).")
    max_len: int = Field(64, ge=1, le=1 << 16, description="Tokens per window (padded).")
    overflow: Literal["truncate", "reject"] = Field(
        "truncate", description="Longer windows: keep the latest max_len states, or refuse.")
    unknown: Literal["map", "reject"] = Field(
        "map", description="A state outside the vocabulary: the UNKNOWN id, or refuse.")

    @field_validator("states")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError("states must be unique")
        return v

    @property
    def vocab_size(self) -> int:
        """Ids in total: PAD, MISSING, UNKNOWN and the states."""
        return len(self.states) + _FIRST_STATE

    def num_tokens(self) -> int:
        """Tokens per window."""
        return self.max_len

    def build(self) -> CategoricalTokenizer:
        """The tokenizer this config describes."""
        return CategoricalTokenizer(self)


class CategoricalTokenizer:
    """Batched lookup of state labels; None (no reading) becomes MISSING_ID."""

    def __init__(self, config: CategoricalConfig) -> None:
        self.config = config
        self.lookup = {s: i + _FIRST_STATE for i, s in enumerate(config.states)}

    def tokenize(self, windows: Sequence[LabelWindow]) -> TokenBatch:
        """Ids (B, max_len), left-aligned, PAD_ID after each window's end."""
        cfg = self.config
        if not windows:
            raise TokenizeError("empty", "no windows to tokenize")
        b, n = len(windows), cfg.max_len
        ids = np.full((b, n), PAD_ID, np.int64)
        ts = np.zeros((b, n), np.float64)
        for i, w in enumerate(windows):
            labels, stamps = w.labels, np.asarray(w.timestamps, np.float64)
            if len(labels) == 0:
                raise TokenizeError("empty", "window holds no states", i)
            if stamps.shape != (len(labels),):
                raise TokenizeError("bad_shape", f"{len(labels)} states, timestamps "
                                    f"{stamps.shape}", i)
            if len(labels) > n:
                if cfg.overflow == "reject":
                    raise TokenizeError("too_large", f"{len(labels)} states > max_len {n}", i)
                labels, stamps = labels[-n:], stamps[-n:]
            row = [MISSING_ID if s is None else self.lookup.get(s, UNKNOWN_ID) for s in labels]
            if cfg.unknown == "reject" and UNKNOWN_ID in row:
                bad = labels[row.index(UNKNOWN_ID)]
                raise TokenizeError("unknown_value", f"state {bad!r} is not declared", i)
            ids[i, :len(row)] = row
            ts[i, :len(row)] = stamps
        mask = (ids != PAD_ID) & (ids != MISSING_ID)
        modality = np.full(mask.shape, Modality.EVENT, np.int16)
        return TokenBatch(modality, ts, mask, ids=ids)
