"""End-to-end benchmark: real gateway, server and coordinator processes in the test bed.

For every scenario (link rate, a link trace, gateway CPU, number of gateways) each policy
(joint, device-only, server-only, fixed-split) runs on the same test bed, replaying the same
BasicMotions windows at a fixed rate. One-gateway scenarios run the four side by side, each
policy in its own lane (broker, server, gateway, link), so the machine's drift is shared;
fleets run them in turn, each round in a row of a balanced Latin square. Windows are cut
into rounds (a trace is replayed whole in each).
Per policy it reports end-to-end latency p50/p95/p99 (sensor publish to result stored, see
testbed/driver.py), deadline hit rate, gateway energy from the system model (measured head
time and frame bytes), accuracy against the dataset labels and bytes sent. Writes
bench/out/e2e.json and PNG plots; the headline is joint p50 / best static baseline p50 per
scenario.

    sudo .venv/bin/python bench/e2e.py [--quick] [--bundle DIR] [--coordinator auto]
        [--profile]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from testbed import profile
from testbed.goals import check, summary
from testbed.metrics import summarise
from testbed.net import BROKER_PORT, Testbed, TestbedError, available
from testbed.plots import plot_all
from testbed.run import Run, RunData, RunSpec, merged, nominal_hz

from edgetok.control import POLICY_NAMES

log = logging.getLogger("e2e")

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
POLICIES = POLICY_NAMES
BASELINES = POLICIES[1:]
# 100 ms per window: an interactive target, as in configs/scenarios/wifi.toml.
DEADLINE_MS = 100.0
# Windows per second per gateway: 2/s keeps an fp32 split frame stream (~17 kB/window on
# the reference bundle) under the 0.5 Mbit/s link, so a queue only builds where a policy
# chooses badly, and 16 gateways stay within two cores.
WINDOW_RATE = 2.0
# 60: a p50 that moves less between runs on a throttled gateway, whose latencies come in
# steps of one CFS period (10 ms at 10% of a core).
WINDOWS, QUICK_WINDOWS = 60, 16
WARMUP = 4
# Two runs per policy and scenario: every run restarts the coordinator's learning, which
# more, shorter runs would overweigh against a gateway's steady state. The machine itself
# drifts between runs (whole runs 30% slower, on both cores and in every stage: run 10's
# per-run medians of one configuration were 5.5 or 7.5 ms), which is why one-gateway
# scenarios run their policies side by side, and fleets in turn (round_order).
ROUNDS = 2
# Link and CPU of the scenarios that vary something else.
BASE_LINK_MBIT, BASE_CPU = 10.0, 1.0
# A Raspberry-Pi-class gateway (several times slower than one core here): the link sweep and
# a trace are repeated on it. At 10% of a core the server path wins at every rate measured
# (runs 11 and 12: its int8 frame costs ~5 ms more at 0.5 Mbit/s, the head ~10 ms more).
PI_CPU = 0.1
# At 25% of a core the two paths nearly tie at 10 Mbit/s (runs 11, 12), so the best static
# choice changes along a 50 -> 0.5 -> 50 Mbit/s trace (server, then device): the case the
# issue's 0.6x goal is about. Chosen from those runs' stage times, not tuned to a result.
TIE_CPU = 0.25
# How long the edge servers hang (SIGSTOP) in each round of the hang scenario, a third into
# its replay: long enough to catch windows in flight and a probe (one every 2 s), short
# enough that the round measures the recovery too.
HANG_S = 2.0
# py-spy's rate with --profile (its default): a sample per 10 ms, the CFS period of a gateway
# at 10% of a core; more would cost the samplers more of the server's core.
PROFILE_HZ = 100


@dataclass(frozen=True, slots=True)
class Scenario:
    """One condition every policy is measured under."""

    name: str
    group: str  # link, trace, cpu, load, link-pi, trace-pi, trace-cpu: its plot
    link_mbit: float = BASE_LINK_MBIT
    cpu_share: float = BASE_CPU
    gateways: int = 1
    trace: tuple[tuple[float, float], ...] = ()
    hangs: tuple[tuple[float, float], ...] = ()  # (s after replay start, s): servers hang


def trace_drop(duration_s: float, high: float = 20.0, low: float = 1.0
               ) -> tuple[tuple[float, float], ...]:
    """`high` Mbit/s, a drop to `low` for the middle third of the replay, then back."""
    third = duration_s / 3
    return ((0.0, high), (third, low), (2 * third, high))


def scenarios(quick: bool, replay_s: float, max_gateways: int, rounds: int = ROUNDS
              ) -> list[Scenario]:
    """The scenario matrix (reduced with --quick); `replay_s`: one whole replay, which a
    trace spans and the other scenarios cut into `rounds`."""
    links = (10.0, 0.5) if quick else (50.0, 10.0, 2.0, 0.5)
    cpus = (0.1,) if quick else (1.0, 0.25, 0.1)
    loads = (4,) if quick else (1, 4, 16)
    out = [Scenario(f"link-{m:g}", "link", link_mbit=m) for m in links]
    out.append(Scenario("trace-20-1-20", "trace", link_mbit=20.0,
                        trace=trace_drop(replay_s)))
    out += [Scenario(f"cpu-{c:.0%}", "cpu", cpu_share=c) for c in cpus]
    out += [Scenario(f"load-{n}", "load", gateways=n) for n in loads if n <= max_gateways]
    pi_links = (50.0, 0.5) if quick else (50.0, 2.0, 0.5)
    out += [Scenario(f"pi-link-{m:g}", "link-pi", link_mbit=m, cpu_share=PI_CPU)
            for m in pi_links]
    out.append(Scenario("pi-trace-50-0.5-50", "trace-pi", link_mbit=50.0, cpu_share=PI_CPU,
                        trace=trace_drop(replay_s, 50.0, 0.5)))
    out.append(Scenario(f"cpu{TIE_CPU:.0%}-trace-50-0.5-50".replace("%", ""), "trace-cpu",
                        link_mbit=50.0, cpu_share=TIE_CPU,
                        trace=trace_drop(replay_s, 50.0, 0.5)))
    # The fallback reserve's test: on a Pi-class gateway the server path wins but leaves
    # the least room for a fallback, so a server that hangs costs whatever the reserve
    # kept back too little for.
    out.append(Scenario("pi-hang-50", "hang", link_mbit=50.0, cpu_share=PI_CPU,
                        hangs=((replay_s / rounds / 3, HANG_S),)))
    return out


def williams_rows(n: int) -> list[list[int]]:
    """A balanced Latin square (Williams design) on n items: n rows (2n for an odd n) in
    which every item takes every place equally often and follows every other item equally
    often."""
    first, lo, hi = [0], 1, n - 1
    while lo <= hi:  # 0, 1, n-1, 2, n-2, ...
        first.append(lo)
        lo += 1
        if lo <= hi:
            first.append(hi)
            hi -= 1
    rows = [[(i + r) % n for i in first] for r in range(n)]
    return rows + [row[::-1] for row in rows] if n % 2 else rows


def round_order(policies: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, policy) in run order, round r on row r of a balanced Latin square (A B D C,
    B C A D, C D B A, D A C B for four): over as many rounds as policies each policy runs
    once in every place and once after every other, so neither a drift of the machine nor
    what ran just before (the last scenario, a fleet's teardown) weighs on one policy more.
    The order A B C D, D C B A balanced a drift only, and put the first policy first or
    last in every round (e2e runs 55-56: joint's fleet 1 ms slower at 16 gateways)."""
    rows = williams_rows(len(policies))
    return [(r, policies[i]) for r in range(rounds) for i in rows[r % len(rows)]]


