"""Synthetic bundle manifests with plausible profiles, for tests and what-if planning.

The numbers follow the shape of a real split transformer: head cost grows with the split and
shrinks with pruning, the tail the other way round, the features are tokens × hidden at the
chosen precision, and accuracy falls with pruning and with int8 features. They are made up;
a real bundle's profile always takes precedence.
"""

from __future__ import annotations

from collections.abc import Sequence

from edgetok.control import variant_id
from edgetok.models.bundle import InputSpec, Manifest, Profile, Variant

BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


def synthetic_manifest(num_layers: int = 4, ratios: Sequence[float] = (0.0, 0.25, 0.5),
                       tokens: int = 16, token_dim: int = 32, hidden: int = 64,
                       layer_ms: float = 2.0, embed_ms: float = 0.3, server_speedup: float = 4.0,
                       base_accuracy: float = 0.9, prune_loss: float = 0.2,
                       int8_loss: float = 0.01, fp16_loss: float = 0.001,
                       labels: int = 4, reference_hz: float = 3.0e9,
                       bundle_id: str = "synthetic") -> Manifest:
    """A manifest with one variant per (ratio, split) and a made-up but coherent profile."""
    L = num_layers
    variants: list[Variant] = []
    files: dict[str, str] = {}
    for r in ratios:
        keep = 1.0 - r
        acc_fp32 = base_accuracy - prune_loss * r * r
        for s in range(L + 1):
            vid = variant_id(r, s)
            head = f"{vid}.head.onnx" if s > 0 else None
            tail = f"{vid}.tail.onnx" if s < L else None
            for name in (head, tail):
                if name is not None:
                    files[name] = "0" * 64
            if s == 0:
                shape = [tokens, token_dim]
            elif s < L:
                shape = [tokens + 1, hidden]
            else:
                shape = [labels]
            n = 1
            for d in shape:
                n *= d
            head_ms = (embed_ms + s * layer_ms * keep) if s > 0 else 0.0
            tail_ms = ((L - s) * layer_ms * keep + embed_ms * (s == 0)) / server_speedup
            if s < L:
                fb = {q: n * b for q, b in BYTES.items()}
                acc = {"fp32": acc_fp32, "fp16": acc_fp32 - fp16_loss,
                       "int8": acc_fp32 - int8_loss}
            else:
                fb = {}
                acc = {"fp32": acc_fp32}
            prof = Profile(head_ms=head_ms / 2, tail_ms=tail_ms, head_ms_1t=head_ms,
                           tail_ms_1t=tail_ms * 2, feature_bytes=fb, accuracy=acc,
                           param_distortion=r * r * 0.5, output_distortion=r * r * 0.3)
            variants.append(Variant(id=vid, pruning_ratio=r, split=s, head=head, tail=tail,
                                    feature_shape=shape, profile=prof))
    spec = InputSpec(modality="series", channels=["x"], window=64, rate_hz=50.0,
                     tokenizer={"type": "patch"})
    return Manifest(bundle_id=bundle_id, num_layers=L,
                    labels=[f"c{i}" for i in range(labels)], input=spec, variants=variants,
                    files=files, reference_hz=reference_hz)
