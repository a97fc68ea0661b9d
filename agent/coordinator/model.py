"""The system model: discrete options from a bundle profile, and latency/energy of a choice.

SI units inside (s, J, Hz, W, bits); ms and mJ only at the edges. The forms are those of
DESIGN.md: T = C/f + S/r(p) + T_tail·slowdown + queue, E = κ·C·f² + p·S/r(p) and
r(p) = B·log2(1 + p·g/(N0·B)). At s = L nothing is transmitted (S = 0, no tail, no queue).
numpy only: this runs inside the edge server's control loop.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from edgetok.control import variant_id
from edgetok.frames import PRECISIONS, Precision
from edgetok.models.bundle import Manifest, Variant

log = logging.getLogger(__name__)

Objective = Literal["accuracy", "output_distortion"]
BYTES_PER_ELEMENT: dict[str, int] = {"fp32": 4, "fp16": 2, "int8": 1}
# At split = L nothing crosses the link, so the precision is moot; this is its label.
DEVICE_PRECISION: Precision = "fp32"


class ModelError(ValueError):
    """A bundle or scenario cannot be turned into a system model."""


@dataclass(frozen=True, slots=True)
class Option:
    """One discrete choice (ρ, s, q) with the inputs the model needs (SI units)."""

    variant: str
    pruning_ratio: float
    split: int
    precision: Precision
    c_head: float  # head cycles on the profiling machine
    s_bytes: float  # bytes on the uplink per window
    t_tail_s: float  # profiled tail latency, before the server slowdown
    distortion: float
    accuracy: float | None


@dataclass(frozen=True, slots=True, eq=False)
class OptionTable:
    """Every option of a bundle, with column arrays for vectorised solving."""

    bundle: str
    num_layers: int
    options: tuple[Option, ...]
    c_head: np.ndarray = field(repr=False)
    bits: np.ndarray = field(repr=False)
    t_tail: np.ndarray = field(repr=False)
    distortion: np.ndarray = field(repr=False)
    split: np.ndarray = field(repr=False)
    ratio: np.ndarray = field(repr=False)

    @classmethod
    def of(cls, bundle: str, num_layers: int, options: list[Option]) -> OptionTable:
        """Build the table and its columns from a list of options."""
        if not options:
            raise ModelError(f"bundle {bundle} yields no options")
        return cls(
            bundle=bundle, num_layers=num_layers, options=tuple(options),
            c_head=np.array([o.c_head for o in options], dtype=np.float64),
            bits=np.array([8.0 * o.s_bytes for o in options], dtype=np.float64),
            t_tail=np.array([o.t_tail_s for o in options], dtype=np.float64),
            distortion=np.array([o.distortion for o in options], dtype=np.float64),
            split=np.array([o.split for o in options], dtype=np.int64),
            ratio=np.array([o.pruning_ratio for o in options], dtype=np.float64),
        )

    @property
    def transmits(self) -> np.ndarray:
        """Options that send something to the server (split < L)."""
        return np.asarray(self.split < self.num_layers)

    def index(self, variant: str, precision: str) -> int:
        """Position of an option; KeyError if there is none."""
        for i, o in enumerate(self.options):
            if o.variant == variant and (o.precision == precision or o.split == self.num_layers):
                return i
        raise KeyError(f"no option {variant}/{precision}")


@dataclass(frozen=True, slots=True)
class Environment:
    """Link, device, server and budget for one gateway at one moment (SI units)."""

    bandwidth_hz: float
    gain: float
    noise_w_per_hz: float
    p_max_w: float
    f_min_hz: float
    f_max_hz: float
    kappa: float
    slowdown: float = 1.0
    queue_s: float = 0.0
    deadline_s: float = 1.0
    energy_budget_j: float = math.inf
    privacy_min_split: int = 0
    compute_scale: float = 1.0  # measured cycles / profiled cycles on this gateway
    local_wait_s: float = 0.0  # time a new window waits on the gateway before its head runs

    def __post_init__(self) -> None:
        """Reject values that make the model meaningless."""
        positive = {"bandwidth_hz": self.bandwidth_hz, "gain": self.gain,
                    "noise_w_per_hz": self.noise_w_per_hz, "p_max_w": self.p_max_w,
                    "f_min_hz": self.f_min_hz, "kappa": self.kappa, "slowdown": self.slowdown,
                    "deadline_s": self.deadline_s, "compute_scale": self.compute_scale}
        for name, value in positive.items():
            if not (value > 0 and math.isfinite(value)):
                raise ModelError(f"{name} must be positive and finite, got {value}")
        if self.f_max_hz < self.f_min_hz:
            raise ModelError(f"f_max_hz {self.f_max_hz} < f_min_hz {self.f_min_hz}")
        if self.queue_s < 0 or self.local_wait_s < 0 or not self.energy_budget_j > 0:
            raise ModelError("queue and wait must be >= 0 and the energy budget > 0")

    @property
    def noise_w(self) -> float:
        """Noise power over the band, N0·B."""
        return self.noise_w_per_hz * self.bandwidth_hz


def rate_bps(p: np.ndarray | float, env: Environment) -> np.ndarray:
    """Shannon uplink rate r(p) = B·log2(1 + p·g/(N0·B)), in bit/s."""
    snr = np.asarray(p, dtype=np.float64) * env.gain / env.noise_w
    return np.asarray(env.bandwidth_hz * np.log1p(snr) / math.log(2.0))


def power_for_rate(r: np.ndarray | float, env: Environment) -> np.ndarray:
    """Inverse of rate_bps: the power that achieves rate r (W)."""
    u = np.asarray(r, dtype=np.float64) / env.bandwidth_hz
    return np.asarray(np.expm1(u * math.log(2.0)) * env.noise_w / env.gain)


def gain_from_rate(r_bps: float, p_w: float, bandwidth_hz: float, noise_w_per_hz: float) -> float:
    """Channel gain g implied by a measured rate at a known power and bandwidth."""
    snr = math.expm1(r_bps / bandwidth_hz * math.log(2.0))
    return snr * noise_w_per_hz * bandwidth_hz / p_w


def fixed_latency(table: OptionTable, env: Environment,
                  queue_s: np.ndarray | float | None = None) -> np.ndarray:
    """The part of T no knob changes: T_tail·slowdown + queue for transmitting options."""
    q = env.queue_s if queue_s is None else queue_s
    server = table.t_tail * env.slowdown + q
    return np.asarray(np.where(table.transmits, server, 0.0) + env.local_wait_s)


def evaluate(table: OptionTable, env: Environment, f: np.ndarray, p: np.ndarray,
             queue_s: np.ndarray | float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Latency (s) and energy (J) of every option at clocks f and powers p (broadcast)."""
    c = table.c_head * env.compute_scale
    f = np.asarray(f, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    bits = table.bits
    tx = table.transmits
    shape = np.broadcast_shapes(c.shape, f.shape, p.shape)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        t_tx = np.where(tx, bits / rate_bps(np.maximum(p, 1e-300), env), 0.0)
    t = c / f + t_tx + fixed_latency(table, env, queue_s)
    e = env.kappa * c * f**2 + np.where(tx, p * t_tx, 0.0)
    return np.broadcast_to(t, shape), np.broadcast_to(e, shape)


def _distortion(v: Variant, precision: Precision,
                objective: Objective) -> tuple[float, float | None]:
    acc = v.profile.accuracy
    accuracy = acc.get(precision)
    if accuracy is None and acc:
        # A device-only variant sends nothing, so any profiled precision describes it.
        accuracy = acc.get(DEVICE_PRECISION, max(acc.values()))
    if objective == "accuracy" and accuracy is not None:
        return 1.0 - accuracy, accuracy
    return v.profile.output_distortion, accuracy


def _feature_bytes(v: Variant, precision: Precision) -> float | None:
    fb = v.profile.feature_bytes
    if fb:
        return float(fb[precision]) if precision in fb else None
    # No profiled size: what crosses the link is the feature tensor at that precision.
    return float(np.prod(v.feature_shape)) * BYTES_PER_ELEMENT[precision]


def options_from_manifest(manifest: Manifest, objective: Objective = "accuracy",
                          reference_hz: float | None = None) -> OptionTable:
    """Every (ρ, s, q) the bundle supports, with C_head, S, T_tail and D from its profile."""
    ref = manifest.reference_hz if reference_hz is None else reference_hz
    L = manifest.num_layers
    options: list[Option] = []
    for v in sorted(manifest.variants, key=lambda v: (v.pruning_ratio, v.split)):
        prof = v.profile
        head_ms = prof.head_ms_1t or prof.head_ms
        if v.split > 0 and head_ms <= 0:
            log.warning("variant %s has no head latency in its profile; skipped", v.id)
            continue
        c_head = head_ms / 1000.0 * ref if v.split > 0 else 0.0
        tail_s = (prof.tail_ms or prof.tail_ms_1t) / 1000.0 if v.split < L else 0.0
        vid = variant_id(v.pruning_ratio, v.split)
        if vid != v.id:
            log.warning("variant id %s does not follow r{ratio:.2f}-s{split} (%s)", v.id, vid)
        precisions: tuple[Precision, ...] = (DEVICE_PRECISION,) if v.split == L else PRECISIONS
        for q in precisions:
            s_bytes = 0.0 if v.split == L else _feature_bytes(v, q)
            if s_bytes is None:
                continue
            d, accuracy = _distortion(v, q, objective)
            options.append(Option(variant=v.id, pruning_ratio=v.pruning_ratio, split=v.split,
                                  precision=q, c_head=c_head, s_bytes=s_bytes, t_tail_s=tail_s,
                                  distortion=d, accuracy=accuracy))
    return OptionTable.of(manifest.bundle_id, L, options)
