"""Control-plane wire schemas: gateway telemetry and the coordinator's retained decision.

Shared by the gateway (publishes `edgetok/<gw>/telemetry`, applies `edgetok/<gw>/control`)
and the edge server (the reverse). Both are JSON objects validated with pydantic. A field is
only ever added, within one version, as something the other side may ignore: a payload's
unknown keys are dropped with a warning, so a fleet upgraded one side at a time keeps its
control loop. A change the other side must understand bumps CONTROL_VERSION.
"""

from __future__ import annotations

import json
import logging
from typing import Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    ValidationError,
)

from edgetok.frames import Precision

log = logging.getLogger(__name__)

CONTROL_VERSION = 1
# Payloads are small JSON; a bound stops a hostile message from making us parse megabytes.
MAX_CONTROL_BYTES = 256 * 1024

# The gateway's deadline fallback, shared so that the coordinator plans with the same rule:
# the server's reply must arrive by the deadline minus FALLBACK_MARGIN x the on-device run
# time, minus FALLBACK_SLACK_S, or the gateway gives up and runs the device variant.
# More margin falls back earlier than needed; less risks a fallback that misses the deadline.
FALLBACK_MARGIN = 1.5
# The lean reserve: the fallback's typical run, no margin. The coordinator plans with it only
# for an option that the sure reserve above leaves no time for the server's reply, and says
# so in the decision (`fallback_margin`). A fallback after a lean cutoff is late when its run
# takes longer than usual or the window stalled before it closed: the first window of 3 of
# 16 two-second server hangs on a 10% gateway (e2e run 48). After its first timeout a gateway
# stops waiting for a silent server (only a probe every PROBE_INTERVAL_S tries it), so what
# is exposed is the windows in flight when the server went silent and one probe per
# interval after. At 10% of a core the sure reserve (1.5 x 47 ms + 10) kept a 28 ms server
# path off a 100 ms deadline, and every window ran its 47 ms head on the device (e2e run 32).
LEAN_FALLBACK_MARGIN = 1.0
# Event-loop and thread hand-over costs that the measured run time does not show.
FALLBACK_SLACK_S = 0.01
# Before transmitting, the gateway predicts the server path from its sensed link rate and the
# server time of recent replies; a prediction within this fraction of the cutoff already goes
# to the device. Larger skips the server more often; smaller lets estimation error miss.
GUARD_MARGIN = 0.05

PolicyName = Literal["joint", "device-only", "server-only", "fixed-split"]
POLICY_NAMES: tuple[PolicyName, ...] = ("joint", "device-only", "server-only", "fixed-split")


M = TypeVar("M", bound=BaseModel)

# Unknown keys are warned about once per (payload type, sender, keys); the bound keeps a
# stream of hostile senders from growing the set without end (it then starts over).
MAX_UNKNOWN_WARNINGS = 1024
_warned_unknown: set[tuple[str, str, tuple[str, ...]]] = set()


class ControlError(ValueError):
    """A telemetry or control payload could not be decoded."""


