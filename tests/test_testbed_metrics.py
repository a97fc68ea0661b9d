"""The e2e figures: latency from publish to stored, deadline hits, accuracy, model energy."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from e2e import (  # noqa: E402
    Scenario,
    batches,
    headline,
    lane_orders,
    round_order,
    scenarios,
    side_by_side,
    split_windows,
)
from testbed.driver import parse_gateways  # noqa: E402
from testbed.goals import (  # noqa: E402
    check,
    hit_gap_interval,
    hit_goal_odds,
    misses_by_side,
    ratio_by_round,
    ratio_interval,
    round_ratio_interval,
    same_variant_share,
    settled_ratio,
    summary,
    where_the_gap_arises,
)
from testbed.metrics import summarise  # noqa: E402
from testbed.run import (  # noqa: E402
    KAPPA,
    P_MAX_W,
    RunData,
    RunSpec,
    gain_for,
    lane_data,
    merged,
    rate_for,
)


def _spec(**kw: Any) -> RunSpec:
    """A run spec with test defaults."""
    base = RunSpec(name="t", policy="joint", gateways=1, link_mbit=2.0, cpu_share=0.5,
                   deadline_ms=100.0, window_rate=2.0, windows=3, warmup=1,
                   bundle=Path("unused"), nominal_hz=2e9, coordinator="server",
                   actuators=False)
    return replace(base, **kw)


def _result(window: int, created: float, label: str, where: str, head_ms: float) -> dict:
    """A stored result as the gateway publishes it."""
    return {"gateway": "g0", "window": window, "created_ts": created, "label": label,
            "where": where, "variant": {"id": "r0.00-s2", "precision": "fp16"},
            "latency_ms": {"queue": 0.1, "head": head_ms, "uplink": 1.0, "tail": 1.0,
                           "total": 3.0}}


def _data(spec: RunSpec) -> RunData:
    """Four windows: one warm-up, one on time, one late and wrong, one missing."""
    sent = [{"gateway": "g0", "window": w, "t_pub": 1000.0 + w, "label": lab, "warmup": w == 0}
            for w, lab in enumerate(["walking", "running", "walking", "standing"])]
    results = [_result(0, 1000.5, "walking", "split", 1.0),     # warm-up: ignored
               _result(1, 1001.020, "running", "split", 2.0),   # 20 ms, right
               _result(2, 1002.250, "Running", "device-fallback", 4.0)]  # 250 ms, wrong
    # window 3 never produced a result: a miss
    return RunData(spec, {"started": 1000.0, "sent": sent, "results": results,
                          "frames": [{"gateway": "g0", "window": 1, "bytes": 1000},
                                     {"gateway": "g0", "window": 2, "bytes": 1000}],
                          "decisions": []},
                   wire_bytes=[5000], rate_log=[(0.0, spec.link_mbit)])


def test_latency_hits_accuracy_and_missing_windows() -> None:
    """Latency is stored minus published; misses and wrong labels count."""
    m = summarise(_data(_spec()))
    assert m["windows"] == 3 and m["missing"] == 1
    lat = [r["latency_ms"] for r in m["per_window"]]
    assert lat == pytest.approx([20.0, 250.0], abs=1e-6)
    assert m["hit_rate"] == pytest.approx(1 / 3, abs=1e-3)
    assert m["accuracy"] == 0.5  # labels compare case-insensitively; 'Running' != 'walking'
    assert m["where"] == {"split": 1, "device-fallback": 1}
    assert m["uplink_wire_bytes"] == 5000


def test_energy_is_the_system_model_on_measured_time_and_bytes() -> None:
    """E = κ·C·f² + p·S/r with measured head time, frame bytes and the link rate."""
    spec = _spec()
    m = summarise(_data(spec))
    f = spec.f_max_hz  # actuators off: the full clock of the emulated device
    rate = spec.link_mbit * 1e6
    want = [(KAPPA * (h / 1000 * f) * f**2 + P_MAX_W * 1000 * 8 / rate) * 1000
            for h in (2.0, 4.0)]
    assert [r["energy_mj"] for r in m["per_window"]] == pytest.approx(want, rel=1e-3)


def test_server_probes_are_counted_and_charged_to_the_window_that_sent_them() -> None:
    """A probe after a window done on the device costs its radio energy as a frame does:
    the driver adds its bytes to that window's, and the run counts the probes."""
    spec = _spec()
    data = _data(spec)
    data.driver["frames"][0].update(bytes=1000 + 2 * 700, probes=2)
    m = summarise(data)
    assert m["server_probes"] == 2
    plain = summarise(_data(spec))
    assert plain["server_probes"] == 0
    extra = P_MAX_W * 1400 * 8 / (spec.link_mbit * 1e6) * 1000
    assert m["per_window"][0]["energy_mj"] == pytest.approx(
        plain["per_window"][0]["energy_mj"] + extra, rel=1e-6)