def lane_orders(policies: list[str], rounds: int) -> list[list[str]]:
    """The lane order of each side-by-side round, rotated: every policy takes every slot of
    the window period (and every gateway host) in turn."""
    n = len(policies)
    return [policies[r % n:] + policies[:r % n] for r in range(rounds)]


def side_by_side(sc: Scenario, sequential: bool) -> bool:
    """Whether a scenario's policies run at once, one lane each. Not for a fleet: four fleets
    would put four times the load on the server's core, the very thing load-N varies."""
    return not sequential and sc.gateways == 1


def batches(policies: list[str], rounds: int, side: bool) -> list[tuple[int, list[str]]]:
    """(round, policies run together) in run order."""
    if side:
        return list(enumerate(lane_orders(policies, rounds)))
    return [(r, [p]) for r, p in round_order(policies, rounds)]


def split_windows(windows: int, rounds: int, rnd: int) -> int:
    """Measured windows in round `rnd` when `windows` are cut into `rounds` (the first rounds
    take the remainder)."""
    return windows // rounds + (1 if rnd < windows % rounds else 0)


def profile_policies(parts: dict[str, list[RunData]], out: Path, scenario: str
                     ) -> dict[str, dict[str, Any]]:
    """Each policy's py-spy samples in one raw file next to `out`, summarised per window."""
    # <stem>_profile-<scenario>-<policy>.txt: every round and gateway of the policy, so the
    # file alone gives the summary again.
    summaries = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    for pol, runs in parts.items():
        # A recording spans the whole replay of its gateway: warm-up windows included.
        raw = [(path, d.spec.warmup + d.spec.windows) for d in runs for path in d.profiles]
        if not raw:
            continue
        dest = out.parent / f"{out.stem}_profile-{scenario}-{pol}.txt"
        dest.write_text("".join(path.read_text().rstrip("\n") + "\n" for path, _ in raw))
        summaries[pol] = profile.summarise(dest, windows=sum(n for _, n in raw))
    return summaries


