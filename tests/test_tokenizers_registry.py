"""The registry, the config contract every tokenizer shares, and the one output type."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import BaseModel, TypeAdapter, ValidationError

import edgetok.tokenizers as tk
from edgetok.tokenizers import (
    KNOWN,
    REASONS,
    ByteConfig,
    CategoricalConfig,
    LabelWindow,
    LocationWindow,
    LogMelConfig,
    Modality,
    PatchConfig,
    Payload,
    SeriesWindow,
    TokenBatch,
    TokenizerConfig,
    build,
    concat,
    parse,
)
from edgetok.tokenizers.registry import CONFIG_CLASSES

PKG = Path(tk.__file__).resolve().parent
# The least each tokenizer needs besides `type`.
REQUIRED: dict[str, dict[str, Any]] = {"categorical": {"states": ["on", "off"]}}


def test_unknown_type_is_a_config_error_listing_known_keys() -> None:
    with pytest.raises(ValidationError) as e:
        TypeAdapter(TokenizerConfig).validate_python({"type": "wavelet"})
    text = str(e.value)
    assert "wavelet" in text
    for key in KNOWN:
        assert f"'{key}'" in text
    with pytest.raises(ValidationError):
        parse({"patch_len": 4})  # no type at all


@pytest.mark.parametrize("key", KNOWN)
def test_every_key_parses_builds_and_follows_the_config_rules(key: str) -> None:
    data = {"type": key, **REQUIRED.get(key, {})}
    cfg = parse(data)
    assert cfg.type == key and isinstance(cfg, CONFIG_CLASSES)
    assert hasattr(build(data), "tokenize") and hasattr(build(cfg), "tokenize")
    cls: type[BaseModel] = type(cfg)
    assert cls.model_config.get("extra") == "forbid" and cls.model_config.get("frozen")
    for name, field in cls.model_fields.items():
        assert field.description, f"{cls.__name__}.{name} has no description"
    with pytest.raises(ValidationError):
        parse({**data, "no_such_option": 1})
    with pytest.raises(ValidationError):
        cfg.type = "other"


def _sample(kind: str) -> Any:
    """One valid window of each kind the gateway feeds."""
    t = np.arange(32.0)
    return {"series": SeriesWindow(np.sin(np.stack([t, 2 * t])), t),
            "labels": LabelWindow(("on", None), np.zeros(2)),
            "location": LocationWindow(np.array([1.0]), np.array([2.0]), np.zeros(1))}[kind]


def _png() -> bytes:
    """A small valid PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


PAYLOADS = {"logmel": b"\x00\x10" * 4000, "image": _png(), "bytes": b'{"on": 1}'}


@pytest.mark.parametrize("key", KNOWN)
def test_every_tokenizer_takes_its_declared_window_kind(key: str) -> None:
    cfg = parse({"type": key, **REQUIRED.get(key, {})})
    kind = type(cfg).window_kind
    window = Payload(PAYLOADS[key], 1.0) if kind == "payload" else _sample(kind)
    batch = build(cfg).tokenize([window, window])
    assert batch.batch_size == 2 and batch.mask.any(axis=1).all()
    assert batch.model_input().shape[:2] == batch.mask.shape


def test_known_keys_are_unique_and_complete() -> None:
    assert len(set(KNOWN)) == len(KNOWN) == len(CONFIG_CLASSES)
    assert {"patch", "quantize", "sax", "logmel", "image", "bytes", "categorical",
            "location"} <= set(KNOWN)


def test_every_raised_reason_is_declared() -> None:
    raised = set()
    for path in PKG.glob("*.py"):
        raised |= set(re.findall(r'TokenizeError\(\s*"([a-z_]+)"', path.read_text()))
    assert raised and raised <= REASONS, raised - REASONS


def test_concat_series_and_audio_vectors() -> None:
    x = np.random.default_rng(0).normal(size=(2, 2, 64)).astype(np.float32)
    series = PatchConfig(patch_len=32, stride=32).build().tokenize_array(
        x, np.tile(np.arange(64.0), (2, 1)))
    audio_cfg = LogMelConfig(n_mels=16, patch_frames=4, clip_samples=1600)
    audio = audio_cfg.build().tokenize([b"\x01\x00" * 1600, b"\x02\x00" * 800])
    both = concat([series, audio])
    assert both.vectors is not None and both.vectors.shape == (2, 2 + audio.length, 64)
    assert both.modality[0].tolist() == [Modality.SERIES] * 2 + [Modality.AUDIO] * audio.length
    assert both.mask[1, 2:].tolist() == audio.mask[1].tolist()
    assert set(both.aux) == {"0.loc", "0.scale", "1.loc", "1.scale"}


def test_concat_ids_and_refusals() -> None:
    text = ByteConfig(max_tokens=4).build().tokenize([b"ab", b"cdef"])
    states = CategoricalConfig(states=("on",), max_len=2).build().tokenize(
        [LabelWindow(("on",), np.zeros(1)), LabelWindow((None, "on"), np.ones(2))])
    joined = concat([text, states])
    assert joined.ids is not None and joined.model_input().dtype == np.int64
    assert joined.ids.shape == (2, 6)
    vec = PatchConfig().build().tokenize_array(np.zeros((2, 1, 10), np.float32),
                                               np.zeros((2, 10)))
    with pytest.raises(ValueError):
        concat([text, vec])
    with pytest.raises(ValueError):
        concat([])
    with pytest.raises(ValueError):
        TokenBatch(np.zeros((1, 2)), np.zeros((1, 2)), np.ones((1, 2), bool))


def test_runtime_imports_neither_torch_nor_test_only_libraries() -> None:
    code = (
        "import sys, numpy as np, edgetok.tokenizers as t\n"
        "for k in t.KNOWN:\n"
        "    t.build({'type': k, **({'states': ['a']} if k == 'categorical' else {})})\n"
        "bad = [m for m in ('torch', 'scipy', 'librosa', 'aeon', 'numba', 'transformers')\n"
        "       if m in sys.modules]\n"
        "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == ""
