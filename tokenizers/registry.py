"""Tokenizer registry: the config union, discriminated by each tokenizer's `type` key."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field, TypeAdapter

from edgetok.tokenizers.audio import LogMelConfig
from edgetok.tokenizers.base import Tokenizer
from edgetok.tokenizers.image import ImageConfig
from edgetok.tokenizers.location import LocationConfig
from edgetok.tokenizers.patch import PatchConfig
from edgetok.tokenizers.quantize import QuantizeConfig
from edgetok.tokenizers.sax import SAXConfig
from edgetok.tokenizers.text import ByteConfig, CategoricalConfig

# Every tokenizer config class. Add new ones here and to the union below.
CONFIG_CLASSES = (PatchConfig, QuantizeConfig, SAXConfig, LogMelConfig, ImageConfig, ByteConfig,
                  CategoricalConfig, LocationConfig)

# A stream's `tokenizer` table: pydantic picks the class from `type`, and an unknown `type`
# is a validation error that names every known key.
TokenizerConfig = Annotated[
    PatchConfig | QuantizeConfig | SAXConfig | LogMelConfig | ImageConfig | ByteConfig
    | CategoricalConfig | LocationConfig,
    Field(discriminator="type"),
]

KNOWN: tuple[str, ...] = tuple(c.model_fields["type"].default for c in CONFIG_CLASSES)

_ADAPTER: TypeAdapter[TokenizerConfig] = TypeAdapter(TokenizerConfig)


def parse(data: Mapping[str, Any]) -> TokenizerConfig:
    """Validate a config dict (e.g. a manifest's `input.tokenizer`) into its config class."""
    return _ADAPTER.validate_python(dict(data))


def build(config: TokenizerConfig | Mapping[str, Any]) -> Tokenizer:
    """Instantiate the tokenizer a config (an instance, or a dict with `type`) describes."""
    if isinstance(config, Mapping):
        config = parse(config)
    if not isinstance(config, CONFIG_CLASSES):
        raise TypeError(f"not a tokenizer config: {type(config).__name__}")
    tokenizer: Tokenizer = config.build()
    return tokenizer
