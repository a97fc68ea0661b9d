"""Modality tokenizers: raw sensor windows to token sequences (numpy only, never torch)."""

from edgetok.tokenizers.align import align
from edgetok.tokenizers.base import (
    Modality,
    SeriesWindow,
    TokenBatch,
    TokenizeError,
    Tokenizer,
    concat,
)
from edgetok.tokenizers.registry import KNOWN, TokenizerConfig, build

__all__ = ["KNOWN", "Modality", "SeriesWindow", "TokenBatch", "TokenizeError", "Tokenizer",
           "TokenizerConfig", "align", "build", "concat"]