def variant_id(pruning_ratio: float, split: int) -> str:
    """The bundle's variant id for a (pruning ratio, split) pair, e.g. 'r0.50-s3'."""
    return f"r{pruning_ratio:.2f}-s{split}"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Telemetry(_Wire):
    """What a gateway measured since its last report; every measurement is optional."""

    # JSON's Infinity and NaN pass `gt=0`; one such report made the coordinator's solve
    # raise, and the server with it.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    version: int = Field(CONTROL_VERSION, description="Schema version of this payload.")
    gateway: str = Field(min_length=1, description="Gateway id, as in the topic.")
    ts: float = Field(description="Unix time the report was made (s).")
    uplink_bps: float | None = Field(
        None, gt=0, description="Measured uplink goodput of feature frames (bit/s); None when "
        "nothing was sent in the interval.")
    tx_power_w: float | None = Field(
        None, ge=0, description="Transmit power in force while uplink_bps was measured (W).")
    link_bps: float | None = Field(
        None, gt=0, description="Link rate the radio reports now (bit/s: Wi-Fi tx bitrate, or "
        "the emulated tbf rate). When present, the coordinator plans the wire at this rate "
        "(plus frame_overhead_ms per frame) and uplink_bps is for information only.")
    frame_overhead_ms: float | None = Field(
        None, ge=0, description="Median over recent replies of the part of a round trip that "
        "is neither the frame's bits at link_bps nor the server's tail: encoding and "
        "publishing on the gateway, broker hops, the reply's way back (ms). Present only with "
        "a sensed link rate and frames (windows' or server probes') sent in the interval; "
        "the coordinator then takes the wire rate from link_bps and adds this per frame, "
        "where goodput alone would charge it to the rate.")
    frame_floor_ms: float | None = Field(
        None, ge=0, description="Median over the same replies of how long a frame took to "
        "leave when that was longer than its radio hold (else 0): a wait, such as a CPU "
        "quota refilling, that a longer hold would have hidden. The coordinator plans a "
        "frame of airtime t at max(t, floor) + frame_overhead_ms. Absent: 0.")
    cpu_hz: float | None = Field(None, gt=0, description="Current CPU clock of the head (Hz).")
    head_ms: dict[str, NonNegativeFloat] = Field(
        default_factory=dict, description="Head latency per variant id (ms), measured at "
        "cpu_hz: the median of the runs since the previous report only.")
    fallback_variant: str | None = Field(
        None, description="The on-device fallback of the decision in force (on the "
        "device too, where its windows run it).")
    fallback_ms: float | None = Field(
        None, gt=0, description="How long that fallback runs here at its clock (ms), as "
        "measured here: what the gateway sizes its reserve from, so the coordinator plans "
        "the same one. Absent until it has run (or been probed) here.")
    cut_off: int | None = Field(
        None, ge=0, description="Windows since the previous report whose server reply came "
        "after its cutoff but before its deadline, or that the link guard kept off the "
        "server because it would have: the server answers in time, but later than the "
        "fallback reserve lets it. (A reply after the deadline, such as a stalled server's "
        "backlog, is not counted.)")
    queue_depth: int = Field(0, ge=0, description="Windows waiting for the head right now.")
    windows_per_s: float | None = Field(
        None, ge=0, description="Rate at which the gateway produces windows (1/s).")
    windows_done: int | None = Field(
        None, ge=0, description="Cumulative windows finished since the gateway started.")
    energy_mj: float | None = Field(
        None, ge=0, description="Estimated mean energy per window over the interval (mJ).")
    latency_ms: float | None = Field(
        None, ge=0, description="Measured mean end-to-end latency per window (ms).")
    window_ms: dict[str, NonNegativeFloat] = Field(
        default_factory=dict, description="Median latency from window close to result of the "
        "windows finished since the previous report, by the variant of the decision they ran "
        "under (ms); a window that fell back to the device counts under the variant that sent "
        "it to the server. The coordinator learns from it how far each path's measured "
        "latency sits from its plan.")
    deadline_ms: float | None = Field(
        None, gt=0, description="The gateway's window deadline, when it differs from the "
        "coordinator's default (ms).")
    cell: str | None = Field(
        None, description="Radio cell / access point id; gateways on one cell share its "
        "uplink bandwidth.")
    applied_seq: int | None = Field(
        None, ge=0, description="Sequence number of the decision the gateway is running.")
    bundle: str | None = Field(None, description="Bundle id the gateway has loaded.")


