"""Coordinator benchmark: the four policies replay shared channel and load traces.

Each trace is a ground truth per second: every gateway's channel (the rate its radio would
get at full power on the whole band) and which gateways are on. Every policy runs the real
OnlineController on telemetry simulated from that truth, one second late (decisions are made
on what was measured, then judged against what happens), through the system model with the
bundle's real profile. Writes bench/out/coordinator.json and one PNG per trace.

Two accountings of the same decisions. The main one ("policies", "goals") is the gateway as
built (gateway/inference.py):
- before its head runs, a window whose path, predicted from the link rate the radio senses now
  and the server time of the last replies, would overrun its cutoff (within GUARD_MARGIN)
  goes straight to the decision's fallback (the link guard);
- a transmitted window whose reply, at the true bandwidth, would not arrive by its cutoff
  (deadline minus FALLBACK_MARGIN x the fallback's run time minus FALLBACK_SLACK_S) gives up
  there and runs the fallback at its clock; after such a timeout the gateway skips the server,
  and the head, for PROBE_INTERVAL_S.
The other ("no_fallback") is the plain system model: a late window is simply a miss.

    .venv/bin/python bench/coordinator.py [--bundle bundles/reference] [--deadline-ms X]
    .venv/bin/python bench/coordinator.py --deadline-factor 0.8 \\
        --objective output_distortion --tag=-tight  # the tight variant
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgetok.agent.coordinator.config import ControllerConfig
from edgetok.agent.coordinator.model import (
    DEVICE_PRECISION,
    Environment,
    OptionTable,
    evaluate,
    gain_from_rate,
    rate_bps,
)
from edgetok.agent.coordinator.online import MAX_UTILISATION, OnlineController
from edgetok.agent.coordinator.solver import TIE_ATOL, grid_options, rank, solve_options
from edgetok.control import GUARD_MARGIN, POLICY_NAMES, Telemetry
from edgetok.gateway.inference import FALLBACK_MARGIN, FALLBACK_SLACK_S, PROBE_INTERVAL_S
from edgetok.models.bundle import Manifest, read_manifest

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
BUNDLES = (ROOT / "bundles/reference", ROOT / "bundles/quick")

# A 20 MHz Wi-Fi uplink at 20 dBm with a 10 dB noise figure; a Pi-4 class CPU.
B, N0, P_MAX = 20e6, 3.98e-20, 0.1
F_MIN, F_MAX, KAPPA = 0.6e9, 1.5e9, 2e-28
NOMINAL_BPS = 20e6
WINDOWS_PER_S = 20.0
SERVER_WORKERS = 2
SERVER_BASE_MS = 1.0
# Measurement noise (log-normal sigma) on throughput and head latency samples.
MEAS_NOISE = 0.05
# A device-only gateway sends no features, so it probes the uplink every few seconds.
PROBE_EVERY_S = 5
GRID_N = 200
GAP_EVERY = 7
OVERLOAD_S = 1.0  # queueing delay charged when the server is past saturation

# Per-window metrics reported under both accountings (series keys; fb_ = with fallback).
METRICS = ("latency", "energy", "accuracy", "distortion", "hit")

log = logging.getLogger("bench.coordinator")


@dataclass(frozen=True, slots=True)
class Trace:
    """Ground truth: full-power rate per second and gateway (NaN = gateway absent)."""

    name: str
    rates: np.ndarray
    cells: tuple[str, ...]


def _gauss_markov_db(rng: np.random.Generator, steps: int, n: int, sigma_db: float,
                     corr: float) -> np.ndarray:
    """First-order Gauss–Markov shadowing in dB: stationary N(0, σ²), lag-1 correlation corr."""
    x = np.zeros((steps, n))
    x[0] = rng.normal(0.0, sigma_db, n)
    for t in range(1, steps):
        x[t] = corr * x[t - 1] + math.sqrt(1 - corr**2) * rng.normal(0.0, sigma_db, n)
    return x


def _rate_with_fading(db: np.ndarray) -> np.ndarray:
    """Full-power rate when the nominal SNR is scaled by a dB offset."""
    snr0 = 2 ** (NOMINAL_BPS / B) - 1
    return B * np.log2(1 + snr0 * 10 ** (db / 10))


def traces(seed: int) -> list[Trace]:
    """The three shared traces: a bandwidth drop, fading, and a load ramp to 50 gateways."""
    rng = np.random.default_rng(seed)
    drop = np.full((300, 1), NOMINAL_BPS)
    drop[100:200] = 1e6
    fading = _rate_with_fading(_gauss_markov_db(rng, 300, 5, sigma_db=8.0, corr=0.9))
    counts = (1, 2, 5, 10, 20, 35, 50)
    load = _rate_with_fading(_gauss_markov_db(rng, 40 * len(counts), 50, 3.0, 0.9))
    for k, n in enumerate(counts):
        load[40 * k:40 * (k + 1), n:] = np.nan
    return [Trace("drop", drop, ("cell0",)),
            Trace("fading", fading, tuple(f"cell{i}" for i in range(5))),
            Trace("load", load, tuple(f"cell{i // 10}" for i in range(50)))]


@dataclass(slots=True)
class GatewaySide:
    """What gateway/inference.py remembers between windows: server health, run-time EMAs."""

    slack_s: float = FALLBACK_SLACK_S
    server_ok: bool = True
    next_probe: float = 0.0
    run_ms: dict[str, float] = field(default_factory=dict)  # smoothed run time by variant

    def ran(self, variant: str, ms: float) -> None:
        """Smooth a measured run time as Inferencer._run does."""
        old = self.run_ms.get(variant)
        self.run_ms[variant] = ms if old is None else 0.8 * old + 0.2 * ms

    def reserve_s(self, fallback: str, profile_ms: float, margin: float = FALLBACK_MARGIN
                  ) -> float:
        """Inferencer.fallback_reserve_s: time kept back for the on-device fallback, at the
        decision's margin (sure or lean)."""
        return self.run_ms.get(fallback, profile_ms) / 1000 * margin + self.slack_s

    def window(self, close_s: float, head_s: float, lat_s: float, tx_s: float, p_w: float,
               reserve_s: float, deadline_s: float, guess_s: float
               ) -> tuple[float, float, bool, bool]:
        """One transmitting window after its close: (time the server path ends, radio energy J,
        fell back, head ran). `guess_s` is what the gateway expects the path to take, from
        its sensed link rate and the server time of recent replies (Inferencer._link_guard)."""
        now = close_s
        if not self.server_ok and now < self.next_probe:  # server marked down: skip it all
            return 0.0, 0.0, True, False
        if reserve_s >= deadline_s - head_s:  # a fallback could not make it: no reserve
            reserve_s = 0.0
        cutoff = deadline_s - reserve_s  # relative to the window's close
        if guess_s * (1 + GUARD_MARGIN) > cutoff:  # the sensed link is too slow: do not try
            return 0.0, 0.0, True, False
        self.next_probe = now + head_s + PROBE_INTERVAL_S
        if cutoff - head_s <= 0:  # the head alone used the deadline: nothing transmitted
            return head_s, 0.0, True, True
        if lat_s <= cutoff:
            self.server_ok = True
            return lat_s, p_w * tx_s, False, True
        self.server_ok = False  # reply timed out at the cutoff; the radio sent until then
        return cutoff, p_w * min(tx_s, cutoff - head_s), True, True


