"""The issue's goals, checked on an e2e results document: ratios, hit rates, and where the
0.6× goal applies (a scenario whose link passes rates with different best static choices)."""

from __future__ import annotations

import statistics
from typing import Any

from edgetok.control import POLICY_NAMES

BASELINES = POLICY_NAMES[1:]
# joint p50 over the best static baseline's p50, in every scenario.
RATIO_ANYWHERE = 1.05
# ... and where the best static choice differs from one link rate to another.
RATIO_WHERE_BEST_DIFFERS = 0.6


def best_static_by_rate(sc: dict[str, Any]) -> dict[float, str]:
    """Per link rate a scenario's windows saw, the baseline with the lowest median latency
    over those windows (one rate for a fixed link; each phase of a trace)."""
    medians: dict[float, dict[str, float]] = {}
    for pol in BASELINES:
        run = sc["runs"].get(pol) or {}
        by_rate: dict[float, list[float]] = {}
        for w in run.get("per_window", []):
            if w.get("link_mbit") is not None:
                by_rate.setdefault(float(w["link_mbit"]), []).append(float(w["latency_ms"]))
        for rate, lat in by_rate.items():
            medians.setdefault(rate, {})[pol] = statistics.median(lat)
    return {rate: min(m, key=lambda p: m[p]) for rate, m in sorted(medians.items())
            if len(m) == len(BASELINES)}


def check(doc: dict[str, Any]) -> dict[str, Any]:
    """Per scenario: the p50 ratio and its goal, hit rate against the best baseline."""
    out: dict[str, Any] = {}
    for name, sc in doc["scenarios"].items():
        h = sc.get("headline", {})
        if "ratio" not in h or sc.get("same_as"):
            continue
        best = best_static_by_rate(sc)
        differs = len(set(best.values())) > 1
        goal = RATIO_WHERE_BEST_DIFFERS if differs else RATIO_ANYWHERE
        out[name] = {"ratio": h["ratio"], "best_static": h["best_static"],
                     "best_static_by_link_mbit": best, "best_differs": differs,
                     "ratio_goal": goal, "ratio_met": h["ratio"] <= goal,
                     "hit_met": bool(h.get("joint_hit_ge_best"))}
    return out


def summary(goals: dict[str, Any]) -> str:
    """One line per scenario, for the console."""
    lines = []
    for name, g in goals.items():
        lines.append(f"{name:<15} ratio {g['ratio']:.3f} (goal <= {g['ratio_goal']:g}: "
                     f"{'met' if g['ratio_met'] else 'MISSED'}); hit >= best: "
                     f"{'met' if g['hit_met'] else 'MISSED'}; best static by rate: "
                     f"{g['best_static_by_link_mbit']}")
    return "\n".join(lines)
