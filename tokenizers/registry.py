"""Tokenizer registry: the config union, discriminated by each tokenizer's `type` key."""

from __future__ import annotations

from edgetok.tokenizers.base import Tokenizer
from edgetok.tokenizers.patch import PatchConfig

# Every tokenizer config class, keyed by its `type` literal. Add new ones here.
CONFIG_CLASSES = (PatchConfig,)

# With one member there is nothing to discriminate yet; becomes Annotated[Union[...]] later.
TokenizerConfig = PatchConfig

KNOWN = tuple(c.model_fields["type"].default for c in CONFIG_CLASSES)


def build(config: PatchConfig) -> Tokenizer:
    """Instantiate the tokenizer a config describes."""
    return config.build()