def _positive(text: str) -> int:
    """argparse type: an integer of at least 1."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def coordinator_mode(choice: str) -> str:
    """'server' once `edgetok server` runs the OnlineController, else the test bed's shim."""
    if choice != "auto":
        return choice
    src = "".join(p.read_text() for p in (ROOT / "agent").glob("*.py"))
    return "server" if "OnlineController" in src else "shim"


def pick_bundle(arg: Path | None) -> Path:
    """--bundle, else bundles/reference, else bundles/quick (built if missing)."""
    if arg is not None:
        return arg.resolve()
    for p in (ROOT / "bundles/reference", ROOT / "bundles/quick"):
        if (p / "manifest.json").is_file():
            return p
    raise SystemExit("no bundle: build one with `.venv/bin/edgetok build --recipe "
                     "configs/models/quick.toml --out bundles/quick`")


def _versus_best_static(runs: dict[str, dict[str, Any]], pct: str
                        ) -> tuple[str, float] | None:
    """The baseline with the lowest latency percentile `pct`, and joint's ratio to it."""
    at = {p: runs[p]["latency_ms"][pct] for p in runs if runs[p]["latency_ms"][pct]}
    base = {p: v for p, v in at.items() if p in BASELINES}
    if "joint" not in at or not base:
        return None
    best = min(base, key=lambda p: base[p])
    return best, round(at["joint"] / base[best], 3)


