"""What the online controller knows about one gateway."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from edgetok.agent.coordinator.estimates import Ewma, StepDetector
from edgetok.agent.coordinator.residual import PathResiduals
from edgetok.agent.coordinator.trials import Trials
from edgetok.control import Decision


@dataclass(slots=True)
class GatewayState:
    """What the controller knows about one gateway (mutable, owned by the controller)."""

    log_gain: Ewma
    log_speed: Ewma
    rate: Ewma
    residual: PathResiduals  # what its windows measured beyond the plans, by path
    last_gain_ts: float = -math.inf
    last_speed_ts: float = -math.inf
    cell: str | None = None
    queue_depth: int = 0
    head_s: float = 0.0
    # (variant, s): its fallback's run as the gateway measures it, which sizes its reserve.
    fallback_run: tuple[str, float] | None = None
    deadline_s: float | None = None
    # When it last reported replies cut off under the option in force (Telemetry.cut_off).
    cut_off_ts: float = -math.inf
    energy_queue_mj: float = 0.0
    windows_done: int | None = None
    option: int | None = None
    decision: Decision | None = None
    seq: int = 0
    solved_ts: float = -math.inf
    solve_s: float = 0.0
    planned: tuple[float, ...] = field(default_factory=tuple)
    last_seen: float = -math.inf
    frame_overhead_s: float = 0.0  # per frame, beside bits / rate (see Telemetry)
    frame_floor_s: float = 0.0  # least time a frame takes to leave (see Telemetry)
    last_overhead_ts: float = -math.inf
    trials: Trials = field(default_factory=Trials)  # of the server path (trials.py)
    overhead_in_rate: bool = False  # no sensed rate: goodput carries the overhead
    gain_step: StepDetector = field(default_factory=StepDetector)
    speed_step: StepDetector = field(default_factory=StepDetector)  # lasting speed-ups
    # The first decision of the option and knobs in force: a decision republished only for
    # its expected latency runs the same windows, so what is learned per decision goes on.
    option_seq: int = -1