class Decision(_Wire):
    """The coordinator's choice for one gateway, published retained on its control topic."""

    version: int = Field(CONTROL_VERSION, description="Schema version of this payload.")
    gateway: str = Field(min_length=1, description="Gateway id the decision is for.")
    epoch: int = Field(ge=0, description="Coordinator start time (ms since the Unix epoch); a "
                       "restarted coordinator has a larger epoch, so its seq may restart.")
    seq: int = Field(ge=0, description="Sequence number within the epoch; larger is newer.")
    ts: float = Field(description="Unix time the decision was made (s).")
    bundle: str = Field(description="Bundle id the variant belongs to.")
    variant: str = Field(description="Variant id, r{ratio:.2f}-s{split}.")
    pruning_ratio: float = Field(ge=0.0, lt=1.0, description="Pruning ratio of the variant.")
    split: int = Field(ge=0, description="Layers on the device: 0 = server only, L = device only.")
    precision: Precision = Field(description="Feature precision on the uplink.")
    cpu_hz: float = Field(gt=0, description="CPU clock for the head (Hz).")
    tx_power_w: float = Field(
        ge=0, description="Transmit power (W); 0 when nothing is transmitted (split = L): "
        "leave the radio at its default.")
    latency_ms: float = Field(ge=0, description="Predicted end-to-end latency per window at "
                              "the link gain's mean, what the median window sees, with what "
                              "this gateway's windows on this path measured beyond their "
                              "plans (ms); the deadline is checked against a gain backed off "
                              "for fading, by the model alone.")
    energy_mj: float = Field(ge=0, description="Predicted device energy per window (mJ).")
    distortion: float = Field(description="Predicted distortion (accuracy loss or output "
                              "distortion, as configured).")
    accuracy: float | None = Field(None, description="Profiled accuracy of the choice, if known.")
    feasible: bool = Field(description="False when no option met the deadline and energy "
                           "budget; this is then the option with the smallest overrun.")
    policy: PolicyName = Field(description="Policy that made the decision.")
    reason: str = Field("", description="Why it was (re)made: initial, estimates-moved, "
                        "periodic, forced, explore (a trial of the server path near a tie), "
                        "cut-off (the gateway cut replies off under the sure reserve), "
                        "infeasible.")
    fallback_variant: str | None = Field(
        None, description="On-device variant (split = L) to run when the server cannot answer "
        "in time; None: the on-device variant of the same pruning ratio.")
    fallback_cpu_hz: float | None = Field(
        None, gt=0, description="CPU clock for a fallback run (Hz); None: the decision's.")
    fallback_margin: float | None = Field(
        None, gt=0, description="The reserve kept back for a fallback run, in multiples of "
        "its measured run time (plus a fixed 10 ms): 1.5 (sure) normally, 1.0 (lean) for a "
        "transmitting option the sure reserve leaves no time; None: 1.5.")
    server_probes: bool = Field(
        True, description="Whether the gateway's server probes (gateway "
        "server_probe_interval_s) are of use: false when the policy allows no transmitting "
        "option, as device-only's.")

    def supersedes(self, other: Decision | None) -> bool:
        """True if this decision is newer than `other` (by epoch, then seq)."""
        return other is None or (self.epoch, self.seq) > (other.epoch, other.seq)


def _encode(model: BaseModel) -> bytes:
    return json.dumps(model.model_dump(mode="json"), separators=(",", ":")).encode()


def _decode(data: bytes | str, model: type[M]) -> M:
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > MAX_CONTROL_BYTES:
        raise ControlError(f"{model.__name__} payload of {len(raw)} bytes is over the "
                           f"{MAX_CONTROL_BYTES}-byte limit")
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise ControlError(f"{model.__name__} is not JSON: {exc}") from exc
    if isinstance(obj, dict) and obj.get("version", CONTROL_VERSION) != CONTROL_VERSION:
        raise ControlError(f"{model.__name__} version {obj.get('version')!r} is not supported "
                           f"(want {CONTROL_VERSION})")
    if isinstance(obj, dict):
        obj = _known_keys(obj, model)
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}"
                             for e in exc.errors())
        raise ControlError(f"bad {model.__name__}: {problems}") from exc


def _known_keys(obj: dict[str, object], model: type[M]) -> dict[str, object]:
    """`obj` without the keys `model` does not know, warning once about them: a sender
    newer than this side adds fields it may ignore (window_ms, frame_floor_ms)."""
    unknown = tuple(sorted(k for k in obj if k not in model.model_fields))
    if not unknown:
        return obj
    key = (model.__name__, str(obj.get("gateway")), unknown)
    if key not in _warned_unknown:
        if len(_warned_unknown) >= MAX_UNKNOWN_WARNINGS:
            _warned_unknown.clear()
        _warned_unknown.add(key)
        log.warning("%s for gateway %s carries fields this version does not know, ignored: "
                    "%.200s (is the sender newer?)", model.__name__, key[1], ", ".join(unknown))
    return {k: v for k, v in obj.items() if k in model.model_fields}


def encode_telemetry(t: Telemetry) -> bytes:
    """JSON bytes for the telemetry topic."""
    return _encode(t)


def decode_telemetry(data: bytes | str) -> Telemetry:
    """Parse a telemetry payload; ControlError on anything malformed."""
    return _decode(data, Telemetry)


def encode_decision(d: Decision) -> bytes:
    """JSON bytes for the retained control topic."""
    return _encode(d)


def decode_decision(data: bytes | str) -> Decision:
    """Parse a control payload; ControlError on anything malformed."""
    return _decode(data, Decision)