def test_decisions_in_force_set_clock_and_power_when_actuators_run() -> None:
    """With actuators, the decision's clock and power (and r(p)) enter the energy."""
    spec = _spec(actuators=True)
    data = _data(spec)
    data.driver["decisions"] = [{"gateway": "g0", "epoch": 1, "seq": 1, "received_ts": 999.0,
                                 "cpu_hz": 0.5e9, "tx_power_w": 0.01}]
    m = summarise(data)
    f, p = 0.5e9, 0.01
    want = (KAPPA * (2.0 / 1000 * f) * f**2 + p * 1000 * 8 / rate_for(p, 2e6)) * 1000
    assert m["per_window"][0]["energy_mj"] == pytest.approx(want, rel=1e-3)


def test_the_prediction_in_force_is_compared_with_each_windows_latency() -> None:
    """The decision's latency_ms over the window's own total, decision by decision: what a
    user reads on the gateway's status page beside what it measured."""
    data = _data(_spec())
    base = {"gateway": "g0", "epoch": 1, "cpu_hz": 1e9, "tx_power_w": 0.01}
    data.driver["decisions"] = [{**base, "seq": 1, "received_ts": 999.0, "latency_ms": 1.5},
                                {**base, "seq": 2, "received_ts": 1001.5, "latency_ms": 6.0}]
    ratio = summarise(data)["predicted_over_measured"]
    assert ratio["p10"] == pytest.approx(0.5 + 0.1 * 1.5) and ratio["p90"] == pytest.approx(
        2.0 - 0.1 * 1.5), "window 1 ran under 1.5 ms (0.5 of its 3), window 2 under 6 (2.0)"
    assert summarise(_data(_spec(coordinator="static")))["predicted_over_measured"] is None


def test_windows_published_before_the_first_decision_are_counted() -> None:
    """A lane runs its configured start until the coordinator first speaks: the windows
    published before then are counted, those after are not; a static lane has none."""
    data = _data(_spec())
    data.driver["decisions"] = [{"gateway": "g0", "epoch": 1, "seq": 1, "received_ts": 1001.5,
                                 "cpu_hz": 1e9, "tx_power_w": 0.01}]
    assert summarise(data)["before_first_decision"] == 1, "window 1 only; 2 and 3 came after"
    assert summarise(_data(_spec()))["before_first_decision"] == 3
    assert summarise(_data(_spec(coordinator="static")))["before_first_decision"] == 0


def test_full_power_gives_the_scenario_rate() -> None:
    """At p_max the emulated channel gives the scenario rate; less power, less rate."""
    assert rate_for(P_MAX_W, 7e6) == pytest.approx(7e6, rel=1e-9)
    assert rate_for(P_MAX_W / 10, 7e6) < 7e6
    assert gain_for(20e6) > gain_for(1e6)


def test_decisions_are_counted_for_this_runs_gateways_only() -> None:
    """Retained decisions of earlier runs' gateways reach the driver but are not this run's."""
    spec = _spec(actuators=True)
    data = _data(spec)
    data.driver["decisions"] = [
        {"gateway": g, "epoch": 1, "seq": 1, "received_ts": 999.0, "cpu_hz": 0.5e9,
         "tx_power_w": 0.01} for g in ("g0", "g0", "old-r1", "old-r2", "old-r3")]
    assert summarise(data)["decisions"] == 2


