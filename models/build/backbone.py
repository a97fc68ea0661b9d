"""The project's own BERT-style encoder: token mapping, post-LN layers, task head, split parts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

Pool = Literal["cls", "mean"]
Activation = Literal["gelu", "relu"]


@dataclass(frozen=True, slots=True)
class EncoderShape:
    """Sizes of an encoder before pruning (pruned layers keep their own head/neuron counts)."""

    token_dim: int
    hidden: int
    layers: int
    heads: int
    head_dim: int
    ffn: int
    num_classes: int
    max_positions: int = 512
    ln_eps: float = 1e-12
    dropout: float = 0.1
    activation: Activation = "gelu"
    pool: Pool = "mean"


class SelfAttention(nn.Module):
    """Multi-head self-attention whose head count may differ per layer after pruning."""

    def __init__(self, hidden: int, heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.head_dim = head_dim
        self.query = nn.Linear(hidden, inner)
        self.key = nn.Linear(hidden, inner)
        self.value = nn.Linear(hidden, inner)
        self.out = nn.Linear(inner, hidden)
        self.drop = nn.Dropout(dropout)
        # Importance scoring multiplies each head's context by a gate and reads its gradient.
        self.gate: torch.Tensor | None = None
        # Original indices of the surviving heads: pruning keeps the map to the dense model.
        self.kept: list[int] = list(range(heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, H) to (B, N, H)."""
        b, n = x.shape[0], x.shape[1]

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        ctx = self.drop(att) @ v
        if self.gate is not None:
            ctx = ctx * self.gate.view(1, -1, 1, 1)
        return self.out(ctx.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class Layer(nn.Module):
    """One post-LayerNorm transformer layer, as in BERT."""

    def __init__(self, hidden: int, heads: int, head_dim: int, ffn: int, eps: float,
                 dropout: float, activation: Activation) -> None:
        super().__init__()
        self.attn = SelfAttention(hidden, heads, head_dim, dropout)
        self.ln1 = nn.LayerNorm(hidden, eps=eps)
        self.inter = nn.Linear(hidden, ffn)
        self.output = nn.Linear(ffn, hidden)
        self.ln2 = nn.LayerNorm(hidden, eps=eps)
        self.drop = nn.Dropout(dropout)
        self.activation = activation
        self.gate: torch.Tensor | None = None
        self.kept: list[int] = list(range(ffn))

    @property
    def ffn(self) -> int:
        """Current number of FFN neurons."""
        return int(self.inter.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, H) to (B, N, H)."""
        x = self.ln1(x + self.drop(self.attn(x)))
        a = self.inter(x)
        a = F.gelu(a) if self.activation == "gelu" else F.relu(a)
        if self.gate is not None:
            a = a * self.gate
        return self.ln2(x + self.drop(self.output(a)))


class Embed(nn.Module):
    """Token mapping: tokenizer vectors to the hidden width, a CLS token, positions, LayerNorm."""

    def __init__(self, token_dim: int, hidden: int, max_positions: int, eps: float,
                 dropout: float) -> None:
        super().__init__()
        self.proj = nn.Linear(token_dim, hidden)
        self.cls = nn.Parameter(torch.zeros(hidden))
        self.pos = nn.Parameter(torch.zeros(max_positions, hidden))
        self.ln = nn.LayerNorm(hidden, eps=eps)
        self.drop = nn.Dropout(dropout)
        nn.init.normal_(self.cls, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, D) to hidden (B, N+1, H), CLS first."""
        h = self.proj(tokens)
        cls = self.cls.view(1, 1, -1).expand(h.shape[0], 1, h.shape[2])
        h = torch.cat([cls, h], dim=1)
        h = h + self.pos[: h.shape[1]].unsqueeze(0)
        return self.drop(self.ln(h))


class Classifier(nn.Module):
    """Task head: pool the sequence, then a linear layer to logits."""

    def __init__(self, hidden: int, num_classes: int, pool: Pool, dropout: float) -> None:
        super().__init__()
        self.pool = pool
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """hidden (B, N', H) to logits (B, K)."""
        z = h[:, 0] if self.pool == "cls" else h.mean(dim=1)
        return self.fc(self.drop(z))


class Encoder(nn.Module):
    """Token mapping, L transformer layers and a task head; split anywhere between layers."""

    def __init__(self, shape: EncoderShape) -> None:
        super().__init__()
        self.shape = shape
        s = shape
        self.embed = Embed(s.token_dim, s.hidden, s.max_positions, s.ln_eps, s.dropout)
        self.layers = nn.ModuleList(
            Layer(s.hidden, s.heads, s.head_dim, s.ffn, s.ln_eps, s.dropout, s.activation)
            for _ in range(s.layers))
        self.head = Classifier(s.hidden, s.num_classes, s.pool, s.dropout)
        for m in [*self.layers.modules(), *self.head.modules(), self.embed.proj]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def num_layers(self) -> int:
        """L."""
        return len(self.layers)

    def hidden_states(self, tokens: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """Hidden states after `upto` layers (all when None)."""
        h = self.embed(tokens)
        for layer in list(self.layers)[: self.num_layers if upto is None else upto]:
            h = layer(h)
        return h

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, D) to logits (B, K)."""
        return self.head(self.hidden_states(tokens))

    def part(self, start: int, stop: int) -> Segment:
        """Layers start..stop-1 as a module; embeds at 0 and classifies at L."""
        if not 0 <= start < stop <= self.num_layers:
            raise ValueError(f"bad part {start}..{stop} of {self.num_layers} layers")
        return Segment(self, start, stop)

    def structure(self) -> list[tuple[int, int]]:
        """(heads, ffn neurons) per layer."""
        return [(layer.attn.heads, layer.ffn) for layer in self.blocks()]

    def blocks(self) -> list[Layer]:
        """The layers, typed."""
        return [cast(Layer, m) for m in self.layers]


class Segment(nn.Module):
    """A contiguous run of an encoder: the head or the tail of one split."""

    def __init__(self, model: Encoder, start: int, stop: int) -> None:
        super().__init__()
        self.embed = model.embed if start == 0 else None
        self.layers = nn.ModuleList(list(model.layers)[start:stop])
        self.head = model.head if stop == model.num_layers else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens or hidden in; hidden or logits out."""
        if self.embed is not None:
            x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        if self.head is not None:
            x = self.head(x)
        return x


def count_params(module: nn.Module) -> int:
    """Number of parameters (shared modules counted once)."""
    return sum(p.numel() for p in module.parameters())


def flops(shape: EncoderShape, structure: list[tuple[int, int]], tokens: int, start: int,
          stop: int) -> float:
    """Multiply-adds x2 of layers start..stop-1 per window (embed at 0, classifier at L)."""
    n = tokens + 1  # CLS
    h, dh = shape.hidden, shape.head_dim
    total = 0.0
    if start == 0:
        total += 2.0 * tokens * shape.token_dim * h
    for heads, ffn in structure[start:stop]:
        inner = heads * dh
        total += 2.0 * n * h * inner * 3  # Q, K, V projections
        total += 2.0 * n * n * inner * 2  # scores and weighted sum
        total += 2.0 * n * inner * h  # output projection
        total += 2.0 * n * h * ffn * 2  # FFN in and out
    if stop == len(structure):
        total += 2.0 * h * shape.num_classes
    return total
