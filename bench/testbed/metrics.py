"""Figures of one run: end-to-end latency, deadline hits, energy, accuracy and bytes."""

from __future__ import annotations

import bisect
import collections
from typing import Any

import numpy as np

from testbed.run import KAPPA, P_MAX_W, RunData, rate_for


def _decision_at(decisions: list[dict[str, Any]], gateway: str, ts: float
                 ) -> dict[str, Any] | None:
    """The newest decision for `gateway` the broker had delivered by time ts."""
    mine = [d for d in decisions if d.get("gateway") == gateway and d["received_ts"] <= ts]
    return max(mine, key=lambda d: (d["epoch"], d["seq"])) if mine else None


def _rate_at(log: list[tuple[float, float]], ts: float) -> float:
    """Mbit/s the test bed had set at time ts."""
    i = bisect.bisect_right([t for t, _ in log], ts) - 1
    return log[max(i, 0)][1]


def summarise(data: RunData) -> dict[str, Any]:
    """Per-run metrics over the measured (non-warm-up) windows of every gateway."""
    s = data.spec
    drv = data.driver
    results = {(r["gateway"], r["window"]): r for r in drv["results"]}
    frames = {(f["gateway"], f["window"]): f["bytes"] for f in drv["frames"]}
    probes = {(f["gateway"], f["window"]): f.get("probes", 0) for f in drv["frames"]}
    cpu_on = s.actuators and s.coordinator != "static"
    tx_on = cpu_on and not s.trace
    lat, hit, correct, energy, fbytes, rows = [], [], [], [], [], []
    probed = 0  # server probes sent after measured windows
    after: list[float] = []  # window close to result: the part a decision has a say in
    predicted: list[float] = []  # the decision's latency_ms over the window's own
    where: collections.Counter[str] = collections.Counter()
    variants: collections.Counter[str] = collections.Counter()
    missing = 0
    undecided = 0  # measured windows published before their gateway's first decision
    for sent in drv["sent"]:
        if sent["warmup"]:
            continue
        key = (sent["gateway"], sent["window"])
        if s.coordinator != "static" and not _decision_at(drv["decisions"], sent["gateway"],
                                                          sent["t_pub"]):
            undecided += 1
        r = results.get(key)
        if r is None:
            missing += 1
            hit.append(False)
            continue
        ms = (r["created_ts"] - sent["t_pub"]) * 1000
        lat.append(ms)
        after.append(float(r["latency_ms"]["total"]))
        hit.append(ms <= s.deadline_ms)
        correct.append(r["label"].lower() == str(sent["label"]).lower())
        where[r["where"]] += 1
        variants[f"{r['variant']['id']}/{r['variant']['precision']}"] += 1
        d = _decision_at(drv["decisions"], sent["gateway"], r["created_ts"])
        f = d["cpu_hz"] if cpu_on and d else s.f_max_hz
        p = d["tx_power_w"] if tx_on and d and d["tx_power_w"] > 0 else P_MAX_W
        mbit = _rate_at(data.rate_log, sent["t_pub"])
        r_bps = rate_for(p, mbit * 1e6) if tx_on else mbit * 1e6
        # A frame sent before a fallback cost its transmit energy all the same, as do the
        # server probes sent after a window done on the device (counted in its bytes).
        nbytes = frames.get(key, 0)
        probed += probes.get(key, 0)
        # E = κ·C·f² + p·S/r(p), with C = measured head seconds × the clock in force.
        cycles = r["latency_ms"]["head"] / 1000 * f
        e_mj = (KAPPA * cycles * f * f + p * nbytes * 8 / r_bps) * 1000
        # Both from window close to result: what a user compares on the gateway's status.
        if (d is not None and d.get("latency_ms") is not None and s.coordinator != "static"
                and r["latency_ms"]["total"] > 0):
            predicted.append(d["latency_ms"] / r["latency_ms"]["total"])
        energy.append(e_mj)
        fbytes.append(nbytes)
        rows.append({"gateway": sent["gateway"], "window": sent["window"],
                     "t": round(sent["t_pub"] - _round_start(drv, sent["t_pub"]), 3),
                     "latency_ms": round(ms, 3),
                     "where": r["where"], "variant": r["variant"]["id"],
                     "stages_ms": r["latency_ms"], "energy_mj": round(e_mj, 4),
                     "frame_bytes": nbytes, "link_mbit": mbit})
    n = len(hit)
    mine = {sent["gateway"] for sent in drv["sent"]}
    arr = np.array(lat) if lat else np.array([np.nan])
    stalled = [x for x in data.throttled_s if x is not None]
    return {
        "windows": n, "missing": missing,
        "latency_ms": {"p50": _r(np.percentile(arr, 50)), "p95": _r(np.percentile(arr, 95)),
                       "p99": _r(np.percentile(arr, 99)), "mean": _r(float(np.mean(arr)))},
        # p50 of each window's latency before its close (publish, broker, ingest, journal)
        # and after it (queue, head, uplink, tail): where a gap between policies arises.
        "split_ms": ({"before_close": _r(float(np.median(arr - np.array(after)))),
                      "after_close": _r(float(np.median(after)))} if lat else None),
        # The gateways' CPU quota stalls during the replay, per window sent (warm-up too).
        "cpu_throttled_ms_per_window": (_r(1000 * sum(stalled) / max(len(drv["sent"]), 1))
                                        if stalled else None),
        "hit_rate": round(sum(hit) / n, 4) if n else None,
        # The coordinator's prediction in force over each window's latency (close to result).
        "predicted_over_measured": ({"p50": _r(float(np.median(predicted))),
                                     "p10": _r(float(np.percentile(predicted, 10))),
                                     "p90": _r(float(np.percentile(predicted, 90)))}
                                    if predicted else None),
        "accuracy": round(sum(correct) / len(correct), 4) if correct else None,
        "energy_mj_per_window": _r(float(np.mean(energy))) if energy else None,
        "frame_bytes_per_window": _r(float(np.mean(fbytes))) if fbytes else None,
        "server_probes": probed,
        "uplink_wire_bytes": int(sum(data.wire_bytes)),
        "uplink_wire_bytes_per_window": _r(sum(data.wire_bytes) / max(len(drv["sent"]), 1)),
        "where": dict(where), "variants": dict(variants.most_common()),
        # The driver also sees the retained decisions of every earlier run's gateways.
        "decisions": sum(1 for d in drv["decisions"] if d.get("gateway") in mine),
        # Lanes start from their own configured variant until the coordinator first speaks;
        # a measured window before that would be the start's doing, not the policy's.
        "before_first_decision": undecided,
        "exit_codes": data.exit_codes,
        "per_window": rows,
    }


def _r(x: float) -> float | None:
    """Round for JSON; None for NaN or infinity."""
    return None if not np.isfinite(x) else round(float(x), 3)


def _round_start(drv: dict[str, Any], t_pub: float) -> float:
    """When the replay that published at `t_pub` started: a trace's time axis restarts with
    each round, as the trace does."""
    starts = [t for t in drv.get("round_starts", [drv["started"]]) if t <= t_pub]
    return max(starts) if starts else float(drv["started"])