def _run(lat_by_rate: dict[float, float], n: int = 5) -> dict[str, Any]:
    rows = [{"link_mbit": r, "latency_ms": ms} for r, ms in lat_by_rate.items()
            for _ in range(n)]
    return {"per_window": rows}


def test_goals_apply_the_strict_ratio_only_where_the_best_static_choice_changes() -> None:
    # A trace: on-device wins at the low rate, server-only at the high one.
    trace = {"device-only": _run({50.0: 30.0, 0.5: 30.0}),
             "server-only": _run({50.0: 10.0, 0.5: 90.0}),
             "fixed-split": _run({50.0: 20.0, 0.5: 60.0})}
    flat = {"device-only": _run({10.0: 5.0}), "server-only": _run({10.0: 9.0}),
            "fixed-split": _run({10.0: 7.0})}
    doc = {"deadline_ms": 100.0, "scenarios": {
        "trace": {"runs": trace, "headline": {"ratio": 0.7, "best_static": "device-only",
                                              "joint_hit_ge_best": True}},
        "flat": {"runs": flat, "headline": {"ratio": 1.04, "best_static": "device-only",
                                            "joint_hit_ge_best": False}},
        "again": {"runs": flat, "same_as": "flat",
                  "headline": {"ratio": 1.04, "best_static": "device-only"}}}}
    goals = check(doc)
    assert set(goals) == {"trace", "flat"}  # a repeated scenario is judged once
    t, f = goals["trace"], goals["flat"]
    assert t["best_static_by_link_mbit"] == {0.5: "device-only", 50.0: "server-only"}
    # Switching alone: server's 10s at 50, device's 30s at 0.5, median 20; best static
    # device-only at 30. A goal of 0.6 lies beyond what switching between baselines gives.
    assert t["switching_bound"] == pytest.approx(20 / 30, abs=1e-3)
    assert f["switching_bound"] == 1.0
    assert t["best_differs"] and t["ratio_goal"] == 0.6 and not t["ratio_met"]
    assert not f["best_differs"] and f["ratio_goal"] == 1.05 and f["ratio_met"]
    assert t["hit_met"] and not f["hit_met"]
    # Without per-window stages there is no split at the close, and the console says so.
    assert "ratio_after_close" not in t and "before it: - ms" in summary(goals)


def test_the_headline_ratio_is_against_the_best_static_at_each_percentile() -> None:
    """p50 against the baseline best at p50; p95 against the one best at p95, which on a
    trace can be another (fast most of the time, slow in the drop)."""
    def m(p50: float, p95: float, hit: float) -> dict[str, Any]:
        return {"latency_ms": {"p50": p50, "p95": p95}, "hit_rate": hit}

    h = headline({"joint": m(10.0, 12.0, 1.0), "device-only": m(14.0, 15.0, 1.0),
                  "server-only": m(11.0, 40.0, 0.9), "fixed-split": m(20.0, 30.0, 1.0)})
    assert h["best_static"] == "server-only" and h["ratio"] == pytest.approx(10 / 11, abs=1e-3)
    assert h["best_static_p95"] == "device-only"
    assert h["ratio_p95"] == pytest.approx(12 / 15, abs=1e-3)
    assert h["joint_hit_ge_best"]
    assert not headline({"joint": m(10.0, 12.0, 0.8), "device-only": m(9.0, 11.0, 0.9)}
                        )["joint_hit_ge_best"]


def test_the_matrix_has_a_trace_whose_best_static_choice_changes_off_the_pi_class() -> None:
    """Beside the Pi-class one, a trace on a gateway fast enough for the device to win the
    slow phase: the only kind of scenario the 0.6x goal can apply to."""
    traces = [sc for sc in scenarios(False, 60.0, 16) if sc.trace]
    assert {sc.group for sc in traces} == {"trace", "trace-pi", "trace-cpu"}
    tie = next(sc for sc in traces if sc.group == "trace-cpu")
    assert 0.1 < tie.cpu_share < 1.0 and tie.gateways == 1
    assert [r for _, r in tie.trace] == [50.0, 0.5, 50.0]
    assert [t for t, _ in tie.trace] == [0.0, 20.0, 40.0]


