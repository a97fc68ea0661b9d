"""The bundle format: a manifest plus ONNX files, checked by sha256 before anything loads.

This module is part of the device runtime: numpy, pydantic and hashlib only, never torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(Exception):
    """A bundle is missing, malformed, or its files do not match their checksums."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Frozen):
    """What the model consumes: modality, channels, window and tokenizer."""

    modality: Literal["series", "audio", "image", "text", "event", "location"] = Field(
        description="Input modality.")
    channels: list[str] = Field(description="Channel names, in model order.")
    window: int = Field(gt=0, description="Samples per window.")
    rate_hz: float = Field(gt=0, description="Sample rate the model was trained at.")
    tokenizer: dict[str, Any] = Field(description="Tokenizer config (its `type` and params).")


class Profile(_Frozen):
    """Measured cost and quality of one variant (ms, bytes, fractions)."""

    params_head: int = Field(0, description="Parameters in the head file.")
    params_tail: int = Field(0, description="Parameters in the tail file.")
    flops_head: float = Field(0.0, description="FLOPs of the head per window.")
    flops_tail: float = Field(0.0, description="FLOPs of the tail per window.")
    head_ms: float = Field(0.0, description="Median ORT head latency, default threads.")
    tail_ms: float = Field(0.0, description="Median ORT tail latency, default threads.")
    head_ms_1t: float = Field(0.0, description="Median ORT head latency, one thread.")
    tail_ms_1t: float = Field(0.0, description="Median ORT tail latency, one thread.")
    feature_bytes: dict[str, int] = Field(default_factory=dict,
                                          description="Uplink bytes per window by precision.")
    accuracy: dict[str, float] = Field(default_factory=dict,
                                       description="Test accuracy by feature precision.")
    param_distortion: float = Field(0.0, description="||θ−θ_ρ||² / ||θ||².")
    output_distortion: float = Field(0.0, description="E||y−y_ρ||² / E||y||².")
    int8_scale: float = Field(0.0, description="Median int8 feature scale over test windows.")
    int8_zero_point: int = Field(0, description="Median int8 feature zero point over test "
                                 "windows.")


class Variant(_Frozen):
    """One (pruning ratio, split) pair with its head and tail files."""

    id: str = Field(description="Stable variant id, e.g. 'r0.50-s3'.")
    pruning_ratio: float = Field(ge=0.0, lt=1.0, description="Fraction of heads/neurons removed.")
    split: int = Field(ge=0, description="Layers on the device: 0 = tail only, L = head only.")
    head: str | None = Field(None, description="Head ONNX file; None when split = 0.")
    tail: str | None = Field(None, description="Tail ONNX file; None when the head is complete.")
    feature_shape: list[int] = Field(description="Per-window shape of what crosses the link.")
    feature_dtype: str = Field("float32", description="dtype of the head's output.")
    profile: Profile = Field(default_factory=Profile, description="Measured profile.")


class Manifest(_Frozen):
    """manifest.json of a bundle."""

    schema_version: int = Field(SCHEMA_VERSION, description="Manifest schema version.")
    bundle_id: str = Field(description="Unique id of this build.")
    created: str = Field("", description="ISO 8601 build time.")
    num_layers: int = Field(gt=0, description="L, the number of transformer layers.")
    labels: list[str] = Field(description="Class labels, in logit order.")
    input: InputSpec = Field(description="Input spec.")
    variants: list[Variant] = Field(description="Every (pruning ratio, split) variant.")
    files: dict[str, str] = Field(description="sha256 of every file in the bundle.")
    reference_hz: float = Field(3.0e9, description="Clock of the profiling machine (Hz).")
    build: dict[str, Any] = Field(default_factory=dict, description="Recipe and build facts.")

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        ids = [v.id for v in self.variants]
        if len(set(ids)) != len(ids):
            raise ValueError("variant ids are not unique")
        for v in self.variants:
            if v.split > self.num_layers:
                raise ValueError(f"variant {v.id}: split {v.split} > num_layers")
            for f in (v.head, v.tail):
                if f is not None and f not in self.files:
                    raise ValueError(f"variant {v.id}: file {f} has no checksum in `files`")
            if v.head is None and v.tail is None:
                raise ValueError(f"variant {v.id} has neither head nor tail")
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} is not {SCHEMA_VERSION}")
        return self

    def variant(self, variant_id: str) -> Variant:
        """The variant with this id; BundleError if there is none."""
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise BundleError(f"bundle {self.bundle_id} has no variant {variant_id!r}")

    def device_variant(self, pruning_ratio: float) -> Variant:
        """The on-device (split = L) variant closest to a pruning ratio: the fallback."""
        full = [v for v in self.variants if v.split == self.num_layers]
        if not full:
            raise BundleError("bundle has no on-device (split = L) variant")
        return min(full, key=lambda v: abs(v.pruning_ratio - pruning_ratio))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(root: Path | str) -> Manifest:
    """Parse manifest.json without checking files."""
    path = Path(root) / MANIFEST
    try:
        return Manifest.model_validate(json.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise BundleError(f"{path}: no manifest; build one with `edgetok build`") from exc
    except (ValueError, ValidationError) as exc:
        raise BundleError(f"{path}: invalid manifest: {exc}") from exc


def verify_files(root: Path | str, manifest: Manifest) -> None:
    """Check every file's sha256; BundleError naming the first mismatch."""
    root = Path(root)
    for name, digest in manifest.files.items():
        path = root / name
        if not path.is_file():
            raise BundleError(f"{path}: missing bundle file")
        actual = sha256_file(path)
        if actual != digest:
            raise BundleError(f"{path}: sha256 {actual[:12]}… does not match manifest "
                              f"{digest[:12]}…; the bundle was modified or is corrupt")


def load_manifest(root: Path | str) -> Manifest:
    """Read and verify a bundle: the only way the runtime should open one."""
    manifest = read_manifest(root)
    verify_files(root, manifest)
    return manifest
