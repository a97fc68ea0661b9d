"""Whether the configured streams give the bundle's model the input it was built for."""

from __future__ import annotations

import math
from collections.abc import Sequence

from edgetok.gateway.config import StreamConfig
from edgetok.models.bundle import Manifest


def stream_problems(streams: Sequence[StreamConfig], manifest: Manifest) -> list[str]:
    """Every mismatch between a stream and the bundle's input spec, located as in a config
    error; empty when all match.

    Each such mismatch passed validation before and then failed every window at inference
    (ONNX Runtime: invalid dimensions), or, for the rate, ran silently on the wrong time scale.
    """
    spec = manifest.input
    problems: list[str] = []
    for i, s in enumerate(streams):
        where = f"streams.{i}"
        doubled = sorted({c for c in s.channels if s.channels.count(c) > 1})
        if doubled:
            problems.append(f"{where}.channels: {', '.join(doubled)} listed more than once")
        elif s.channels != spec.channels:
            problems.append(f"{where}.channels: {s.channels} but bundle {manifest.bundle_id} "
                            f"takes {spec.channels}, in that order (map other JSON field "
                            f"names with `fields`)")
        if s.window != spec.window:
            problems.append(f"{where}.window: {s.window} samples but the bundle's model takes "
                            f"{spec.window}")
        if not math.isclose(s.rate_hz, spec.rate_hz, rel_tol=1e-6):
            problems.append(f"{where}.rate_hz: {s.rate_hz:g} Hz but the bundle's model was "
                            f"trained at {spec.rate_hz:g} Hz")
    return problems