def config(policy: str, deadline_ms: float, objective: str) -> ControllerConfig:
    """The controller config every policy shares."""
    return ControllerConfig.model_validate({
        "policy": policy, "objective": objective,
        "link": {"bandwidth_hz": B, "gain": gain_from_rate(NOMINAL_BPS, P_MAX, B, N0),
                 "noise_w_per_hz": N0, "p_max_w": P_MAX},
        "device": {"f_min_hz": F_MIN, "f_max_hz": F_MAX, "kappa": KAPPA},
        "server": {"slowdown": 1.0, "queue_ms": SERVER_BASE_MS},
        "budget": {"deadline_ms": deadline_ms}, "server_workers": SERVER_WORKERS,
        "resolve_interval_s": 5.0})


def server_queue_s(table: OptionTable, opts: dict[str, int]) -> float:
    """True M/M/1-style waiting time under the tails the gateways run right now."""
    load = sum(WINDOWS_PER_S * table.t_tail[o] for o in opts.values() if table.transmits[o])
    util = load / SERVER_WORKERS
    if util >= 1.0:
        return OVERLOAD_S
    n = sum(1 for o in opts.values() if table.transmits[o]) or 1
    mean_service = load / (WINDOWS_PER_S * n)
    wait = min(util, MAX_UTILISATION) / (1 - min(util, MAX_UTILISATION))
    return wait * mean_service / SERVER_WORKERS + SERVER_BASE_MS / 1000