def test_the_hang_scenario_hangs_the_servers_inside_each_round_of_a_pi_class_gateway() -> None:
    """Its hang starts a third into a round's replay and ends well before the round does,
    so each round measures the hang and the recovery after it."""
    replay_s, rounds = 60.0, 4
    (hang,) = [sc for sc in scenarios(False, replay_s, 16, rounds) if sc.hangs]
    assert hang.cpu_share == 0.1 and not hang.trace and hang.gateways == 1
    ((at, secs),) = hang.hangs
    assert at == pytest.approx(replay_s / rounds / 3)
    assert at + secs < replay_s / rounds - 5.0


def test_the_ratio_interval_tells_noise_from_a_real_difference() -> None:
    """Joint running the best static's own variant from the same spread of latencies: the
    interval straddles 1. Joint twice as slow: the interval is far from it."""
    rng = np.random.default_rng(7)

    def run(scale: float, variant: str) -> dict[str, Any]:
        return {"per_window": [{"latency_ms": float(x), "variant": variant}
                               for x in scale * rng.lognormal(np.log(6.0), 0.2, 120)]}

    same = {"runs": {"joint": run(1.0, "r0.75-s6"), "device-only": run(1.0, "r0.75-s6")},
            "headline": {"best_static": "device-only"}}
    lo, hi = ratio_interval(same) or (0.0, 0.0)
    assert lo < 1.0 < hi and hi - lo < 0.25
    assert same_variant_share(same) == 1.0
    slow = {"runs": {"joint": run(2.0, "r0.75-s0"), "device-only": run(1.0, "r0.75-s6")},
            "headline": {"best_static": "device-only"}}
    lo, hi = ratio_interval(slow) or (0.0, 0.0)
    assert 1.5 < lo < 2.0 < hi < 2.5
    assert same_variant_share(slow) == 0.0


def test_a_gap_carried_by_one_round_is_within_the_rounds_interval() -> None:
    """Fleets run one after another: joint's fleet 15% slower in one round of four and level
    in the others is a round's mood, not the policy's. Windows alone call it significant;
    resampling the rounds does not, and a gap in every round stays significant."""
    rng = np.random.default_rng(3)

    def fleet(first_run: int, scales: list[float]) -> dict[str, Any]:
        return {"per_window": [{"gateway": f"g{g}-r{first_run + 4 * k}", "latency_ms": float(x)}
                               for k, scale in enumerate(scales) for g in range(4)
                               for x in scale * rng.lognormal(np.log(7.0), 0.1, 60)]}

    def scenario(joint: list[float]) -> dict[str, Any]:
        return {"runs": {"joint": fleet(9, joint), "device-only": fleet(10, [1.0] * 4)},
                "headline": {"best_static": "device-only"}}

    one_round = scenario([1.0, 1.0, 1.0, 1.15])
    # Run ids order the rounds as numbers: joint's r9 comes before its r13, r17 and r21.
    by_round = ratio_by_round(one_round) or []
    assert len(by_round) == 4 and by_round[3] > 1.1
    assert all(abs(r - 1) < 0.03 for r in by_round[:3])
    lo_w, hi_w = ratio_interval(one_round) or (0.0, 0.0)
    lo, hi = round_ratio_interval(one_round) or (0.0, 0.0)
    assert lo_w > 1.0 and lo < 1.0 < hi and hi - lo > hi_w - lo_w
    lo, hi = round_ratio_interval(scenario([1.15] * 4)) or (0.0, 0.0)
    assert 1.1 < lo < 1.15 < hi < 1.2
    assert round_ratio_interval({"runs": {"joint": fleet(9, [1.0]),
                                          "device-only": fleet(10, [1.0])},
                                 "headline": {"best_static": "device-only"}}) is None


