"""Modality tokenizers: raw sensor windows to token sequences (numpy only, never torch)."""

from edgetok.tokenizers.align import align
from edgetok.tokenizers.audio import LogMelConfig
from edgetok.tokenizers.base import (
    MISSING_ID,
    NUM_SPECIAL,
    PAD_ID,
    REASONS,
    LabelWindow,
    LocationWindow,
    Modality,
    Payload,
    SeriesWindow,
    TokenBatch,
    TokenizeError,
    Tokenizer,
    WindowKind,
    concat,
)
from edgetok.tokenizers.image import ImageConfig
from edgetok.tokenizers.location import LocationConfig, geohash
from edgetok.tokenizers.patch import PatchConfig
from edgetok.tokenizers.quantize import QuantizeConfig
from edgetok.tokenizers.registry import KNOWN, TokenizerConfig, build, parse
from edgetok.tokenizers.sax import SAXConfig
from edgetok.tokenizers.text import ByteConfig, CategoricalConfig

__all__ = ["KNOWN", "MISSING_ID", "NUM_SPECIAL", "PAD_ID", "REASONS", "ByteConfig",
           "CategoricalConfig", "ImageConfig", "LabelWindow", "LocationConfig",
           "LocationWindow", "LogMelConfig", "Modality", "PatchConfig", "Payload",
           "QuantizeConfig", "SAXConfig", "SeriesWindow", "TokenBatch", "TokenizeError",
           "Tokenizer", "TokenizerConfig", "WindowKind", "align", "build", "concat", "geohash",
           "parse"]