def headline(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """joint p50 over the best static baseline's p50, and the hit rates, for one scenario;
    for information, the same ratio at p95 (where a trace's slow phase shows)."""
    p50 = {p: runs[p]["latency_ms"]["p50"] for p in runs if runs[p]["latency_ms"]["p50"]}
    out: dict[str, Any] = {"p50_ms": p50, "hit_rate": {p: runs[p]["hit_rate"] for p in runs}}
    versus = _versus_best_static(runs, "p50")
    if versus is not None:
        out.update(best_static=versus[0], ratio=versus[1])
        tail = _versus_best_static(runs, "p95")
        if tail is not None:
            out.update(best_static_p95=tail[0], ratio_p95=tail[1])
        best_hit = max(runs[p]["hit_rate"] or 0.0 for p in runs if p in BASELINES)
        out["joint_hit_ge_best"] = (runs["joint"]["hit_rate"] or 0.0) >= best_hit
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the matrix, write JSON and plots, print the headline table."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced matrix, fewer windows")
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--coordinator", choices=["auto", "server", "shim", "static"],
                   default="auto", help="who makes decisions (static: fixed variants, "
                   "no joint)")
    p.add_argument("--no-actuators", action="store_true",
                   help="gateways keep full clock and power (decisions pick variants only)")
    p.add_argument("--deadline-ms", type=float, default=DEADLINE_MS)
    p.add_argument("--window-rate", type=float, default=WINDOW_RATE)
    p.add_argument("--windows", type=int, default=None,
                   help=f"measured windows per policy and scenario (default {WINDOWS})")
    p.add_argument("--rounds", type=_positive, default=ROUNDS,
                   help="cut each policy's windows into this many runs (side by side: lanes "
                   "rotated between rounds; fleets and --sequential: rows of a balanced Latin "
                   "square, balanced over as many rounds as policies); a trace is replayed "
                   "whole in each round")
    p.add_argument("--sequential", action="store_true",
                   help="run the policies one after another even where they could run side "
                   "by side (the default for one-gateway scenarios: each policy gets its "
                   "own broker, server and gateway, all replayed at once, so a slow spell "
                   "of the shared machine weighs on every policy alike)")
    p.add_argument("--max-gateways", type=int, default=16)
    p.add_argument("--only", default=None, help="comma-separated scenario names")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--out", type=Path, default=OUT / "e2e.json")
    p.add_argument("--keep-logs", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help=f"where the time goes: py-spy samples every gateway at {PROFILE_HZ} "
                   "Hz from the replay's start to its end, without pausing it (busy threads "
                   "only, per thread). The samplers run on the host outside the gateways' CPU "
                   "quota, on the server's cores, so they perturb every lane alike. Writes "
                   "<out stem>_profile-<scenario>-<policy>.txt (collapsed stacks of all "
                   "rounds and gateways) next to --out, puts samples per window and stage "
                   "under each scenario's \"profile\" and prints them as a table")
    p.add_argument("--prefer", choices=("energy", "latency"), default="energy",
                   help="the coordinator's preference after accuracy, for every policy: "
                   "energy (stretch to the deadline at the least energy) or latency (as fast "
                   "as the energy budget allows)")
    p.add_argument("--server-probe-interval", type=float, default=None, metavar="S",
                   help="every gateway's server_probe_interval_s (0: no server probes, so "
                   "joint learns the server path by trials); default: the gateway's own")
    args = p.parse_args(argv)
    windows = args.windows or (QUICK_WINDOWS if args.quick else WINDOWS)
    replay_s = (WARMUP + windows) / args.window_rate
    matrix = scenarios(args.quick, replay_s, args.max_gateways, args.rounds)
    if args.only:
        keep = set(args.only.split(","))
        unknown = keep - {s.name for s in matrix}
        if unknown:  # a typo would otherwise run a smaller matrix without a word (checked
            # first: before the test bed, the bundle and the root it needs)
            raise SystemExit(f"e2e: no scenario named {', '.join(sorted(unknown))}; "
                             f"the matrix has: {', '.join(s.name for s in matrix)}")
        matrix = [s for s in matrix if s.name in keep]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    why = available()
    if why is not None:
        raise SystemExit(f"cannot build the test bed: {why}")
    if args.profile and not Path(profile.py_spy()).is_file():
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    bundle = pick_bundle(args.bundle)
    mode = coordinator_mode(args.coordinator)
    policies = [x for x in args.policies.split(",") if x]
    if mode == "static" and "joint" in policies:
        log.warning("no coordinator: joint cannot run; measuring the static baselines only")
        policies.remove("joint")
    work = Path(tempfile.mkdtemp(prefix="etk-e2e-"))
    lanes = {s.name: len(policies) if side_by_side(s, args.sequential) else 1 for s in matrix}
    n_gw = max(s.gateways * lanes[s.name] for s in matrix)
    doc: dict[str, Any] = {
        "bundle": str(bundle), "bundle_id": _bundle_id(bundle), "coordinator": mode,
        "actuators": not args.no_actuators, "prefer": args.prefer,
        "server_probe_interval_s": args.server_probe_interval,
        "deadline_ms": args.deadline_ms, "window_rate_per_gateway": args.window_rate,
        "windows_per_run": windows, "warmup_windows": WARMUP, "rounds": args.rounds,
        "side_by_side": "one-gateway scenarios run every policy at once, each with its own "
        "broker, server, gateway host and link, the windows of all gateways staggered evenly "
        "over the period; fleets (load-N) run their policies one after another, each round "
        "in a row of a balanced Latin square"
        if not args.sequential else "no: every policy runs on its own",
        "latency_definition": "result.created_ts - wall time just before the sensor message "
        "completing the window was published (driver in the server namespace)",
        "link": "tc tbf on each gateway's veth (uplink only): the channel's full-power rate, "
        "then r(p) at the decided power set by the gateway's emulated radio, which also holds "
        "each frame for the airtime of the part tbf's bucket passes at line speed (in a "
        "trace the test bed sets the rate and the gateway holds frames at the rate it "
        "senses); CPU: a cgroup quota with the shortest period the kernel allows, gateways "
        "and server pinned to separate cores; no "
        "propagation delay added (netem unavailable); sensor readings reach the gateway over "
        "the unshaped downlink",
        "machine": {"cores": _cores()}, "started": time.time(), "scenarios": {}}
    if args.profile:
        doc["profile"] = (f"py-spy --nonblocking at {PROFILE_HZ} Hz of every gateway from "
                          "REPLAY START to the driver's exit; a sample goes to the stage of "
                          "the frame nearest its leaf that a stage claims "
                          "(testbed/profile.py); per window: over the windows replayed, "
                          "warm-up included; threads count apart, so two threads runnable "
                          "at once give two samples")
    spec0 = RunSpec(name="", policy="joint", gateways=1, link_mbit=BASE_LINK_MBIT,
                    cpu_share=BASE_CPU, deadline_ms=args.deadline_ms,
                    window_rate=args.window_rate, windows=windows, warmup=WARMUP,
                    bundle=bundle, nominal_hz=nominal_hz(bundle), coordinator=mode,
                    actuators=not args.no_actuators, prefer=args.prefer,
                    server_probe_s=args.server_probe_interval)
    run_id = 0
    try:
        with Testbed(n_gw) as tb:
            if tb.pin:  # this process's tc calls and trace thread belong to the server side
                os.sched_setaffinity(0, tb.server_cpus)
            doc["machine"].update(pinned=tb.pin, server_cpus=tb.server_cpus,
                                  gateway_cpus=tb.gateway_cpus)
            for k in range(max(lanes.values())):  # one broker per lane
                tb.start_broker(work / f"broker{k}", BROKER_PORT + k)
            done: dict[tuple[Any, ...], str] = {}
            for sc in matrix:
                key = (sc.link_mbit, sc.cpu_share, sc.gateways, sc.trace, sc.hangs)
                if key in done:  # e.g. cpu-100% and load-1 are link-10 again
                    doc["scenarios"][sc.name] = {**doc["scenarios"][done[key]],
                                                 "group": sc.group, "same_as": done[key]}
                    continue
                done[key] = sc.name
                runs: dict[str, dict[str, Any]] = {}
                parts: dict[str, list[RunData]] = {pol: [] for pol in policies}
                loads: dict[str, list[float]] = {pol: [] for pol in policies}
                # A trace spans one replay, so each of its rounds replays it whole; its lanes
                # rotate as elsewhere (run 21's Pi trace, run once: joint 1.21x server-only
                # while on server-only's own variant in 97% of its windows; run 20: 0.95x).
                side = lanes[sc.name] > 1
                for rnd, batch in batches(policies, args.rounds, side):
                    batch = [pol for pol in batch if pol not in runs]  # not if a round failed
                    if not batch:
                        continue
                    run_id += 1
                    specs = [replace(spec0, name=sc.name, policy=pol, gateways=sc.gateways,
                                     link_mbit=sc.link_mbit, cpu_share=sc.cpu_share,
                                     trace=sc.trace, hangs=sc.hangs,
                                     windows=windows if sc.trace else
                                     split_windows(windows, args.rounds, rnd))
                             for pol in batch]
                    what = "side by side" if side else batch[0]
                    log.info("run %d: %s / %s (round %d of %d)", run_id, sc.name,
                             ", ".join(batch) + (" side by side" if side else ""), rnd + 1,
                             args.rounds)
                    try:
                        datas = Run(tb, specs, work / f"{run_id:03d}-{sc.name}-"
                                    f"{what.replace(' ', '-')}", run_id,
                                    profile_rate=PROFILE_HZ if args.profile else 0).execute()
                    except TestbedError as exc:
                        log.error("%s / %s failed: %s", sc.name, what, exc)
                        for pol in batch:
                            runs[pol] = {"error": str(exc), "latency_ms": {"p50": None},
                                         "hit_rate": None}
                        continue
                    for pol, data in zip(batch, datas, strict=True):
                        parts[pol].append(data)
                        # Other work on the machine shows up as CPU contention: keep it.
                        loads[pol].append(round(os.getloadavg()[0], 2))
                for pol in policies:
                    if pol in runs:
                        continue
                    m = runs[pol] = summarise(merged(parts[pol]))
                    m["rounds"] = len(parts[pol])
                    m["loadavg_1m"] = max(loads[pol])
                    log.info("  %s: p50 %s ms, p95 %s, hit %s, acc %s, E %s mJ, where %s, "
                             "server probes %s, before the first decision %s", pol,
                             m["latency_ms"]["p50"], m["latency_ms"]["p95"], m["hit_rate"],
                             m["accuracy"],
                             m["energy_mj_per_window"], m["where"], m["server_probes"],
                             m["before_first_decision"])
                doc["scenarios"][sc.name] = {
                    "group": sc.group, "link_mbit": sc.link_mbit, "cpu_share": sc.cpu_share,
                    "gateways": sc.gateways, "trace": sc.trace, "hangs": sc.hangs,
                    "side_by_side": side,
                    "runs": runs,
                    "headline": headline(runs)}
                if args.profile:
                    doc["scenarios"][sc.name]["profile"] = profile_policies(
                        parts, args.out, sc.name)
                _write(args.out, doc)
    finally:
        if args.keep_logs:
            log.info("logs kept in %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    doc["finished"] = time.time()
    doc["goals"] = check(doc)
    _write(args.out, doc)
    for path in plot_all(doc, args.out.parent, args.out.stem):
        print(f"wrote {path}")
    print(table(doc))
    for name, sc in doc["scenarios"].items():
        if sc.get("profile") and "same_as" not in sc:
            print(profile.stage_table(f"{name}: py-spy samples per window ({PROFILE_HZ} Hz: "
                                      f"{1000 // PROFILE_HZ} ms each)", sc["profile"]))
    print(summary(doc["goals"]))
    return 0


def _bundle_id(bundle: Path) -> str:
    """The bundle's id from its manifest."""
    from edgetok.models.bundle import read_manifest

    return read_manifest(bundle).bundle_id


def _cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0))