def test_rounds_follow_a_balanced_latin_square_and_share_the_windows() -> None:
    """Over as many rounds as policies, each policy runs once in every place and once right
    after every other one, so neither a drift nor the run before favours a policy."""
    pols = ["joint", "device-only", "server-only", "fixed-split"]
    order = round_order(pols, 4)
    rows = [[p for r, p in order if r == k] for k in range(4)]
    assert rows[0] == ["joint", "device-only", "fixed-split", "server-only"]
    for place in range(4):
        assert sorted(row[place] for row in rows) == sorted(pols)
    pairs = [(row[i], row[i + 1]) for row in rows for i in range(3)]
    assert len(set(pairs)) == len(pairs) == 4 * 3
    # An odd number takes twice as many rounds: each pair then follows twice.
    odd = [[p for r, p in round_order(["a", "b", "c"], 6) if r == k] for k in range(6)]
    assert all(sorted(row[i] for row in odd) == ["a", "a", "b", "b", "c", "c"]
               for i in range(3))
    odd_pairs = [(row[i], row[i + 1]) for row in odd for i in range(2)]
    assert all(odd_pairs.count(pair) == 2 for pair in set(odd_pairs)) and len(set(odd_pairs)) == 6
    assert [p for _, p in round_order(["a", "b"], 3)] == ["a", "b", "b", "a", "a", "b"]
    assert [p for _, p in round_order(["a"], 2)] == ["a", "a"]
    assert [split_windows(61, 2, r) for r in range(2)] == [31, 30]
    assert sum(split_windows(60, 7, r) for r in range(7)) == 60


def test_rounds_merge_into_one_run_of_all_their_windows() -> None:
    """Two rounds summarise as one run: every window once, each run's decisions once."""
    spec = _spec(actuators=True)
    first, second = _data(spec), _data(spec)
    later = 100.0
    second.driver["started"] += later
    for row in second.driver["sent"]:
        row["gateway"], row["t_pub"] = "g0-r2", row["t_pub"] + later
    for row in second.driver["results"]:
        row["gateway"], row["created_ts"] = "g0-r2", row["created_ts"] + later
    for row in second.driver["frames"]:
        row["gateway"] = "g0-r2"
    decision = {"gateway": "g0", "epoch": 1, "seq": 1, "received_ts": 999.0,
                "cpu_hz": 0.5e9, "tx_power_w": 0.01}
    first.driver["decisions"] = [decision]
    # The second round's driver sees the first's retained decision again, and its own.
    second.driver["decisions"] = [decision, {**decision, "gateway": "g0-r2",
                                             "received_ts": 1099.0}]
    one, both = summarise(first), summarise(merged([first, second]))
    assert both["windows"] == 2 * one["windows"] and both["missing"] == 2 * one["missing"]
    assert both["hit_rate"] == one["hit_rate"] and both["accuracy"] == one["accuracy"]
    assert both["latency_ms"]["p50"] == one["latency_ms"]["p50"]
    assert both["uplink_wire_bytes"] == 2 * one["uplink_wire_bytes"]
    assert both["decisions"] == 2
    # Each round's windows keep their time from their own replay's start (a trace's plot
    # restarts with the trace), not from the first round's.
    assert [r["t"] for r in both["per_window"]] == [r["t"] for r in one["per_window"]] * 2
    assert merged([first]) is first


def test_side_by_side_lanes_rotate_so_every_policy_takes_every_slot() -> None:
    """Lane k's windows go out k slots into the period (and on host k): over as many rounds
    as policies, each policy has had each slot once."""
    pols = ["joint", "device-only", "server-only", "fixed-split"]
    orders = lane_orders(pols, 4)
    assert orders[0] == pols
    for slot in range(4):
        assert sorted(order[slot] for order in orders) == sorted(pols)
    assert batches(pols, 2, side=True) == [(0, pols), (1, pols[1:] + pols[:1])]
    assert batches(["a", "b"], 2, side=False) == [(0, ["a"]), (0, ["b"]), (1, ["b"]),
                                                  (1, ["a"])]