def gateway_step(table: OptionTable, env: Environment, side: GatewaySide, o: int, dv: int,
                 dev_profile_ms: dict[str, float], now: float, f: float, p: float, f_fb: float,
                 lat: float, en: float, server_guess_s: float,
                 margin: float = FALLBACK_MARGIN) -> dict[str, float]:
    """One second of windows of one gateway as built: means over its windows, with fallback.

    `dv` is the decision's fallback (run at `f_fb`, its reserve at `margin`);
    `server_guess_s` the tail and queueing time the gateway saw on its last replies.
    """
    c, w = table.c_head * env.compute_scale, int(WINDOWS_PER_S)
    dev_id, dev_s = table.options[dv].variant, float(c[dv] / f_fb)
    dev_j, head_j = env.kappa * c[dv] * f_fb**2, env.kappa * c[o] * f**2
    if not table.transmits[o]:
        if dv == o:  # the fallback itself is running: the gateway learns its run time
            side.ran(dev_id, float(c[o] / f) * 1e3)
        rows = [(lat, en, False)] * w
    else:
        head_s = float(c[o] / f)
        tx_s = float(table.bits[o] / rate_bps(p, env))
        guess = head_s + tx_s + server_guess_s
        rows = []
        for k in range(w):
            # Inferencer.fallback_reserve_s: the profile, slowed to the fallback clock.
            reserve = side.reserve_s(dev_id, max(dev_profile_ms[dev_id],
                                                 float(table.c_head[dv] / f_fb) * 1e3), margin)
            end, radio_j, fell, ran = side.window(now + k / WINDOWS_PER_S, head_s, lat, tx_s,
                                                  p, reserve, env.deadline_s, guess)
            if fell:
                side.ran(dev_id, dev_s * 1e3)
                rows.append((end + dev_s, head_j * ran + radio_j + dev_j, True))
            else:
                rows.append((lat, en, False))
    acc = [table.options[x].accuracy for x in (o, dv)]
    acc_f = [np.nan if a is None else a for a in acc]
    return {"latency": float(np.mean([r[0] for r in rows])) * 1e3,
            "energy": float(np.mean([r[1] for r in rows])) * 1e3,
            "accuracy": float(np.mean([acc_f[r[2]] for r in rows])),
            "distortion": float(np.mean([table.distortion[dv if r[2] else o] for r in rows])),
            "hit": float(np.mean([r[0] <= env.deadline_s * (1 + 1e-9) for r in rows])),
            "rate": float(np.mean([r[2] for r in rows]))}


