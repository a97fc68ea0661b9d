"""The online controller: per-gateway estimates from telemetry, re-solving, Lyapunov, hysteresis.

Pure: no I/O, no clock of its own (callers pass `now`). The edge server feeds it telemetry and
its own queueing measurements and publishes the Decisions it returns, retained, on
`edgetok/<gw>/control`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import fields, replace
from typing import Any

import numpy as np

from edgetok.agent.coordinator.config import ControllerConfig
from edgetok.agent.coordinator.estimates import Ewma, StepDetector, relaxed
from edgetok.agent.coordinator.fallback import fallback_option, fallback_reserve
from edgetok.agent.coordinator.model import (
    Environment,
    OptionTable,
    evaluate,
    gain_from_rate,
    options_from_manifest,
)
from edgetok.agent.coordinator.overhead import frame_overhead
from edgetok.agent.coordinator.policies import make_policy
from edgetok.agent.coordinator.residual import TRANSMIT, PathResiduals
from edgetok.agent.coordinator.solver import FEAS_RTOL, Solution, rank, solve_options
from edgetok.agent.coordinator.state import GatewayState
from edgetok.control import FALLBACK_MARGIN, LEAN_FALLBACK_MARGIN, Decision, Telemetry
from edgetok.models.bundle import Manifest

log = logging.getLogger(__name__)

# The least spread of a gateway's log compute speed that clipping assumes: head times that
# agree within 10% do not make a 15% report an outlier.
SPEED_SIGMA_FLOOR = 0.1
# A speed-up counts as lasting only from reports at least twice as fast as the estimate (in
# log): a 10% gateway's heads fall on a 10 ms quota grid (29, 38 or 48 ms), and three
# reports in a row 3σ faster, σ being small once settled, restarted it at 1.6x its profile
# where its windows took 3.5x, and it ran its device (e2e run 42, pi-link-0.5).
SPEED_STEP_FLOOR = math.log(2.0)
# Above this utilisation the M/M/1 wait explodes; we cap it there and call the server full.
MAX_UTILISATION = 0.95
# An option in force with the lean reserve goes back to the sure one only once its windows
# fit the sure cutoff with this share of the planning deadline to spare: at 10% of a core,
# with none, the reserve flipped between the two every few seconds on the 10 ms grid of
# the measured runs (e2e run 36, cpu-10%).
LEAN_RELEASE_FRAC = 0.1
# Passes of step() that re-solve gateways whose cell-mates started or stopped transmitting;
# more passes settle a crowded cell within one round at the cost of more solves.
MAX_SHARE_PASSES = 3
# A gateway silent for this many stale_after_s has gone without its Will (power cut, a
# broker that lost it): forgotten, it stops holding a share of its cell's bandwidth.
FORGET_AFTER_STALE = 4
# Expected latencies this close to 0 are compared against this instead (ms): a residual below
# zero can take one there, and a relative change of almost nothing would republish on noise.
REPUBLISH_FLOOR_MS = 1.0


class OnlineController:
    """Per-gateway decisions that follow the measured link, compute speed and server load."""

    def __init__(self, config: ControllerConfig, manifest: Manifest,
                 epoch_ms: int | None = None) -> None:
        """Build the option table and the policy once; `epoch_ms` defaults to now."""
        self.config = config
        self.table: OptionTable = options_from_manifest(manifest, config.objective,
                                                        config.device.reference_hz)
        if config.budget.privacy_min_split > self.table.num_layers:
            raise ValueError(f"privacy_min_split {config.budget.privacy_min_split} > "
                             f"{self.table.num_layers} layers")
        self.nominal = self._environment(config.link.gain, config.link.bandwidth_hz, 1.0, 0.0,
                                         config.budget.deadline_ms / 1000.0)
        self.policy = make_policy(config.policy, self.table, self.nominal)
        self.epoch_ms = int(time.time() * 1000) if epoch_ms is None else epoch_ms
        self.server_queue = Ewma(config.ewma_alpha)
        # log(measured tail / profiled tail): the server's own slowdown, from the tails it ran.
        self.server_slowness = Ewma(config.ewma_alpha)
        self.last_tail_ts = -math.inf
        self._tail_s = {o.variant: o.t_tail_s for o in self.table.options if o.t_tail_s > 0}
        self.gateways: dict[str, GatewayState] = {}
        self._head_cycles = {o.variant: o.c_head for o in self.table.options if o.c_head > 0}
        self.solves = 0
        self.solve_seconds = 0.0  # wall time inside decide() when it solved: for metrics
        self.solve_errors = 0
        # One sequence for all gateways: a gateway forgotten (its Will after a network blip)
        # and heard again gets decisions above any it ran, so it never ignores them as old.
        self.seq = 0

    def _environment(self, gain: float, bandwidth: float, scale: float, wait_s: float,
                     deadline_s: float, slowdown: float | None = None) -> Environment:
        c = self.config
        return Environment(
            bandwidth_hz=bandwidth, gain=gain, noise_w_per_hz=c.link.noise_w_per_hz,
            p_max_w=c.link.p_max_w, f_min_hz=c.device.f_min_hz, f_max_hz=c.device.f_max_hz,
            kappa=c.device.kappa, slowdown=c.server.slowdown if slowdown is None else slowdown,
            queue_s=0.0,
            deadline_s=deadline_s, energy_budget_j=c.budget.energy_mj / 1000.0,
            privacy_min_split=c.budget.privacy_min_split, compute_scale=scale,
            local_wait_s=wait_s)

    def _state(self, gateway: str) -> GatewayState:
        st = self.gateways.get(gateway)
        if st is None:
            a = self.config.ewma_alpha
            prior = (self.config.gain_prior_sigma_db * math.log(10) / 10) ** 2
            speed = Ewma(a, clip_z=self.config.speed_clip_sigma, clip_floor=SPEED_SIGMA_FLOOR)
            residual = PathResiduals(a, self.config.speed_clip_sigma)
            st = self.gateways[gateway] = GatewayState(Ewma(a, var=prior), speed, Ewma(a),
                                                       residual)
            st.speed_step = StepDetector(fall_reports=self.config.speed_fall_reports,
                                         floor=SPEED_STEP_FLOOR)
            st.gain_step = StepDetector(self.config.gain_rise_reports,
                                        self.config.gain_fall_reports, self.config.gain_rise_sigma)
        return st

    def _cell(self, gateway: str) -> str:
        st = self.gateways.get(gateway)
        return self.config.cells.get(gateway) or (st.cell if st and st.cell else f"@{gateway}")

    def _transmitting(self, gateway: str) -> bool:
        st = self.gateways.get(gateway)
        return bool(st and st.decision and st.decision.split < self.table.num_layers)

    def _bandwidth(self, gateway: str, include_self: bool) -> float:
        """Bandwidth one gateway gets on its cell, counting the others now transmitting."""
        b = self.config.link.bandwidth_hz
        if self.config.bandwidth_sharing == "none":
            return b
        cell = self._cell(gateway)
        others = sum(1 for g in self.gateways
                     if g != gateway and self._cell(g) == cell and self._transmitting(g))
        return b / (others + (1 if include_self else 0) or 1)

    def observe(self, t: Telemetry, now: float) -> None:
        """Fold one telemetry report into the gateway's estimates (and its energy queue)."""
        st = self._state(t.gateway)
        st.last_seen = now
        if t.cell is not None:
            st.cell = t.cell
        if t.deadline_ms is not None:
            st.deadline_s = t.deadline_ms / 1000.0
        # With a sensed rate, the wire runs at that rate and the per-frame overhead measured
        # against it is added per frame; until the gateway has replies enough to report one,
        # the last overhead stands (goodput over its first frames read a 50 Mbit/s link as
        # 0.4, e2e run 20). Without a sensed rate, measured goodput, which carries the
        # overhead in the rate.
        bps = t.link_bps
        if bps is not None:
            if t.frame_overhead_ms is not None:
                st.frame_overhead_s = t.frame_overhead_ms / 1000.0
                st.frame_floor_s = (t.frame_floor_ms or 0.0) / 1000.0
                st.last_overhead_ts = now
            st.overhead_in_rate = False
        elif t.uplink_bps is not None:
            st.frame_overhead_s = st.frame_floor_s = 0.0
            st.overhead_in_rate = True
            bps = t.uplink_bps
        if bps is not None:
            p = t.tx_power_w or (st.decision.tx_power_w if st.decision else 0.0)
            p = p or self.config.link.p_max_w
            g = gain_from_rate(bps, p, self._bandwidth(t.gateway, True),
                               self.config.link.noise_w_per_hz)
            if g > 0:
                step = self._fold_gain(st, math.log(g))
                if step:
                    log.info("gateway %s: link gain %s for good; planning at the new level",
                             t.gateway, "rose" if step > 0 else "fell")
                st.last_gain_ts = now
        if t.cpu_hz is not None:
            for variant, ms in t.head_ms.items():
                cycles = self._head_cycles.get(variant)
                if cycles and ms > 0:
                    # Slow reports are clipped (one busy moment must not send the gateway
                    # to the server); a run of fast ones is a slow spell that ended.
                    st.speed_step.update(st.log_speed, math.log(ms / 1000.0 * t.cpu_hz / cycles))
                    st.last_speed_ts = now
        if t.fallback_variant is not None and t.fallback_ms is not None:
            st.fallback_run = (t.fallback_variant, t.fallback_ms / 1000.0)
        if st.decision is not None and st.decision.variant in t.head_ms:
            st.head_s = t.head_ms[st.decision.variant] / 1000.0
        st.queue_depth = t.queue_depth
        if t.windows_per_s is not None:
            st.rate.update(t.windows_per_s)
        self._energy_queue(st, t)
        if t.cut_off and self._of_option_in_force(st, t):
            st.cut_off_ts = now
        self._fold_residual(t, st, now)

    @staticmethod
    def _of_option_in_force(st: GatewayState, t: Telemetry) -> bool:
        """Whether the report's windows ran the option in force (a gateway still on an older
        decision of the same option runs the same windows)."""
        d = st.decision
        return (d is not None and st.option is not None and t.applied_seq is not None
                and st.option_seq <= t.applied_seq <= d.seq)

    def _fold_residual(self, t: Telemetry, st: GatewayState, now: float) -> None:
        """Fold the measured latency of the decision in force into its path's residual
        (`residual.py`), against the model's plan at the estimates just folded in, at the
        decision's clock and power, without the residual itself; not the first report of an
        option, nor before the path's own estimates exist (`_plannable`)."""
        d, i, res = st.decision, st.option, st.residual
        if (d is None or i is None or not self._of_option_in_force(st, t)
                or d.variant not in t.window_ms):
            return
        if res.first_report(st.option_seq):
            return
        path = bool(self.table.transmits[i])
        if not self._plannable(st, path):
            return
        n = len(self.table.options)
        f = np.full(n, t.cpu_hz or d.cpu_hz)
        p = np.full(n, t.tx_power_w or d.tx_power_w or self.config.link.p_max_w)
        env = self._planned(t.gateway, st, now)
        planned = self._bare_latency(st, env, self._queue(t.gateway, st, env.slowdown), f, p,
                                     now)[i]
        res.fold(path, t.window_ms[d.variant] / 1000.0 - float(planned), now)

    def _plannable(self, st: GatewayState, path: bool) -> bool:
        """Whether the gateway has measured what the model plans `path` with: its compute
        speed on the device; its link, and its per-frame overhead where it senses its rate,
        on a transmitting path. Before that, a residual would take in what those estimates
        are about to explain, and keep it: a 25% gateway learned +4 ms on the server path
        before its overhead (1.6 ms + a 3 ms floor) came in, counted both, and ran its
        device for the rest of the round at 8-12 ms where the server took 6-7 (e2e run 25).
        """
        if not path:
            return math.isfinite(st.last_speed_ts)
        return math.isfinite(st.last_gain_ts) and (st.overhead_in_rate
                                                   or math.isfinite(st.last_overhead_ts))

    def _residual(self, by_path: tuple[float, float]) -> np.ndarray:
        """Per option, its path's residual (s), from the (device, transmit) pair."""
        device, transmit = by_path
        return np.where(self.table.transmits, transmit, device)

    def _residual_by_path(self, st: GatewayState, now: float) -> tuple[float, float]:
        """The (device, transmit) residual (s) to plan with now (`residual.py`)."""
        return st.residual.by_path(now, self.config.stale_after_s)

    def _fold_gain(self, st: GatewayState, x: float) -> int:
        """Fold one log-gain sample in; +1 if it completed a lasting rise, -1 a fall, else 0.

        Good news never lowers the plan (mean - k·σ): a sample above the mean widens σ as if
        it were fading, and a link stepping up from 0.5 to 50 Mbit/s was planned worse for
        two reports than before it recovered (run 12's pi-trace: the gateway left the server
        for the device, at twice its usual latency). Such a sample keeps the plan where it was.
        """
        est, k = st.log_gain, self.config.gain_backoff_sigma
        above = est.count > 0 and x > est.mean
        plan = self._backed_off(est.mean, est)
        step = st.gain_step.update(est, x, self.config.gain_alpha_down)
        if above and k > 0 and self._backed_off(est.mean, est) < plan:
            est.var = ((est.mean - plan) / k) ** 2
        return step

    def _backed_off(self, mean: float, est: Ewma) -> float:
        """The log gain planned against: `gain_backoff_sigma` σ below `mean`."""
        return mean - self.config.gain_backoff_sigma * math.sqrt(est.var)

    def _energy_queue(self, st: GatewayState, t: Telemetry) -> None:
        """Q ← max(Q + Σ(E − Ē), 0) over the windows finished since the last report."""
        avg = self.config.average_energy_mj
        if avg is None:
            return
        n = 1
        if t.windows_done is not None:
            n = 0 if st.windows_done is None else max(t.windows_done - st.windows_done, 0)
            st.windows_done = t.windows_done
        e = t.energy_mj if t.energy_mj is not None else (
            st.decision.energy_mj if st.decision else None)
        if e is not None and n:
            st.energy_queue_mj = max(st.energy_queue_mj + n * (e - avg), 0.0)

    def observe_server(self, queue_ms: float) -> None:
        """Fold in the tail service's measured queueing delay (ms)."""
        self.server_queue.update(max(queue_ms, 0.0))

    def observe_tail(self, variant: str, ms: float, now: float) -> None:
        """Fold in one tail this server ran (ms): against the profile it gives the slowdown
        (a busy server, fewer threads than at profiling time), which the plans then use
        instead of the configured `server.slowdown`."""
        prof = self._tail_s.get(variant)
        if prof and ms > 0:
            self.server_slowness.update(math.log(ms / 1000.0 / prof))
            self.last_tail_ts = now

    def slowdown(self, now: float) -> float:
        """The server's tail slowdown: measured, relaxed to the configured one once stale."""
        prior = math.log(self.config.server.slowdown)
        return math.exp(relaxed(self.server_slowness.value(prior), prior, self.last_tail_ts,
                                now, self.config.stale_after_s))

    def forget(self, gateway: str) -> None:
        """Drop a gateway (it went offline); its retained decision stays on the broker."""
        self.gateways.pop(gateway, None)

    def _gain(self, st: GatewayState, now: float, backed_off: bool = True) -> float:
        nominal = math.log(self.config.link.gain)
        mean = st.log_gain.value(nominal)
        if backed_off:
            mean = self._backed_off(mean, st.log_gain)
        return math.exp(relaxed(mean, nominal, st.last_gain_ts, now, self.config.stale_after_s))

    def _speed(self, st: GatewayState, now: float) -> float:
        """The compute-time scale against the profile; relaxed to the profile once stale: a
        gateway kept on the server after a slow spell (say, 16 gateways starting at once on
        one machine) runs no head, so would otherwise trust that spell forever."""
        return math.exp(relaxed(st.log_speed.value(0.0), 0.0, st.last_speed_ts, now,
                                self.config.stale_after_s))

    def _queue(self, gateway: str, st: GatewayState, slow: float) -> np.ndarray:
        """Server queueing per option: measured delay or M/M/1 under everyone's load."""
        workers = self.config.server_workers
        load = rate_sum = 0.0
        for g, other in self.gateways.items():
            if g != gateway and other.option is not None and self._transmitting(g):
                lam = other.rate.value(0.0)
                load += lam * self.table.t_tail[other.option] * slow
                rate_sum += lam
        lam = st.rate.value(0.0)
        own = lam * self.table.t_tail * slow
        util = (load + own) / workers
        mean_service = (load + own) / max(rate_sum + lam, 1e-12)
        with np.errstate(divide="ignore", invalid="ignore"):
            wait = np.where(util < MAX_UTILISATION, util / (1.0 - util),
                            MAX_UTILISATION / (1.0 - MAX_UTILISATION)) * mean_service / workers
        measured = self.server_queue.value(0.0) / 1000.0
        base = self.config.server.queue_ms / 1000.0
        return np.asarray(np.maximum(wait, max(measured, base)))

    def environment(self, gateway: str, now: float, expected: bool = False
                    ) -> tuple[Environment, np.ndarray]:
        """The current estimated environment of a gateway and its per-option queueing:
        planned with the gain backed off for fading, or, `expected`, at its mean."""
        st = self._state(gateway)
        env = self._planned(gateway, st, now)
        if expected:
            env = self._at_mean(st, env, now)
        return env, self._costs(st, env, self._queue(gateway, st, env.slowdown), now)

    def _planned(self, gateway: str, st: GatewayState, now: float) -> Environment:
        """The gateway's environment with the gain backed off for fading."""
        wait = st.queue_depth * st.head_s
        deadline = self._deadline(st) * (1.0 - self.config.latency_margin)
        return self._environment(self._gain(st, now), self._bandwidth(gateway, True),
                                 self._speed(st, now), wait, deadline, self.slowdown(now))

    def _at_mean(self, st: GatewayState, env: Environment, now: float) -> Environment:
        """`env` at the gain's mean: what the median window sees."""
        return replace(env, gain=self._gain(st, now, backed_off=False))

    def _costs(self, st: GatewayState, env: Environment, server: np.ndarray,
               now: float, margin: float = FALLBACK_MARGIN) -> np.ndarray:
        """Per option, the fixed time beside compute and airtime: the server's queueing
        (`server`), the frame's overhead and the fallback reserve at `margin`. Applied to
        transmitting options only, as the server queue is (fixed_latency)."""
        return server + self._overhead(st, env, now) + self._reserve(st, env, margin)

    def _lean_where_needed(self, st: GatewayState, env: Environment, server: np.ndarray,
                           sol: Solution, expected: np.ndarray, now: float
                           ) -> tuple[Solution, np.ndarray]:
        """`sol` with every transmitting option whose reply the sure reserve cuts off and
        the lean one keeps solved with the lean reserve instead; and which those are.

        The sure reserve costs nothing where the server's reply fits before its cutoff; only
        where it does not is the lean one worth its risk (edgetok.control). Whether it fits
        is asked of the model (feasibility) and of what the path's windows measured
        (`expected`, without the reserve): the gateway cuts replies off by their measured
        times, and a plan 0.5 ms inside its deadline on the model alone, 5-10 ms outside on
        the windows, kept a 10% gateway's sure cutoff and sent a third of its windows to the
        fallback (e2e run 35, cpu-10%). The option in force on the lean reserve keeps it
        until its windows fit the sure cutoff with LEAN_RELEASE_FRAC to spare. And the
        gateway says so itself (`Telemetry.cut_off`): replies it cut off under the option
        in force count, at once, for that option, and go on counting for `stale_after_s`.
        The windows' residual follows a lasting change over several reports (clipped against
        outliers), and a 10% gateway kept its replies off the server for 10 s of an e2e
        round before it moved (run 37, pi-link-50); counted for one solve only, the model,
        which had not yet learnt what the gateway's windows take, released the lean reserve
        a second later, and the reserve flipped every few seconds (run 43, cpu-10%)."""
        lean = np.zeros(sol.feasible.shape, dtype=bool)
        limit = np.full(lean.shape, env.deadline_s * (1 + FEAS_RTOL))
        if st.option is not None and st.decision is not None \
                and st.decision.fallback_margin == LEAN_FALLBACK_MARGIN:
            limit[st.option] = env.deadline_s * (1 - LEAN_RELEASE_FRAC)
        cut_off = expected + self._reserve(st, env) > limit
        if st.option is not None and now - st.cut_off_ts < self.config.stale_after_s:
            cut_off[st.option] = True
        todo = self.table.transmits & (~sol.feasible | cut_off)
        if not self.config.lean_fallback or not todo.any():
            return sol, lean
        queue = self._costs(st, env, server, now, margin=LEAN_FALLBACK_MARGIN)
        alt = solve_options(self.table, env, queue, self.config.prefer)
        lean = todo & alt.feasible
        if not lean.any():
            return sol, lean
        merged = {f.name: np.where(lean, getattr(alt, f.name), getattr(sol, f.name))
                  for f in fields(Solution)}
        return Solution(**merged), lean

    def _overhead(self, st: GatewayState, env: Environment, now: float) -> np.ndarray:
        """Per option, what a frame costs beside its bits at r(p) and the server
        (`overhead.py`)."""
        return frame_overhead(st, self.gateways.values(), self.table, env, now,
                              self.config.stale_after_s)

    def fallback(self, env: Environment) -> int:
        """The on-device option a gateway runs when the server cannot answer in time."""
        return fallback_option(self.table, env)

    def fallback_reserve(self, env: Environment, fallback: int | None = None,
                         margin: float = FALLBACK_MARGIN, run_s: float | None = None,
                         deadline_s: float | None = None) -> np.ndarray:
        """Per option, the time the gateway keeps back for its fallback (s)."""
        return fallback_reserve(self.table, env, fallback, margin, run_s, deadline_s)

    def _reserve(self, st: GatewayState, env: Environment,
                 margin: float = FALLBACK_MARGIN) -> np.ndarray:
        """Per option, the reserve this gateway will keep (s): from its measured fallback
        run once reported, held against its real deadline, as the gateway does."""
        return self.fallback_reserve(env, margin=margin, run_s=self._fallback_run_s(st, env),
                                     deadline_s=self._deadline(st))

    def _fallback_run_s(self, st: GatewayState, env: Environment) -> float | None:
        """The fallback's run as the gateway measured it, when it is the fallback planned
        now; else None (the model's). The gateway sizes its reserve from its own runs, and
        the coordinator's speed estimate, fed by a probe per report and clipped against
        outliers, took 10 s to agree with them at 10% of a core (e2e run 34)."""
        if st.fallback_run is None:
            return None
        variant, run_s = st.fallback_run
        return run_s if variant == self.table.options[self.fallback(env)].variant else None

    def _deadline(self, st: GatewayState) -> float:
        return st.deadline_s or self.config.budget.deadline_ms / 1000.0

    def _penalty(self, st: GatewayState, sol: Solution) -> tuple[np.ndarray, float]:
        """Per-option drift-plus-penalty score and the margin a switch must beat."""
        c = self.config
        if c.average_energy_mj is None:
            return self.table.distortion, c.switch_cost
        return (c.lyapunov_v * self.table.distortion + st.energy_queue_mj * sol.energy * 1e3,
                c.lyapunov_v * c.switch_cost)

    def _measured_ts(self, st: GatewayState) -> float:
        """When the gateway's frames last measured the transmitting path: their overhead,
        and their windows' latency if it reports them (what a trial waits for)."""
        if not st.residual.est:
            return st.last_overhead_ts
        return min(st.last_overhead_ts, st.residual.last_ts(TRANSMIT))

    def _due(self, st: GatewayState, env: Environment, queue: np.ndarray,
             residual: tuple[float, float], now: float) -> str:
        if st.decision is None:
            return "initial"
        if st.trials.left is not None and self._measured_ts(st) > st.trials.last_ts:
            return "estimates-moved"  # a trial's frames have measured what it was for
        if st.cut_off_ts > st.solved_ts and st.decision.fallback_margin == FALLBACK_MARGIN:
            return "cut-off"  # the sure reserve cut replies off: the lean one may keep them
        if now - st.solved_ts >= self.config.resolve_interval_s:
            return "periodic"
        now_est = (env.gain, env.compute_scale, float(queue.max()) + 1e-6,
                   env.bandwidth_hz, env.deadline_s, st.energy_queue_mj + 1.0)
        thr = self.config.resolve_threshold
        if any(abs(math.log(a / b)) > math.log1p(thr) for a, b in zip(now_est, st.planned,
                                                                     strict=True)):
            return "estimates-moved"
        # The residuals can be 0 or below, so they are compared against the latency in force.
        moved = (abs(a - b) for a, b in zip(residual, st.residual.planned, strict=True))
        if max(moved) > thr * st.decision.latency_ms / 1000.0:
            return "estimates-moved"
        return ""

    def decide(self, gateway: str, now: float, force: bool = False) -> Decision | None:
        """Re-solve for one gateway if due; a new Decision when it changed, else None."""
        started = time.perf_counter()
        st = self._state(gateway)
        env = self._planned(gateway, st, now)
        server = self._queue(gateway, st, env.slowdown)  # shared by both gains below
        queue = self._costs(st, env, server, now)
        residual = self._residual_by_path(st, now)
        reason = self._due(st, env, queue, residual, now) or ("forced" if force else "")
        if not reason:
            return None
        prefer = self.config.prefer
        sol = solve_options(self.table, env, queue, prefer)
        expected = self._expected_latency(st, env, server, sol, residual, now)
        sol, lean = self._lean_where_needed(st, env, server, sol, expected, now)
        if lean.any():  # those options' clocks and powers are the lean solve's
            expected = self._expected_latency(st, env, server, sol, residual, now)
        fb = self.fallback(env)
        penalty, margin = self._penalty(st, sol)
        seen = replace(sol, latency=expected)
        best = int(rank(self.table, seen, self.policy.allowed, penalty, prefer)[0])
        cost = sol.energy if prefer == "energy" else seen.latency  # what a swap would save
        after = self.config.explore_after_s
        held = st.trials.standing(st.option, sol.feasible, self._measured_ts(st), now, after)
        if held is not None:
            best = held
        else:
            # The re-solve that ends a trial judges a swap against the option it left, or
            # the trial would hold every near tie on the server by the rule below.
            cur = st.option if st.trials.left is None else st.trials.left
            if (cur is not None and cur != best and self.policy.allowed[cur]
                    and sol.feasible[cur] and penalty[cur] <= penalty[best] + margin
                    and cost[cur] <= cost[best] * (1 + self.config.switch_energy_frac)):
                best = cur  # not worth a variant swap
            tx = self.table.transmits
            st.trials.end(back_on_device=not tx[best])
            if not tx[best] and not st.overhead_in_rate:
                eligible = tx & self.policy.allowed & sol.feasible & \
                    (penalty <= penalty[best] + margin)
                trial = st.trials.begin(best, eligible, cost, self.config.explore_margin,
                                        st.last_overhead_ts, now, after)
                if trial is not None:
                    best, reason = trial, "explore"
        st.solved_ts = now
        st.solve_s = time.perf_counter() - started
        self.solves += 1
        self.solve_seconds += st.solve_s
        st.planned = (env.gain, env.compute_scale, float(queue.max()) + 1e-6,
                      env.bandwidth_hz, env.deadline_s, st.energy_queue_mj + 1.0)
        st.residual.planned = residual
        # Feasible against the real deadline: the margin is for planning only.
        feasible = bool(sol.latency[best] <= self._deadline(st) * (1 + FEAS_RTOL)
                        and sol.energy[best] <= env.energy_budget_j * (1 + FEAS_RTOL))
        fb_variant = self.table.options[fb].variant
        expected_ms = max(float(seen.latency[best]) * 1e3, 0.0)  # (a residual can be < 0)
        reserve_margin = (LEAN_FALLBACK_MARGIN if lean[best] else FALLBACK_MARGIN) \
            if self.table.transmits[best] else None
        change = self._change(st, best, sol, feasible, fb_variant, reserve_margin, expected_ms)
        if not change:
            return None
        o = self.table.options[best]
        f, p = float(sol.f[best]), float(sol.p[best])
        if change == "latency" and st.decision is not None:
            # Knobs within tolerance stay as they are: the gateway re-applies nothing.
            f, p = st.decision.cpu_hz, st.decision.tx_power_w
        self.seq += 1
        st.seq = self.seq
        st.option = best
        if change == "option":
            st.option_seq = st.seq
        st.decision = Decision(
            gateway=gateway, epoch=self.epoch_ms, seq=st.seq, ts=now, bundle=self.table.bundle,
            variant=o.variant, pruning_ratio=o.pruning_ratio, split=o.split,
            precision=o.precision, cpu_hz=f, tx_power_w=p,
            latency_ms=expected_ms,
            energy_mj=float(sol.energy[best]) * 1e3,
            distortion=o.distortion, accuracy=o.accuracy, feasible=feasible,
            policy=self.policy.name, reason=reason if feasible else "infeasible",
            fallback_variant=fb_variant, fallback_cpu_hz=env.f_max_hz,
            fallback_margin=reserve_margin,
            server_probes=bool((self.policy.allowed & self.table.transmits).any()))
        # The compute scale in the line: what a plan believed of the gateway's speed is the
        # first thing to ask of a decision that went wrong.
        log.info("gateway %s: %s %s f=%.3g Hz p=%.3g W T=%.1f ms E=%.2f mJ, compute x%.2f "
                 "(%s%s)", gateway, o.variant, o.precision, st.decision.cpu_hz,
                 st.decision.tx_power_w, st.decision.latency_ms, st.decision.energy_mj,
                 env.compute_scale, st.decision.reason,
                 ", lean fallback reserve" if lean[best] else "")
        return st.decision

    def _expected_latency(self, st: GatewayState, env: Environment, server: np.ndarray,
                          sol: Solution, residual: tuple[float, float], now: float
                          ) -> np.ndarray:
        """Per option, the latency a window sees at the solution's clocks and powers: the
        model's at the gain's mean without the fallback reserve (`_bare_latency`), plus
        what its path measured beyond its plans (`_residual`). This ranks; feasibility keeps
        the backed-off gain, the reserve and the model alone, so the deadline still holds
        in a fade.
        """
        return self._bare_latency(st, env, server, sol.f, sol.p, now) + self._residual(residual)

    def _bare_latency(self, st: GatewayState, env: Environment, server: np.ndarray,
                      f: np.ndarray, p: np.ndarray, now: float) -> np.ndarray:
        """Per option, the model's latency at clocks `f` and powers `p`, at the gain's mean
        and without the fallback reserve.

        Ranked at the backed-off gain, a newcomer's link (its gain prior: 6 dB, backed off
        2σ) planned at 1/16 of its rate, and a 10% gateway ran its device for the first
        5-8 s of every e2e round at 0.5 Mbit/s, where the server was 1.2x faster. Counting
        the reserve, every transmitting option would look slower by a fallback it rarely runs.
        """
        mid = self._at_mean(st, env, now)
        latency, _ = evaluate(self.table, mid, f, p, self._costs(st, mid, server, now))
        return np.asarray(latency - self._reserve(st, mid))

    def _change(self, st: GatewayState, best: int, sol: Solution, feasible: bool,
                fallback: str, margin: float | None, expected_ms: float) -> str:
        """What a new decision would change: "option" (the option, its clock or power, its
        feasibility or fallback), "latency" (only the latency it expects), or "" (nothing)."""
        d = st.decision
        if (d is None or best != st.option or d.feasible != feasible
                or d.fallback_variant != fallback or d.fallback_margin != margin):
            return "option"
        tol = self.config.actuation_tolerance
        f, p = float(sol.f[best]), float(sol.p[best])
        p_scale = max(d.tx_power_w, 1e-3 * self.config.link.p_max_w)
        if abs(f - d.cpu_hz) > tol * d.cpu_hz or abs(p - d.tx_power_w) > tol * p_scale:
            return "option"
        # The gateway shows the prediction beside what it measures: in e2e run 26 a decision
        # made before anything was measured said 2.4 ms for windows that took 6.3.
        moved = abs(expected_ms - d.latency_ms) > self.config.republish_latency_frac * max(
            d.latency_ms, REPUBLISH_FLOOR_MS)
        return "latency" if moved else ""

    def step(self, now: float) -> list[Decision]:
        """Re-solve every gateway that is due; the decisions that changed (latest per gateway).

        A gateway that starts or stops transmitting changes its cell-mates' bandwidth share,
        so their plans are re-checked in the same round instead of a round late.
        """
        self._forget_silent(now)
        out: dict[str, Decision] = {}
        todo, force = list(self.gateways), False
        for _ in range(MAX_SHARE_PASSES):
            changed: set[str] = set()
            for gw in todo:
                if gw not in self.gateways:
                    continue  # forgotten in an earlier pass
                before = self._transmitting(gw)
                try:
                    d = self.decide(gw, now, force=force)
                except Exception:
                    # One gateway's estimates (a report no bound caught) must not stop the
                    # others' decisions: its state goes, and its next report starts afresh.
                    self.solve_errors += 1
                    log.exception("could not decide for gateway %s; forgetting its estimates",
                                  gw)
                    self.forget(gw)
                    continue
                if d is not None:
                    out[gw] = d
                    if self._transmitting(gw) != before:
                        changed.add(self._cell(gw))
            if not changed or self.config.bandwidth_sharing == "none":
                break
            todo = [g for g in self.gateways if self._cell(g) in changed]
            force = True
        return list(out.values())

    def _forget_silent(self, now: float) -> None:
        """Forget every gateway not heard from for FORGET_AFTER_STALE × stale_after_s."""
        horizon = FORGET_AFTER_STALE * self.config.stale_after_s
        for gw, st in list(self.gateways.items()):
            if math.isfinite(st.last_seen) and now - st.last_seen > horizon:
                log.info("gateway %s silent for %.0f s; the coordinator forgets it",
                         gw, now - st.last_seen)
                self.forget(gw)

    def current(self, gateway: str) -> Decision | None:
        """The gateway's latest decision, if any."""
        st = self.gateways.get(gateway)
        return st.decision if st else None

    def snapshot(self, now: float) -> dict[str, Any]:
        """Estimates and decisions of every gateway, for /v1/status and metrics."""
        out: dict[str, Any] = {"policy": self.policy.name, "bundle": self.table.bundle,
                               "server_queue_ms": self.server_queue.value(0.0),
                               "server_slowdown": self.slowdown(now), "gateways": {}}
        for gw, st in self.gateways.items():
            env, queue = self.environment(gw, now)
            device, transmit = self._residual_by_path(st, now)
            out["gateways"][gw] = {
                "gain": env.gain, "bandwidth_hz": env.bandwidth_hz,
                "compute_scale": env.compute_scale, "queue_ms_max": float(queue.max()) * 1e3,
                "energy_queue_mj": st.energy_queue_mj,
                "residual_ms": {"device": device * 1e3, "transmit": transmit * 1e3},
                "decision": st.decision.model_dump(mode="json") if st.decision else None}
        return out