def test_only_one_gateway_scenarios_run_side_by_side() -> None:
    """Four fleets at once would quadruple the load on the server, which load-N varies."""
    assert side_by_side(Scenario("link-2", "link", link_mbit=2.0), sequential=False)
    assert not side_by_side(Scenario("link-2", "link", link_mbit=2.0), sequential=True)
    assert not side_by_side(Scenario("load-4", "load", gateways=4), sequential=False)


def test_driver_gateways_name_their_broker_port() -> None:
    assert parse_gateways("g0,g1@1884", 1883) == {"g0": 1883, "g1": 1884}
    for bad in ("", "g0,g0@1884", "g0@x", "@1884"):
        with pytest.raises(ValueError):
            parse_gateways(bad, 1883)


def test_a_lane_keeps_only_its_own_gateways_records() -> None:
    data = {"started": 1.0, "sent": [{"gateway": "a"}, {"gateway": "b"}],
            "results": [{"gateway": "b", "window": 1}], "frames": [],
            "decisions": [{"gateway": "a"}], "telemetry": [{"gateway": "b"}]}
    lane = lane_data(data, ["b"])
    assert lane["started"] == 1.0 and lane["sent"] == [{"gateway": "b"}]
    assert lane["results"] == data["results"] and lane["decisions"] == []
    assert lane["telemetry"] == [{"gateway": "b"}] and data["sent"][0] == {"gateway": "a"}