def run_policy(trace: Trace, policy: str, manifest: Manifest, deadline_ms: float,
               objective: str, seed: int, slack_s: float = FALLBACK_SLACK_S) -> dict[str, Any]:
    """Replay one trace under one policy; per-step series and summary metrics."""
    rng = np.random.default_rng(seed)
    ctl = OnlineController(config(policy, deadline_ms, objective), manifest, epoch_ms=0)
    table = ctl.table
    steps, n = trace.rates.shape
    series = {k: np.full((steps, n), np.nan) for k in
              ("split", "ratio", "bytes", "latency", "energy", "accuracy", "distortion",
               "hit", *(f"fb_{m}" for m in METRICS), "fb_rate")}
    dev_profile_ms = {v.id: v.profile.head_ms_1t + v.profile.tail_ms_1t
                      for v in manifest.variants if v.split == table.num_layers}
    sides: dict[int, GatewaySide] = {}
    solve_ms: list[float] = []
    cpu_ms: list[float] = []
    gaps: list[dict[str, float]] = []
    done = dict.fromkeys(range(n), 0)
    prev_queue = SERVER_BASE_MS / 1000
    for t in range(steps):
        now = float(t)
        active = [i for i in range(n) if not math.isnan(trace.rates[t, i])]
        for i in range(n):
            if i not in active and f"gw{i}" in ctl.gateways:
                ctl.forget(f"gw{i}")
        for i in active:
            if f"gw{i}" not in ctl.gateways:  # a newcomer says hello before its first window
                ctl.observe(Telemetry(gateway=f"gw{i}", ts=now, cell=trace.cells[i],
                                      windows_per_s=WINDOWS_PER_S), now)
        solves, c0 = ctl.solves, time.thread_time()
        ctl.step(now)
        if ctl.solves > solves:
            cpu_ms.append((time.thread_time() - c0) * 1e3 / (ctl.solves - solves))
        opts: dict[str, int] = {}
        for i in active:
            gw = f"gw{i}"
            st = ctl.gateways[gw]
            if st.solved_ts == now:
                solve_ms.append(st.solve_s * 1e3)
                if i == 0 and t % GAP_EVERY == 0:
                    gaps.append(optimality_gap(ctl, gw, now))
            d = ctl.current(gw)
            assert d is not None
            opts[gw] = table.index(d.variant, d.precision)
        queue = server_queue_s(table, opts)
        for i in active:
            gw = f"gw{i}"
            d, o = ctl.current(gw), opts[gw]
            assert d is not None
            tx_in_cell = sum(1 for j in active if trace.cells[j] == trace.cells[i]
                             and table.transmits[opts[f"gw{j}"]])
            env = Environment(bandwidth_hz=B / max(tx_in_cell, 1),
                              gain=gain_from_rate(trace.rates[t, i], P_MAX, B, N0),
                              noise_w_per_hz=N0, p_max_w=P_MAX, f_min_hz=F_MIN,
                              f_max_hz=F_MAX, kappa=KAPPA, queue_s=queue,
                              deadline_s=deadline_ms / 1000)
            lat, en = evaluate(table, env, np.array(d.cpu_hz), np.array(d.tx_power_w))
            acc = table.options[o].accuracy
            for k, v in (("split", d.split), ("ratio", d.pruning_ratio),
                         ("bytes", table.options[o].s_bytes), ("latency", lat[o] * 1e3),
                         ("energy", en[o] * 1e3), ("accuracy", np.nan if acc is None else acc),
                         ("distortion", table.distortion[o]),
                         ("hit", float(lat[o] <= env.deadline_s * (1 + 1e-9)))):
                series[k][t, i] = v
            side = sides.setdefault(i, GatewaySide(slack_s))
            dv = table.index(d.fallback_variant or manifest.device_variant(
                d.pruning_ratio).id, DEVICE_PRECISION)
            fb = gateway_step(table, env, side, o, dv, dev_profile_ms, now, d.cpu_hz,
                              d.tx_power_w, d.fallback_cpu_hz or d.cpu_hz, float(lat[o]),
                              float(en[o]), float(table.t_tail[o]) + prev_queue,
                              d.fallback_margin or FALLBACK_MARGIN)
            for k, v in fb.items():
                series[f"fb_{k}"][t, i] = v
            done[i] += int(WINDOWS_PER_S)
            jitter = math.exp(MEAS_NOISE * rng.standard_normal())
            if table.transmits[o]:
                p, bps = d.tx_power_w, float(rate_bps(d.tx_power_w, env)) * jitter
            elif t % PROBE_EVERY_S == 0:
                p, bps = P_MAX, float(rate_bps(P_MAX, env)) * jitter
            else:
                p, bps = d.tx_power_w, None
            head = ({d.variant: table.c_head[o] / d.cpu_hz * 1e3 * jitter}
                    if table.c_head[o] > 0 else {})
            ctl.observe(Telemetry(gateway=gw, ts=now, uplink_bps=bps, tx_power_w=p,
                                  cpu_hz=d.cpu_hz, head_ms=head, windows_per_s=WINDOWS_PER_S,
                                  windows_done=done[i], energy_mj=float(en[o] * 1e3),
                                  cell=trace.cells[i]), now)
        ctl.observe_server(queue * 1e3)
        prev_queue = queue
    return summarise(series, solve_ms, cpu_ms, gaps, ctl)


