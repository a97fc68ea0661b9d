"""Structured pruning: rank attention heads and FFN neurons, then cut them out of the matrices."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from edgetok.models.build.backbone import Encoder, Layer, SelfAttention
from torch import nn

log = logging.getLogger(__name__)

# Windows per backward pass while scoring: |gradient| is summed per batch, so smaller batches
# approach the per-example Taylor score at more passes.
SCORE_BATCH = 8


def _keep(count: int, ratio: float) -> int:
    """Units that survive a ratio; never zero, so every layer still passes its residual."""
    return max(1, round(count * (1.0 - ratio)))


def importance(model: Encoder, x: np.ndarray, y: np.ndarray,
               method: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, (head scores, neuron scores); higher means more important."""
    if method == "magnitude":
        out = []
        for layer in model.layers:
            a = layer.attn
            w = torch.cat([a.query.weight, a.key.weight, a.value.weight], dim=1)
            rows = w.detach().reshape(a.heads, a.head_dim, -1).pow(2).sum(dim=(1, 2))
            cols = a.out.weight.detach().reshape(a.out.out_features, a.heads, a.head_dim)
            heads = rows + cols.pow(2).sum(dim=(0, 2))
            neurons = (layer.inter.weight.detach().pow(2).sum(dim=1)
                       + layer.output.weight.detach().pow(2).sum(dim=0))
            out.append((heads.numpy(), neurons.numpy()))
        return out
    # Taylor (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"): the loss
    # change from removing a unit is about |gate x dL/dgate| with the gate at 1.
    layers = model.blocks()
    for layer in layers:
        layer.attn.gate = torch.ones(layer.attn.heads, requires_grad=True)
        layer.gate = torch.ones(layer.ffn, requires_grad=True)
    scores = [(np.zeros(layer.attn.heads), np.zeros(layer.ffn)) for layer in layers]
    model.eval()
    try:
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        for i in range(0, len(y), SCORE_BATCH):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(xt[i:i + SCORE_BATCH]), yt[i:i + SCORE_BATCH]).backward()
            for (hs, ns), layer in zip(scores, layers, strict=True):
                assert layer.attn.gate is not None and layer.gate is not None
                assert layer.attn.gate.grad is not None and layer.gate.grad is not None
                hs += layer.attn.gate.grad.abs().numpy()
                ns += layer.gate.grad.abs().numpy()
    finally:
        for layer in layers:
            layer.attn.gate = None
            layer.gate = None
        model.zero_grad(set_to_none=True)
    return scores


def _rows(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(lin.in_features, len(idx))
    new.weight.data = lin.weight.data[idx].clone()
    new.bias.data = lin.bias.data[idx].clone()
    return new


def _cols(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(idx), lin.out_features)
    new.weight.data = lin.weight.data[:, idx].clone()
    new.bias.data = lin.bias.data.clone()
    return new


def prune_attention(attn: SelfAttention, heads: list[int]) -> None:
    """Keep only these heads (indices into the current ones), shrinking Q/K/V rows and out cols."""
    idx = torch.tensor([h * attn.head_dim + d for h in heads for d in range(attn.head_dim)])
    attn.query, attn.key, attn.value = (_rows(attn.query, idx), _rows(attn.key, idx),
                                        _rows(attn.value, idx))
    attn.out = _cols(attn.out, idx)
    attn.heads = len(heads)


def prune_ffn(layer: Layer, neurons: list[int]) -> None:
    """Keep only these FFN neurons: rows of the input matrix, columns of the output one."""
    idx = torch.tensor(neurons)
    layer.inter = _rows(layer.inter, idx)
    layer.output = _cols(layer.output, idx)


def kept_units(model: Encoder) -> list[tuple[list[int], list[int]]]:
    """Per layer, the original indices of surviving heads and neurons."""
    out = []
    for layer in model.layers:
        out.append((list(layer.attn.kept), list(layer.kept)))
    return out


def prune(model: Encoder, ratio: float, scores: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Remove the least important `ratio` of heads and neurons in every layer, in place."""
    if ratio <= 0:
        return
    before = kept_units(model)
    for layer, (hs, ns), (old_h, old_n) in zip(model.layers, scores, before, strict=True):
        keep_h = sorted(np.argsort(-hs, kind="stable")[:_keep(len(hs), ratio)].tolist())
        keep_n = sorted(np.argsort(-ns, kind="stable")[:_keep(len(ns), ratio)].tolist())
        prune_attention(layer.attn, keep_h)
        prune_ffn(layer, keep_n)
        layer.attn.kept = [old_h[i] for i in keep_h]
        layer.kept = [old_n[i] for i in keep_n]
    log.info("pruned at %.2f: (heads, neurons) per layer %s", ratio, model.structure())


def densify(model: Encoder, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The pruned model's weights scattered back into the unpruned shapes, zeros where cut."""
    out: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    kept = kept_units(model)
    for name, ref in reference.items():
        w = state[name]
        if w.shape == ref.shape:
            out[name] = w
            continue
        li = int(name.split(".")[1])
        heads, neurons = kept[li]
        dh = model.shape.head_dim
        if ".attn." in name:
            idx = torch.tensor([h * dh + d for h in heads for d in range(dh)])
        else:
            idx = torch.tensor(neurons)
        dense = torch.zeros_like(ref)
        shrunk_rows = w.shape[0] != ref.shape[0]
        if shrunk_rows:
            dense[idx] = w
        else:
            dense[:, idx] = w
        out[name] = dense
    return out


def param_distortion(model: Encoder, reference: dict[str, torch.Tensor]) -> float:
    """||θ − θ_ρ||² / ||θ||² over every parameter of the unpruned model."""
    dense = densify(model, reference)
    num = sum(float((reference[k] - dense[k]).pow(2).sum()) for k in reference)
    den = sum(float(v.pow(2).sum()) for v in reference.values())
    return num / den if den else 0.0


def restore_structure(model: Encoder, kept: list[tuple[list[int], list[int]]]) -> None:
    """Shrink a fresh, unpruned model to a saved structure (weights are loaded afterwards)."""
    for layer, (heads, neurons) in zip(model.layers, kept, strict=True):
        if len(heads) != layer.attn.heads:
            prune_attention(layer.attn, heads)
        if len(neurons) != layer.ffn:
            prune_ffn(layer, neurons)
        layer.attn.kept, layer.kept = list(heads), list(neurons)
