"""The pretrained loader against a small BERT-format checkpoint written here with safetensors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.numpy import save_file  # noqa: E402

from edgetok.models.build.pretrained import (  # noqa: E402
    BERT_CLS_ID,
    PretrainedError,
    load_bert,
)
from edgetok.models.bundle import sha256_file  # noqa: E402

HIDDEN, HEADS, FFN, LAYERS, VOCAB, POS = 16, 4, 24, 2, 120, 20
EPS = 1e-12


def _bert(root: Path, prefix: str = "", seed: int = 0) -> dict[str, np.ndarray]:
    """Write config.json and model.safetensors of a random BERT encoder; its tensors."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    t: dict[str, np.ndarray] = {
        "embeddings.word_embeddings.weight": w(VOCAB, HIDDEN),
        "embeddings.position_embeddings.weight": w(POS, HIDDEN),
        "embeddings.token_type_embeddings.weight": w(2, HIDDEN),
        "embeddings.LayerNorm.weight": 1 + w(HIDDEN), "embeddings.LayerNorm.bias": w(HIDDEN),
        "pooler.dense.weight": w(HIDDEN, HIDDEN), "pooler.dense.bias": w(HIDDEN),
    }
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for name, (o, n) in {"attention.self.query": (HIDDEN, HIDDEN),
                             "attention.self.key": (HIDDEN, HIDDEN),
                             "attention.self.value": (HIDDEN, HIDDEN),
                             "attention.output.dense": (HIDDEN, HIDDEN),
                             "intermediate.dense": (FFN, HIDDEN),
                             "output.dense": (HIDDEN, FFN)}.items():
            t[p + name + ".weight"], t[p + name + ".bias"] = w(o, n), w(o)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + name + ".weight"], t[p + name + ".bias"] = 1 + w(HIDDEN), w(HIDDEN)
    root.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v for k, v in t.items()}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({
        "model_type": "bert", "hidden_size": HIDDEN, "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS, "intermediate_size": FFN, "hidden_act": "gelu",
        "max_position_embeddings": POS, "layer_norm_eps": EPS, "vocab_size": VOCAB,
        "type_vocab_size": 2}))
    return t


def _ln(x: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + EPS) * g + b


def _gelu(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _reference(t: dict[str, np.ndarray], emb: np.ndarray) -> np.ndarray:
    """BERT's encoder, written from the paper's equations in float64 numpy, on embeddings."""
    e = "embeddings."
    n = emb.shape[1]
    x = (emb + t[e + "position_embeddings.weight"][:n]
         + t[e + "token_type_embeddings.weight"][0])
    x = _ln(x, t[e + "LayerNorm.weight"], t[e + "LayerNorm.bias"]).astype(np.float64)
    dh = HIDDEN // HEADS
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."

        def lin(v: np.ndarray, name: str, p: str = p) -> np.ndarray:
            return v @ t[p + name + ".weight"].T + t[p + name + ".bias"]

        q, k, v = (lin(x, f"attention.self.{m}").reshape(len(x), n, HEADS, dh)
                   for m in ("query", "key", "value"))
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        ctx = np.einsum("bhqk,bkhd->bqhd", att, v).reshape(len(x), n, HIDDEN)
        x = _ln(x + lin(ctx, "attention.output.dense"),
                t[p + "attention.output.LayerNorm.weight"],
                t[p + "attention.output.LayerNorm.bias"])
        h = _gelu(lin(x, "intermediate.dense"))
        x = _ln(x + lin(h, "output.dense"), t[p + "output.LayerNorm.weight"],
                t[p + "output.LayerNorm.bias"])
    return x


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_loaded_encoder_matches_independent_bert(tmp_path: Path, prefix: str) -> None:
    """Our module with loaded weights computes what BERT's equations compute."""
    t = _bert(tmp_path / "ckpt", prefix)
    model = load_bert(tmp_path / "ckpt", token_dim=6, num_classes=3, seed=1)
    model.eval()
    tokens = np.random.default_rng(2).standard_normal((3, 7, 6)).astype(np.float32)
    with torch.no_grad():
        ours = model.hidden_states(torch.from_numpy(tokens)).numpy()
        mapped = model.embed.proj(torch.from_numpy(tokens)).numpy().astype(np.float64)
    # Our CLS token is the checkpoint's [CLS] word embedding, then the mapped sensor tokens.
    cls = np.broadcast_to(t["embeddings.word_embeddings.weight"][BERT_CLS_ID], (3, 1, HIDDEN))
    expected = _reference(t, np.concatenate([cls, mapped], axis=1))
    assert ours.shape == (3, 8, HIDDEN)
    np.testing.assert_allclose(ours, expected, atol=2e-5)


def test_structure_comes_from_config(tmp_path: Path) -> None:
    """Layer count, heads, FFN width and head_dim follow config.json, not defaults."""
    _bert(tmp_path / "ckpt")
    model = load_bert(tmp_path / "ckpt", token_dim=5, num_classes=2)
    assert model.num_layers == LAYERS
    assert model.structure() == [(HEADS, FFN)] * LAYERS
    assert model.shape.head_dim == HIDDEN // HEADS
    assert model.head.fc.out_features == 2


def test_pinned_sha256_is_enforced(tmp_path: Path) -> None:
    """Weights other than the pinned ones are refused before anything loads."""
    _bert(tmp_path / "ckpt")
    good = sha256_file(tmp_path / "ckpt" / "model.safetensors")
    load_bert(tmp_path / "ckpt", token_dim=4, num_classes=2, sha256=good)
    with pytest.raises(PretrainedError, match="sha256"):
        load_bert(tmp_path / "ckpt", token_dim=4, num_classes=2, sha256="0" * 64)


def test_incomplete_checkpoint_is_refused(tmp_path: Path) -> None:
    """A checkpoint missing an encoder tensor fails with the tensor's name."""
    t = _bert(tmp_path / "ckpt")
    del t["encoder.layer.1.output.dense.weight"]
    save_file(t, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(PretrainedError, match=r"encoder\.layer\.1\.output\.dense\.weight"):
        load_bert(tmp_path / "ckpt", token_dim=4, num_classes=2)


def test_missing_config_is_refused(tmp_path: Path) -> None:
    """A dir without config.json is not an HF model dir."""
    _bert(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").unlink()
    with pytest.raises(PretrainedError, match=r"config\.json"):
        load_bert(tmp_path / "ckpt", token_dim=4, num_classes=2)