def optimality_gap(ctl: OnlineController, gw: str, now: float) -> dict[str, float]:
    """Exact solver vs an n×n brute-force grid over (f, p), on the controller's estimates."""
    env, queue = ctl.environment(gw, now)
    allowed = ctl.policy.allowed
    exact, grid = solve_options(ctl.table, env, queue), grid_options(ctl.table, env, GRID_N,
                                                                     queue)
    e, g = int(rank(ctl.table, exact, allowed)[0]), int(rank(ctl.table, grid, allowed)[0])
    d_gap = float(ctl.table.distortion[e] - ctl.table.distortion[g])
    same = abs(d_gap) <= TIE_ATOL
    return {"distortion_gap": d_gap,
            "energy_gap_rel": (float(exact.energy[e] / grid.energy[g] - 1) if same else 0.0),
            "grid_feasible_solver_not": float(bool(grid.feasible[g]) and not exact.feasible[e])}


def summarise(series: dict[str, np.ndarray], solve_ms: list[float], cpu_ms: list[float],
              gaps: list[dict[str, float]], ctl: OnlineController) -> dict[str, Any]:
    """Metrics of one run, plus the series of gateway 0 for the plot."""
    ms, cpu = np.array(solve_ms), np.array(cpu_ms)
    return {
        **_means(series, "fb_"), "fallback_rate": float(np.nanmean(series["fb_rate"])),
        "no_fallback": _means(series, ""),
        "decisions": int(sum(s.seq for s in ctl.gateways.values())),
        "solve_ms": {"mean": float(ms.mean()), "p99": float(np.percentile(ms, 99)),
                     "max": float(ms.max()), "count": len(solve_ms),
                     "cpu_mean_per_round": float(cpu.mean())},
        "gap": {"max_distortion_gap": max((g["distortion_gap"] for g in gaps), default=0.0),
                "max_energy_gap_rel": max((g["energy_gap_rel"] for g in gaps), default=0.0),
                "grid_feasible_solver_not": int(sum(g["grid_feasible_solver_not"]
                                                    for g in gaps)),
                "samples": len(gaps)},
        "series": {k: v[:, 0].tolist() for k, v in series.items()},
        "hit_by_step": np.nanmean(series["fb_hit"], axis=1).tolist(),
        "hit_by_step_no_fallback": np.nanmean(series["hit"], axis=1).tolist(),
        "fallback_by_step": np.nanmean(series["fb_rate"], axis=1).tolist(),
    }


def _means(series: dict[str, np.ndarray], prefix: str) -> dict[str, float]:
    """Hit rate and means over all gateway-seconds of one accounting."""
    m = {k: float(np.nanmean(series[prefix + k])) for k in METRICS}
    return {"hit_rate": m["hit"], "mean_energy_mj": m["energy"],
            "mean_accuracy": m["accuracy"], "mean_distortion": m["distortion"],
            "mean_latency_ms": m["latency"]}


