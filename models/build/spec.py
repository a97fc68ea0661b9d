"""The recipe format: one TOML file names backbone, dataset, tokenizer, task, tuning, pruning."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from edgetok.tokenizers.patch import PatchConfig
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgetok.models.build import BuildError
from edgetok.frames import PRECISIONS, Precision

# Bumped whenever a change to the toolchain makes cached checkpoints stale.
TOOLCHAIN_VERSION = 2


class RecipeError(BuildError, ValueError):
    """A recipe file is missing or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackboneSpec(_Strict):
    """The transformer: scratch at a size, or a pretrained BERT-family checkpoint."""

    kind: Literal["scratch", "pretrained"] = Field(description="Random init or load weights.")
    path: str | None = Field(None, description="Pretrained: HF-format dir (config.json, "
                             "model.safetensors); relative paths are from the recipe file.")
    package: str | None = Field(None, description="Pretrained: an installed Python package "
                                "that ships the HF dir as <package>/model.")
    sha256: str | None = Field(None, description="Pretrained: expected sha256 of "
                               "model.safetensors; the build refuses other weights.")
    hidden: int = Field(64, gt=0, description="Scratch: hidden width.")
    layers: int = Field(2, gt=0, description="Scratch: transformer layers L.")
    heads: int = Field(4, gt=0, description="Scratch: attention heads per layer.")
    ffn: int = Field(128, gt=0, description="Scratch: FFN neurons per layer.")
    max_positions: int = Field(512, gt=1, description="Scratch: longest token sequence + 1.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout while training.")

    @model_validator(mode="after")
    def _source(self) -> BackboneSpec:
        if self.kind == "pretrained" and (self.path is None) == (self.package is None):
            raise ValueError("a pretrained backbone needs exactly one of `path` or `package`")
        if self.kind == "scratch" and self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not a multiple of heads {self.heads}")
        return self


class DatasetSpec(_Strict):
    """A classification dataset with its own train/test split."""

    name: str | None = Field(None, description="UCR/UEA name that aeon loads, e.g. BasicMotions.")
    path: str | None = Field(None, description="A *_TRAIN.ts file, or an .npz with X and y.")
    channels: list[str] | None = Field(None, description="Channel names; default from known "
                                       "facts about the dataset, else ch0..chC-1.")
    rate_hz: float | None = Field(None, gt=0, description="Sample rate; default from known "
                                  "facts, else 1 Hz.")

    @model_validator(mode="after")
    def _one(self) -> DatasetSpec:
        if (self.name is None) == (self.path is None):
            raise ValueError("give exactly one of dataset `name` or `path`")
        return self


class TaskSpec(_Strict):
    """What the model predicts."""

    kind: Literal["classification"] = Field("classification", description="Task type.")
    pool: Literal["cls", "mean"] = Field("mean", description="Sequence pooling before logits.")


class FinetuneSpec(_Strict):
    """How the backbone is trained on the dataset."""

    mode: Literal["full", "lightweight", "lora"] = Field(
        "full", description="full: every weight; lightweight: token mapping, LayerNorms, "
        "positions and task head only; lora: lightweight plus low-rank adapters.")
    epochs: int = Field(30, gt=0, description="Training epochs.")
    batch_size: int = Field(8, gt=0, description="Windows per step.")
    lr: float = Field(1e-3, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup: float = Field(0.1, ge=0, lt=1, description="Fraction of steps warming up.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy smoothing.")
    lora_rank: int = Field(8, gt=0, description="LoRA rank (mode lora).")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scale numerator (mode lora).")
    augment: bool = Field(True, description="Jitter/scale/shift the training windows.")
    jitter: float = Field(0.03, ge=0, description="Noise std as a fraction of channel std.")
    scale: float = Field(0.1, ge=0, description="Std of per-channel amplitude scaling.")
    shift: int = Field(0, ge=0, description="Largest circular time shift in samples.")


class PruneSpec(_Strict):
    """Structured pruning: ratios, importance, recovery."""

    ratios: list[float] = Field([0.0, 0.25, 0.5, 0.75], description="Fractions of heads and "
                                "FFN neurons removed in every layer.")
    importance: Literal["taylor", "magnitude"] = Field(
        "taylor", description="taylor: |gate x gradient| on calibration data; magnitude: "
        "weight norms.")
    recovery_epochs: int = Field(10, ge=0, description="Fine-tune epochs after each pruning.")
    recovery_lr: float | None = Field(None, gt=0, description="Recovery lr; default the "
                                      "fine-tuning lr / 2.")

    @model_validator(mode="after")
    def _ratios(self) -> PruneSpec:
        if not self.ratios or any(not 0.0 <= r < 1.0 for r in self.ratios):
            raise ValueError("ratios must be a non-empty list in [0, 1)")
        if len({round(r, 2) for r in self.ratios}) != len(self.ratios):
            raise ValueError("ratios must differ at two decimals (variant ids use :.2f)")
        return self


class ExportSpec(_Strict):
    """Which splits and feature precisions the bundle offers."""

    splits: list[int] | None = Field(None, description="Split points; default 0..L.")
    precisions: list[Precision] = Field(list(PRECISIONS), description="Feature precisions.")
    opset: int = Field(17, ge=13, description="ONNX opset.")
    shared_weights: bool = Field(True, description="Store each ratio's matrices once, in "
                                 "r{ratio}.weights.bin that its ONNX files reference; false "
                                 "makes every ONNX file self-contained.")


class ProfileSpec(_Strict):
    """How variants are measured."""

    repeats: int = Field(50, gt=0, description="Timed runs per latency figure (median).")
    warmup: int = Field(10, ge=0, description="Untimed runs first.")
    calibration: int = Field(64, gt=0, description="Training windows for distortion figures.")


class Recipe(_Strict):
    """A whole build recipe."""

    name: str = Field(description="Recipe name, part of the bundle id.")
    seed: int = Field(0, description="Seed for init, shuffling and augmentation.")
    threads: int = Field(0, ge=0, description="torch threads while training; 0 = default.")
    backbone: BackboneSpec = Field(description="Transformer backbone.")
    dataset: DatasetSpec = Field(description="Training and test data.")
    tokenizer: PatchConfig = Field(description="Tokenizer, shared with the gateway.")
    task: TaskSpec = Field(default_factory=TaskSpec, description="Task.")
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec, description="Fine-tuning.")
    prune: PruneSpec = Field(default_factory=PruneSpec, description="Structured pruning.")
    export: ExportSpec = Field(default_factory=ExportSpec, description="Split export.")
    profile: ProfileSpec = Field(default_factory=ProfileSpec, description="Profiling.")

    def digest(self, *parts: str) -> str:
        """Short stable hash of some top-level sections (all when none): cache keys."""
        data = self.model_dump(mode="json")
        keys = parts or tuple(sorted(data))
        blob = json.dumps({k: data[k] for k in keys} | {"v": TOOLCHAIN_VERSION},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_recipe(path: Path) -> Recipe:
    """Read and validate a recipe TOML; pretrained paths resolve against its folder."""
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise RecipeError(f"{path}: no such recipe") from exc
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: invalid TOML: {exc}") from exc
    for section, key in (("backbone", "path"), ("dataset", "path")):
        value = data.get(section, {}).get(key)
        if isinstance(value, str) and not Path(value).is_absolute():
            data[section][key] = str((path.parent / value).resolve())
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{path}: invalid recipe:\n{exc}") from exc