def test_e2e_refuses_a_scenario_name_the_matrix_does_not_have() -> None:
    """`--only pi-trace` (the scenario is pi-trace-50-0.5-50) once ran a smaller matrix
    without a word: now it stops before the test bed is built, naming the real ones."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "e2e.py"), "--only",
                          "link-50,pi-trace"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "no scenario named pi-trace;" in out.stderr
    assert "pi-trace-50-0.5-50" in out.stderr and "link-50" not in out.stderr.split(";")[0]


def test_a_gap_is_told_apart_before_and_after_the_window_closes() -> None:
    """Joint as fast as the best static from close to result but 2 ms later before the close
    (the lane's broker and ingest): the ratio after the close is 1 and the gap is in ingest."""
    def rows(before: float, after: float) -> list[dict[str, Any]]:
        return [{"latency_ms": before + after + d, "stages_ms": {"total": after + d}}
                for d in (-0.5, 0.0, 0.5)]

    sc = {"runs": {"joint": {"per_window": rows(6.0, 9.0)},
                   "server-only": {"per_window": rows(4.0, 9.0)}},
          "headline": {"best_static": "server-only"}}
    assert where_the_gap_arises(sc) == {"ratio_after_close": 1.0, "before_close_gap_ms": 2.0}
    sc["runs"]["joint"] = {"per_window": rows(4.0, 18.0)}
    assert where_the_gap_arises(sc) == {"ratio_after_close": 2.0, "before_close_gap_ms": 0.0}
    sc["runs"]["joint"] = {"per_window": []}
    assert where_the_gap_arises(sc) is None


def test_a_miss_is_the_lanes_when_its_part_after_the_close_would_have_made_it() -> None:
    """A window that stalled before its close (its close-to-result part as usual) is the
    lane's miss; one that was slow after the close is the decision's."""
    def row(before: float, after: float) -> dict[str, Any]:
        return {"latency_ms": before + after, "stages_ms": {"total": after}}

    usual = [row(10.0, 30.0)] * 5
    sc = {"runs": {"joint": {"per_window": [*usual, row(80.0, 30.0), row(10.0, 95.0)]}}}
    assert misses_by_side(sc, "joint", 100.0) == (1, 1)
    assert misses_by_side(sc, "joint", 200.0) == (0, 0)
    assert misses_by_side(sc, "server-only", 100.0) is None


def test_the_settled_ratio_leaves_out_each_rounds_learning() -> None:
    """Joint twice as slow in the first seconds of each round, level after: the headline
    pays for the learning, the settled ratio does not."""
    def rows(first_ms: float) -> list[dict[str, Any]]:
        return [{"t": t, "latency_ms": first_ms if t < 5.0 else 10.0 + 0.2 * t}
                for _ in range(4) for t in np.arange(0.0, 15.0, 0.5)]

    sc = {"runs": {"joint": {"per_window": rows(20.0)},
                   "device-only": {"per_window": rows(10.0)}},
          "headline": {"best_static": "device-only"}}
    assert settled_ratio(sc) == 1.0
    joint = np.median([w["latency_ms"] for w in sc["runs"]["joint"]["per_window"]])
    assert joint > 1.05 * np.median([w["latency_ms"] for w in rows(10.0)])
    late = {"runs": {"joint": {"per_window": [{"t": 1.0, "latency_ms": 9.0}]},
                     "device-only": {"per_window": rows(10.0)}},
            "headline": {"best_static": "device-only"}}
    assert settled_ratio(late) is None


def _hit_scenario(late: dict[str, int], missing: dict[str, int] | None = None
                  ) -> dict[str, Any]:
    """120 windows per policy, `late[policy]` of them past a 100 ms deadline."""
    def run(pol: str) -> dict[str, Any]:
        rows = [{"latency_ms": 150.0 if i < late.get(pol, 0) else 40.0} for i in range(120)]
        return {"per_window": rows, "missing": (missing or {}).get(pol, 0)}
    return {"runs": {pol: run(pol) for pol in ("joint", "device-only", "server-only",
                                                "fixed-split")}}


def test_the_hit_gap_tells_one_window_from_a_real_difference() -> None:
    """One window of 120 behind the best baseline: an interval that takes in 0. Thirty
    behind, or windows without a result: far below it."""
    point, lo, hi = hit_gap_interval(_hit_scenario({"joint": 1}), 100.0) or (0, 0, 0)
    assert point == pytest.approx(-1 / 120, abs=1e-4) and lo < point < hi and hi >= 0.0
    point, lo, hi = hit_gap_interval(_hit_scenario({"joint": 30}), 100.0) or (0, 0, 0)
    assert point == pytest.approx(-0.25, abs=1e-4) and hi < -0.15
    point, _, hi = hit_gap_interval(_hit_scenario({}, {"joint": 30}), 100.0) or (0, 0, 0)
    assert point == pytest.approx(-30 / 150, abs=1e-4) and hi < -0.1
    assert hit_gap_interval({"runs": {"joint": {"per_window": []}}}, 100.0) is None


def test_the_odds_of_an_equal_policy_meeting_the_hit_goal_fall_with_the_miss_rate() -> None:
    """No misses anywhere: an equal policy always meets the goal. At about 1% in every
    lane it meets it less than half the time, as a Poisson count of 1.2 gives (0.43)."""
    assert hit_goal_odds(_hit_scenario({}), 100.0) == 1.0
    one_pct = _hit_scenario({pol: 1 for pol in ("device-only", "server-only", "fixed-split")}
                            | {"joint": 2})
    assert 0.33 < (hit_goal_odds(one_pct, 100.0) or 1.0) < 0.53
    worse = _hit_scenario({"joint": 6, "device-only": 6, "server-only": 6, "fixed-split": 6})
    assert (hit_goal_odds(worse, 100.0) or 1.0) < (hit_goal_odds(one_pct, 100.0) or 0.0)


def test_each_window_is_split_at_its_close_and_quota_stalls_are_counted() -> None:
    """Before the close: stored minus published minus the gateway's own total; the quota's
    stalls over the windows sent; unreadable stalls leave the figure out."""
    data = _data(_spec())
    data.throttled_s = [0.004, None]
    m = summarise(data)
    # Windows 1 and 2: 20 and 250 ms end to end, 3 ms each from close to result.
    assert m["split_ms"] == {"before_close": pytest.approx(132.0), "after_close": 3.0}
    assert m["cpu_throttled_ms_per_window"] == pytest.approx(1.0)  # 4 ms over 4 sent
    data.throttled_s = [None]
    assert summarise(data)["cpu_throttled_ms_per_window"] is None
