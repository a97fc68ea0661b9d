"""Fine-tuning: full, lightweight (GPT4TS-style) or LoRA; one training loop for all of them."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from edgetok.models.build.backbone import Encoder
from edgetok.models.build.spec import FinetuneSpec
from torch import nn
from torch.nn.utils import parametrize

log = logging.getLogger(__name__)

# Batches for evaluation: big enough to amortise overhead, small enough for tiny memory.
EVAL_BATCH = 256


class LoRA(nn.Module):
    """Low-rank update W + (alpha/r)·B·A as a weight parametrization; B starts at zero."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(rank, in_features) / math.sqrt(in_features))
        self.b = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The adapted weight."""
        return weight + self.scale * (self.b @ self.a)


def _lightweight(name: str) -> bool:
    """Parameters GPT4TS trains: token mapping, LayerNorms, positions, CLS and the task head."""
    return (name.startswith(("embed.", "head.")) or ".ln1." in name or ".ln2." in name)


def configure(model: Encoder, spec: FinetuneSpec) -> list[nn.Parameter]:
    """Freeze/unfreeze by mode (adding LoRA adapters if asked); the trainable parameters."""
    if spec.mode == "lora":
        for layer in model.layers:
            for lin in (layer.attn.query, layer.attn.value):
                adapter = LoRA(lin.out_features, lin.in_features, spec.lora_rank,
                               spec.lora_alpha)
                parametrize.register_parametrization(lin, "weight", adapter)
    params: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        train = (spec.mode == "full" or _lightweight(name)
                 or (spec.mode == "lora" and "parametrizations.weight.0." in name))
        p.requires_grad_(train)
        if train:
            params.append(p)
    return params


def merge(model: Encoder) -> None:
    """Fold LoRA adapters into plain weights and unfreeze all: ready to prune and export."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(True)


@dataclass(frozen=True, slots=True)
class Schedule:
    """What one training run does."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup: float
    label_smoothing: float


def fit(model: Encoder, params: list[nn.Parameter], tokens: Callable[[int], np.ndarray],
        y: np.ndarray, sched: Schedule, seed: int,
        progress: Callable[[int], None] | None = None) -> list[float]:
    """Train with AdamW and warmup-cosine; `tokens(epoch)` gives that epoch's inputs."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=sched.lr, weight_decay=sched.weight_decay)
    steps_per_epoch = math.ceil(len(y) / sched.batch_size)
    total = max(1, sched.epochs * steps_per_epoch)
    warm = max(1, int(sched.warmup * total))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    target = torch.from_numpy(y)
    losses: list[float] = []
    model.train()
    try:
        for epoch in range(sched.epochs):
            # numpy (tokenizing) must not run with denormals flushed: it warns about finfo.
            torch.set_flush_denormal(False)
            x = torch.from_numpy(tokens(epoch))
            # Adam's moments of slowly moving weights decay into denormals, which the CPU
            # handles far slower; flushing halved full fine-tuning of MiniLM here (13.3 s to
            # 6.8 s for 8 epochs on BasicMotions).
            torch.set_flush_denormal(True)
            losses.append(_epoch(model, opt, lr_sched, params, x, target, sched, gen))
            if progress is not None:
                progress(1)
    finally:
        torch.set_flush_denormal(False)
    model.eval()
    log.debug("training losses %s", [round(v, 4) for v in losses])
    return losses


def _epoch(model: Encoder, opt: torch.optim.Optimizer,
           lr_sched: torch.optim.lr_scheduler.LRScheduler, params: list[nn.Parameter],
           x: torch.Tensor, target: torch.Tensor, sched: Schedule,
           gen: torch.Generator) -> float:
    """One shuffled pass; the mean loss."""
    order = torch.randperm(len(target), generator=gen)
    running = 0.0
    for i in range(0, len(target), sched.batch_size):
        idx = order[i:i + sched.batch_size]
        loss = F.cross_entropy(model(x[idx]), target[idx],
                               label_smoothing=sched.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        running += float(loss.detach()) * len(idx)
    return running / len(target)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Logits for model inputs, in eval mode, as float32 numpy."""
    model.eval()
    outs = [model(torch.from_numpy(x[i:i + EVAL_BATCH])) for i in range(0, len(x), EVAL_BATCH)]
    return torch.cat(outs).numpy().astype(np.float32)


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    """Fraction of argmax hits."""
    return float((logits.argmax(axis=1) == y).mean()) if len(y) else 0.0