def goals(per_policy: dict[str, dict[str, Any]], fallback: bool = True) -> dict[str, Any]:
    """The issue's goals for one trace, under the gateway-fallback or the plain accounting."""
    view = {k: v if fallback else v["no_fallback"] for k, v in per_policy.items()}
    joint = view["joint"]
    base = {k: v for k, v in view.items() if k != "joint"}
    best_hit = max(v["hit_rate"] for v in base.values())
    same = [v["mean_accuracy"] for v in base.values() if v["hit_rate"] >= joint["hit_rate"] - 1e-12]
    return {
        "joint_hit_rate_ge_best_baseline": joint["hit_rate"] >= best_hit - 1e-12,
        "best_baseline_hit_rate": best_hit,
        "joint_accuracy_within_1pt": (not same) or joint["mean_accuracy"] >= max(same) - 0.01,
        "solve_under_1ms": all(v["solve_ms"]["cpu_mean_per_round"] < 1.0
                               for v in per_policy.values()),
        "gap_zero": all(v["gap"]["max_distortion_gap"] <= TIE_ATOL
                        and v["gap"]["max_energy_gap_rel"] <= 1e-9
                        and v["gap"]["grid_feasible_solver_not"] == 0
                        for v in per_policy.values()),
    }


def plot(trace: Trace, per_policy: dict[str, dict[str, Any]], deadline_ms: float,
         path: Path) -> None:
    """Decisions over time for gateway 0 (and the hit rate over all gateways)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(7, 1, figsize=(10, 15), sharex=True)
    t = np.arange(trace.rates.shape[0])
    ax[0].plot(t, trace.rates[:, 0] / 1e6, color="k")
    ax[0].set_ylabel("gw0 rate\n@p_max [Mbit/s]")
    ax[0].set_yscale("log")
    if trace.name == "load":
        ax0b = ax[0].twinx()
        ax0b.plot(t, np.sum(~np.isnan(trace.rates), axis=1), color="tab:gray", ls=":")
        ax0b.set_ylabel("gateways")
    for k, (name, res) in enumerate(per_policy.items()):
        s = res["series"]
        # Small offsets keep policies that choose the same value visible.
        ax[1].step(t, np.array(s["split"]) + 0.08 * k, where="post", label=name)
        ax[2].step(t, np.array(s["ratio"]) + 0.01 * k, where="post", label=name)
        ax[3].plot(t, s["latency"], label=name)
        ax[4].plot(t, s["energy"], label=name)
        line = ax[5].plot(t, res["hit_by_step"], label=name)
        ax[5].plot(t, res["hit_by_step_no_fallback"], ls=":", color=line[0].get_color())
        ax[6].plot(t, res["fallback_by_step"], label=name)
    ax[3].axhline(deadline_ms, color="r", ls="--", lw=0.8)
    for a, lab in zip(ax[1:], ("split s", "pruning ratio", "decided latency\n[ms]",
                               "decided energy\n[mJ]",
                               "deadline hits, all gw\n(dotted: no fallback)",
                               "device-fallback\nrate, all gw"), strict=True):
        a.set_ylabel(lab)
    ax[3].set_yscale("log")
    ax[4].set_yscale("log")
    ax[1].legend(loc="upper right", ncol=4, fontsize=8)
    ax[-1].set_xlabel("time [s]")
    fig.suptitle(f"coordinator, trace '{trace.name}' (deadline {deadline_ms:.2f} ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    """Run every trace under every policy and write JSON + PNGs."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="bundle dir (default: reference, else quick)")
    ap.add_argument("--deadline-ms", type=float, help="deadline (default: --deadline-factor × "
                    "the unpruned model's latency on the device at f_max)")
    ap.add_argument("--deadline-factor", type=float, default=1.25,
                    help="below 1 the device alone must prune to meet the deadline")
    ap.add_argument("--objective", default="accuracy", choices=("accuracy", "output_distortion"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--tag", default="", help="suffix for the output names, e.g. '-tight'")
    ap.add_argument("--fallback-slack-ms", type=float, default=FALLBACK_SLACK_S * 1e3,
                    help="the gateway's FALLBACK_SLACK_S (default: its value); for sensitivity")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    bundle = args.bundle or next((b for b in BUNDLES if (b / "manifest.json").is_file()), None)
    if bundle is None:
        raise SystemExit("no bundle: build one with `edgetok build` or pass --bundle")
    manifest = read_manifest(bundle)
    table = OnlineController(config("joint", 1.0, args.objective), manifest).table
    full = [o.c_head for o in table.options
            if o.split == table.num_layers and o.pruning_ratio == table.ratio.min()]
    deadline = args.deadline_ms or args.deadline_factor * full[0] / F_MAX * 1e3
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"bundle": manifest.bundle_id, "bundle_dir": str(bundle),
                              "deadline_ms": deadline, "objective": args.objective,
                              "windows_per_s": WINDOWS_PER_S, "server_workers": SERVER_WORKERS,
                              "accounting": {
                                  "policies/goals": "gateway as built: late replies fall back "
                                  "to the on-device variant (gateway/inference.py)",
                                  "no_fallback": "plain system model: a late window is a miss"},
                              "fallback": {"margin": FALLBACK_MARGIN,
                                           "slack_ms": args.fallback_slack_ms,
                                           "probe_interval_s": PROBE_INTERVAL_S},
                              "traces": {}}
    for trace in traces(args.seed):
        per: dict[str, dict[str, Any]] = {
            p: run_policy(trace, p, manifest, deadline, args.objective, args.seed,
                          args.fallback_slack_ms / 1e3)
            for p in POLICY_NAMES}
        plot(trace, per, deadline, args.out / f"coordinator{args.tag}_{trace.name}.png")
        result["traces"][trace.name] = {
            "goals": goals(per), "goals_no_fallback": goals(per, fallback=False),
            "policies": {p: {k: v for k, v in r.items()
                             if k != "series" and not k.endswith("by_step")
                             and not k.startswith("hit_by_step")}
                         for p, r in per.items()}}
    (args.out / f"coordinator{args.tag}.json").write_text(json.dumps(result, indent=2))
    print(f"bundle {manifest.bundle_id}, deadline {deadline:.3f} ms, objective {args.objective}, "
          f"fallback slack {args.fallback_slack_ms:g} ms")
    print("with fallback = the gateway as built; no fallback = a late window is a miss")
    print("| trace | policy | hit (fallback) | energy [mJ] | accuracy | fallback rate | "
          "hit (no fb) | energy (no fb) | acc (no fb) | solve mean/p99 [ms] | gap D / E |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, tr in result["traces"].items():
        for p, r in tr["policies"].items():
            nf = r["no_fallback"]
            print(f"| {name} | {p} | {r['hit_rate']:.4f} | {r['mean_energy_mj']:.4f} | "
                  f"{r['mean_accuracy']:.4f} | {r['fallback_rate']:.4f} | "
                  f"{nf['hit_rate']:.4f} | {nf['mean_energy_mj']:.4f} | "
                  f"{nf['mean_accuracy']:.4f} | {r['solve_ms']['mean']:.3f}/"
                  f"{r['solve_ms']['p99']:.3f} ({r['solve_ms']['cpu_mean_per_round']:.3f} cpu) | "
                  f"{r['gap']['max_distortion_gap']:.2g} / "
                  f"{r['gap']['max_energy_gap_rel']:.2g} |")
        print(f"goals {name} (with fallback): {tr['goals']}")
        print(f"goals {name} (no fallback): {tr['goals_no_fallback']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
