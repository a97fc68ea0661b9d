"""The coordinator's config: the scenario tables plus the online controller's tunables.

The edge server embeds ControllerConfig in its own config (e.g. as [coordinator]).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgetok.agent.coordinator.model import Objective
from edgetok.agent.coordinator.scenario import BudgetTable, DeviceTable, LinkTable, ServerTable
from edgetok.agent.coordinator.solver import Prefer
from edgetok.control import PolicyName
from edgetok.settings import Strict


class ControllerConfig(Strict):
    """The coordinator's settings, embedded in the edge server's config as [coordinator]."""

    policy: PolicyName = Field("joint", description="Decision policy: joint, device-only, "
                               "server-only or fixed-split.")
    prefer: Prefer = Field(
        "energy", description="After the objective: 'energy' picks the least energy, then "
        "latency (each option stretched to the deadline at the lowest clock and power that "
        "make it); 'latency' the least latency within the energy budget, then energy.")
    objective: Objective = Field("accuracy", description="What to minimise: 'accuracy' "
                                 "(1 − profiled accuracy) or 'output_distortion'.")
    link: LinkTable = Field(description="Uplink; `gain` is the nominal (prior) channel gain.")
    device: DeviceTable = Field(description="Gateway CPU (the same for every gateway).")
    server: ServerTable = Field(default_factory=ServerTable,
                                description="Tail slowdown and base queueing delay.")
    budget: BudgetTable = Field(description="Deadline, per-window energy cap, privacy floor.")
    average_energy_mj: float | None = Field(
        None, gt=0, description="Long-term average energy per window (mJ), enforced with a "
        "Lyapunov virtual queue; omit to minimise distortion alone.")
    lyapunov_v: float = Field(
        1e5, gt=0, description="Drift-plus-penalty weight V (mJ² per unit distortion): larger "
        "stays closer to the best accuracy (gap O(1/V)) but lets the energy queue, i.e. the "
        "overspend before it is paid back, grow as O(V); it also scales the switch cost.")
    ewma_alpha: float = Field(
        0.3, gt=0, le=1, description="Smoothing of every estimate: larger reacts faster to a "
        "change and follows noise more.")
    gain_alpha_down: float = Field(
        0.8, gt=0, le=1, description="Smoothing of the gain estimate when a sample is below it: "
        "near 1 follows a fading dip at once (fewer missed deadlines), at the price of "
        "reacting to a single bad sample.")
    gain_rise_reports: int = Field(
        3, ge=0, description="Reports in a row above mean + gain_rise_sigma σ of the gain "
        "that make a lasting rise, not fading: the estimate restarts at the new level with "
        "its old spread, so a recovered link is used within as many reports instead of after "
        "the spread has decayed. 0: never.")
    gain_fall_reports: int = Field(
        3, ge=0, description="Reports in a row below mean - gain_rise_sigma σ of the gain that "
        "make a lasting fall: the estimate restarts at the new level with its old spread, so "
        "a link that dropped and stays there is planned at what it now carries, not far below "
        "it until the spread the drop added has decayed. 0: never.")
    gain_rise_sigma: float = Field(
        3.0, gt=0, description="How far beyond the gain's mean a report counts toward a rise "
        "or a fall, in σ: lower notices a smaller step, and takes more of a fade for one.")
    latency_margin: float = Field(
        0.1, ge=0, lt=1, description="Fraction of the deadline held back when planning, for "
        "estimation error: fewer missed deadlines, a little more energy.")
    lean_fallback: bool = Field(
        True, description="Let a transmitting option that the sure fallback reserve (1.5x "
        "the on-device run + 10 ms) leaves no time for the server's reply be planned with "
        "the lean one (1.0x + 10 ms), the decision telling the gateway so: a faster path, "
        "at the risk that a window the server fails to answer misses its deadline (the first "
        "window of 3 of 16 server hangs on a Pi-class gateway, e2e run 48). false: only "
        "the sure reserve, so a silent server never costs a deadline the device alone could "
        "meet.")
    gain_prior_sigma_db: float = Field(
        6.0, ge=0, description="Uncertainty of the gain (dB) before a gateway has reported "
        "any throughput: a newcomer is planned this conservatively at first.")
    gain_backoff_sigma: float = Field(
        2.0, ge=0, description="Plan against the gain this many standard deviations (of the "
        "smoothed log-gain) below its mean: robustness to fading, at some efficiency.")
    resolve_threshold: float = Field(
        0.1, gt=0, description="Relative change of an estimate (gain, compute speed, queue, "
        "bandwidth share) that triggers a re-solve.")
    resolve_interval_s: float = Field(5.0, gt=0, description="Re-solve at least this often.")
    speed_clip_sigma: float = Field(
        2.0, ge=0, description="A head-time report moves the gateway's compute-speed "
        "estimate by at most this many standard deviations (times ewma_alpha), so one slow "
        "report (a busy moment on the gateway) does not send it to the server; a lasting "
        "change is still followed within a few reports. 0: no limit.")
    speed_fall_reports: int = Field(
        3, ge=0, description="Head-time reports in a row at least twice as fast as the "
        "gateway's compute-speed estimate (and 3σ) that make a lasting speed-up: the estimate "
        "restarts at their level. A gateway the server runs for only reports a probe every "
        "few seconds, and clipped, it would take a minute to come back from a slow spell "
        "(16 gateways starting at once read 17-60x their profile). 0: never.")
    switch_cost: float = Field(
        0.005, ge=0, description="Distortion a different option must save before the gateway "
        "swaps variants (against flapping).")
    switch_energy_frac: float = Field(
        0.1, ge=0, description="Relative energy an equally good option must save to justify "
        "a swap.")
    actuation_tolerance: float = Field(
        0.05, ge=0, description="Relative change of clock or power worth a new decision.")
    republish_latency_frac: float = Field(
        0.5, gt=0, description="Relative change of a decision's expected latency, its option "
        "and knobs unchanged, that republishes it, so the prediction a gateway shows stays "
        "near what it measures: smaller keeps it closer, with more control messages (at 0.2, "
        "window-to-window noise on a CPU-capped gateway republished one every 3 s).")
    bandwidth_sharing: Literal["none", "equal"] = Field(
        "equal", description="How gateways on one cell share its bandwidth: 'equal' splits B "
        "among those transmitting, 'none' gives each the whole band.")
    cells: dict[str, str] = Field(
        default_factory=dict, description="Gateway id → cell id; overrides telemetry `cell`. "
        "Gateways with no cell have one of their own.")
    server_workers: int = Field(1, ge=1, description="Tail workers serving the gateways in "
                                "parallel (for the queueing model).")
    explore_margin: float = Field(
        0.15, ge=0, description="A gateway on its device whose per-frame overhead has not "
        "been measured for `explore_after_s` is sent to the best transmitting option for a "
        "trial when that plans at most this much worse (relative, in the preferred cost) "
        "and is as accurate: a near tie planned with one early, slow measurement is "
        "otherwise held until the estimate goes stale. 0: never.")
    explore_after_s: float = Field(
        15.0, gt=0, description="Age of the per-frame overhead before a trial, and the least "
        "time between two trials of one gateway.")
    stale_after_s: float = Field(
        30.0, gt=0, description="An estimate not refreshed for this long (gain, per-frame "
        "overhead, compute speed) relaxes to its prior over the next as long: the nominal "
        "gain, the fleet's overhead, the profile's speed; so an option left after one bad "
        "spell is tried again.")