def _write(path: Path, doc: dict[str, Any]) -> None:
    """Write the results document (after every scenario, so a crash keeps the rest)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))


def table(doc: dict[str, Any]) -> str:
    """A plain-text table: p50/p95/p99, hit rate, energy per policy, the median of the
    coordinator's prediction over each window's latency (pred/ms), the CPU quota's stalls
    per window (ms), and the ratio."""
    lines = [f"{'scenario':<15} {'policy':<12} {'p50':>8} {'p95':>8} {'p99':>8} {'hit':>6} "
             f"{'acc':>6} {'mJ/win':>8} {'B/win':>8} {'pred/ms':>7} {'stall':>6}  where"]
    for name, sc in doc["scenarios"].items():
        for pol, m in sc["runs"].items():
            if "error" in m:
                lines.append(f"{name:<15} {pol:<12} error: {m['error'][:60]}")
                continue
            lt = m["latency_ms"]
            lines.append(f"{name:<15} {pol:<12} {_f(lt['p50'])} {_f(lt['p95'])} "
                         f"{_f(lt['p99'])} {_f(m['hit_rate'], 6)} {_f(m['accuracy'], 6)} "
                         f"{_f(m['energy_mj_per_window'])} "
                         f"{_f(m['uplink_wire_bytes_per_window'])} "
                         f"{_f((m.get('predicted_over_measured') or {}).get('p50'), 7)} "
                         f"{_f(m.get('cpu_throttled_ms_per_window'), 6)}"
                         f"  {m['where']}")
        h = sc["headline"]
        if "ratio" in h:
            lines.append(f"{name:<15} joint/best static ({h['best_static']}) p50 ratio = "
                         f"{h['ratio']:.3f} (p95: {h.get('ratio_p95')}); joint hit >= best: "
                         f"{h['joint_hit_ge_best']}")
    return "\n".join(lines)


def _f(x: float | None, w: int = 8) -> str:
    """A table cell: 3 significant digits, or a dash."""
    return f"{'-':>{w}}" if x is None else f"{x:>{w}.3g}"


if __name__ == "__main__":
    raise SystemExit(main())
