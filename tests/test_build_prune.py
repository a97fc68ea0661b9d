"""Structured pruning on a small scratch encoder: shapes, equivalence to masking, importance."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgetok.models.build import prune  # noqa: E402
from edgetok.models.build.backbone import Encoder, EncoderShape  # noqa: E402

SHAPE = EncoderShape(token_dim=6, hidden=24, layers=3, heads=6, head_dim=4, ffn=40,
                     num_classes=3, max_positions=16, dropout=0.0)


def _model(seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    model = Encoder(SHAPE)
    # Larger weights than the 0.02 init so every unit matters measurably.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def _tokens(n: int = 16, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 5, 6)).astype(np.float32)


def _random_scores(model: Encoder, seed: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.random(heads), rng.random(ffn)) for heads, ffn in model.structure()]


def test_pruned_matrices_are_smaller() -> None:
    """Removed heads and neurons leave as rows and columns: the weights really shrink."""
    model = _model()
    prune.prune(model, 0.5, _random_scores(model))
    for layer in model.layers:
        assert layer.attn.heads == 3 and layer.ffn == 20
        assert tuple(layer.attn.query.weight.shape) == (12, 24)
        assert tuple(layer.attn.key.weight.shape) == (12, 24)
        assert tuple(layer.attn.value.weight.shape) == (12, 24)
        assert tuple(layer.attn.out.weight.shape) == (24, 12)
        assert tuple(layer.inter.weight.shape) == (20, 24)
        assert tuple(layer.output.weight.shape) == (24, 20)


def test_pruning_equals_masking_the_removed_units() -> None:
    """The shrunk model computes exactly what the full one does with those units gated off."""
    model = _model()
    pruned = copy.deepcopy(model)
    prune.prune(pruned, 0.5, _random_scores(model))
    for layer, (heads, neurons) in zip(model.layers, prune.kept_units(pruned), strict=True):
        layer.attn.gate = torch.zeros(SHAPE.heads)
        layer.attn.gate[heads] = 1.0
        layer.gate = torch.zeros(SHAPE.ffn)
        layer.gate[neurons] = 1.0
    x = torch.from_numpy(_tokens())
    with torch.no_grad():
        masked, shrunk, unmasked = model(x), pruned(x), _model()(x)
    torch.testing.assert_close(shrunk, masked, atol=1e-5, rtol=1e-5)
    assert (shrunk - unmasked).abs().max() > 1e-3


def test_least_important_units_go_first() -> None:
    """The kept heads and neurons are the top-scored ones in each layer."""
    model = _model()
    scores = _random_scores(model)
    prune.prune(model, 0.5, scores)
    for (hs, ns), (heads, neurons) in zip(scores, prune.kept_units(model), strict=True):
        assert sorted(heads) == sorted(np.argsort(-hs)[:3].tolist())
        assert sorted(neurons) == sorted(np.argsort(-ns)[:20].tolist())


def test_taylor_importance_sees_dead_units() -> None:
    """A head or neuron whose output weights are zero scores zero; live ones score above."""
    model = _model()
    with torch.no_grad():
        model.layers[1].attn.out.weight[:, 8:12] = 0.0  # head 2 of layer 1
        model.layers[0].output.weight[:, 5] = 0.0  # neuron 5 of layer 0
    y = np.random.default_rng(0).integers(0, 3, 16)
    scores = prune.importance(model, _tokens(), y, "taylor")
    assert scores[1][0][2] == 0.0 and (np.delete(scores[1][0], 2) > 0).all()
    assert scores[0][1][5] == 0.0 and (np.delete(scores[0][1], 5) > 0).all()
    assert all(layer.attn.gate is None and layer.gate is None for layer in model.layers)


def test_magnitude_importance_ranks_by_weight_norm() -> None:
    """Magnitude scores follow the weights: scaling one head's weights up ranks it first."""
    model = _model()
    with torch.no_grad():
        model.layers[0].attn.query.weight[4:8] *= 10
    scores = prune.importance(model, _tokens(), np.zeros(16, np.int64), "magnitude")
    assert int(np.argmax(scores[0][0])) == 1


def test_parameter_distortion_counts_what_was_cut() -> None:
    """Without recovery, ||θ−θ_ρ||²/||θ||² is the removed weights' share of the squared norm."""
    model = _model()
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert prune.param_distortion(model, reference) == 0.0
    pruned = copy.deepcopy(model)
    prune.prune(pruned, 0.5, _random_scores(model))
    removed = 0.0
    for i, (heads, neurons) in enumerate(prune.kept_units(pruned)):
        cut_h = [h for h in range(SHAPE.heads) if h not in heads]
        rows = [h * 4 + d for h in cut_h for d in range(4)]
        cut_n = [n for n in range(SHAPE.ffn) if n not in neurons]
        p = f"layers.{i}."
        for name in ("attn.query", "attn.key", "attn.value"):
            removed += float(reference[p + name + ".weight"][rows].pow(2).sum())
            removed += float(reference[p + name + ".bias"][rows].pow(2).sum())
        removed += float(reference[p + "attn.out.weight"][:, rows].pow(2).sum())
        removed += float(reference[p + "inter.weight"][cut_n].pow(2).sum())
        removed += float(reference[p + "inter.bias"][cut_n].pow(2).sum())
        removed += float(reference[p + "output.weight"][:, cut_n].pow(2).sum())
    total = sum(float(v.pow(2).sum()) for v in reference.values())
    assert prune.param_distortion(pruned, reference) == pytest.approx(removed / total)


def test_every_layer_keeps_a_head_and_a_neuron() -> None:
    """Even an extreme ratio leaves one unit, so the residual stream still runs."""
    model = _model()
    prune.prune(model, 0.99, _random_scores(model))
    assert model.structure() == [(1, 1)] * SHAPE.layers
    with torch.no_grad():
        assert torch.isfinite(model(torch.from_numpy(_tokens()))).all()


def test_saved_structure_restores_the_same_model() -> None:
    """A fresh model shrunk to saved kept units loads the pruned weights and agrees exactly."""
    model = _model()
    prune.prune(model, 0.5, _random_scores(model))
    fresh = _model(seed=9)
    prune.restore_structure(fresh, prune.kept_units(model))
    fresh.load_state_dict(model.state_dict())
    x = torch.from_numpy(_tokens())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    assert prune.kept_units(fresh) == prune.kept_units(model)
