"""`edgetok plan`: the coordinator's decision for one scenario, for people planning capacity."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgetok.agent.coordinator.model import ModelError, OptionTable, options_from_manifest
from edgetok.agent.coordinator.policies import PolicyError, make_policy
from edgetok.agent.coordinator.scenario import Scenario, load_scenario
from edgetok.agent.coordinator.solver import Choice, Solution, choice, rank, solve_options
from edgetok.control import POLICY_NAMES
from edgetok.models.bundle import MANIFEST, BundleError, Manifest, load_manifest, read_manifest
from edgetok.settings import ConfigError

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_INFEASIBLE = 1
EXIT_USAGE = 2

EPILOG = """\
scenario file (TOML; SI units except ms and mJ):
  [link]    bandwidth_hz, gain, noise_w_per_hz, p_max_w
  [device]  f_min_hz, f_max_hz, reference_hz (optional: defaults to the bundle's), kappa
  [server]  slowdown, queue_ms               (optional table)
  [budget]  deadline_ms, energy_mj (optional), privacy_min_split (optional)
  objective = "accuracy" | "output_distortion"  (optional, top level)
  prefer = "energy" | "latency"  (optional, top level: what breaks ties after the objective,
           and whether each option runs as slow and frugal or as fast as the budget allows)
examples are in configs/scenarios/.

exit status: 0 a feasible decision, 1 nothing meets the deadline and energy budget (the
option with the smallest deadline overrun is printed, marked infeasible), 2 bad input.
"""


def parser() -> argparse.ArgumentParser:
    """The argument parser of `edgetok plan`."""
    p = argparse.ArgumentParser(
        prog="edgetok plan", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print the coordinator's choice of pruning ratio, split, feature precision, "
        "CPU clock and transmit power for one gateway in one scenario, from the bundle's "
        "build-time profile.")
    p.add_argument("--bundle", required=True, type=Path,
                   help="bundle directory (or its manifest.json); only the profile is read")
    p.add_argument("--scenario", required=True, type=Path, help="scenario TOML file")
    p.add_argument("--policy", default="joint", choices=POLICY_NAMES,
                   help="policy to plan with (default: joint)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--explain", action="store_true",
                   help="also list every candidate with its inputs and best (f, p)")
    p.add_argument("--verify", action="store_true",
                   help="check the sha256 of every bundle file, not just parse the manifest")
    return p


def _manifest(path: Path, verify: bool) -> Manifest:
    root = path.parent if path.name == MANIFEST or path.suffix == ".json" else path
    return load_manifest(root) if verify else read_manifest(root)


def _decision(table: OptionTable, c: Choice, policy: str) -> dict[str, Any]:
    o = c.option
    return {
        "bundle": table.bundle, "policy": policy, "variant": o.variant,
        "pruning_ratio": o.pruning_ratio, "split": o.split, "precision": o.precision,
        "cpu_hz": c.f_hz, "tx_power_w": c.p_w,
        "predicted": {"latency_ms": c.latency_s * 1e3, "energy_mj": c.energy_j * 1e3,
                      "distortion": c.distortion, "accuracy": o.accuracy},
        "feasible": c.feasible,
    }


def _candidates(table: OptionTable, sol: Solution, allowed: np.ndarray,
                best: int) -> list[dict[str, Any]]:
    rows = []
    for i, o in enumerate(table.options):
        rows.append({
            "variant": o.variant, "precision": o.precision, "split": o.split,
            "c_head_cycles": o.c_head, "s_bytes": o.s_bytes, "t_tail_ms": o.t_tail_s * 1e3,
            "distortion": o.distortion, "accuracy": o.accuracy,
            "cpu_hz": float(sol.f[i]), "tx_power_w": float(sol.p[i]),
            "latency_ms": float(sol.latency[i]) * 1e3, "energy_mj": float(sol.energy[i]) * 1e3,
            "feasible": bool(sol.feasible[i]), "allowed": bool(allowed[i]), "chosen": i == best,
        })
    return rows


def _text(out: dict[str, Any], scenario: Scenario, rows: list[dict[str, Any]] | None) -> str:
    pr = out["predicted"]
    acc = "n/a" if pr["accuracy"] is None else f"{pr['accuracy']:.4f}"
    budget = scenario.budget
    lines = [
        f"bundle {out['bundle']}  policy {out['policy']}  objective {scenario.objective}  "
        f"prefer {scenario.prefer}",
        f"decision: {out['variant']} {out['precision']}  cpu {out['cpu_hz'] / 1e9:.3f} GHz  "
        f"tx {out['tx_power_w'] * 1e3:.3f} mW",
        f"predicted: latency {pr['latency_ms']:.3f} ms (deadline {budget.deadline_ms:g})  "
        f"energy {pr['energy_mj']:.4f} mJ (budget {budget.energy_mj:g})  "
        f"distortion {pr['distortion']:.4f}  accuracy {acc}",
        "feasible" if out["feasible"] else "INFEASIBLE: no option meets the deadline and "
        "energy budget; this one overruns the least",
    ]
    if rows is not None:
        lines.append("")
        lines.append(f"  {'variant':<10} {'q':<5} {'C_head[Mcyc]':>12} {'S[B]':>8} "
                     f"{'T_tail[ms]':>10} {'D':>7} {'f[GHz]':>7} {'p[mW]':>9} {'T[ms]':>8} "
                     f"{'E[mJ]':>9}  status")
        for r in rows:
            status = ("chosen" if r["chosen"] else "feasible" if r["feasible"]
                      else "infeasible")
            if not r["allowed"]:
                status = "excluded"
            lines.append(
                f"{'*' if r['chosen'] else ' '} {r['variant']:<10} {r['precision']:<5} "
                f"{r['c_head_cycles'] / 1e6:>12.3f} {r['s_bytes']:>8.0f} {r['t_tail_ms']:>10.3f} "
                f"{r['distortion']:>7.4f} {r['cpu_hz'] / 1e9:>7.3f} "
                f"{r['tx_power_w'] * 1e3:>9.3f} {r['latency_ms']:>8.3f} {r['energy_mj']:>9.4f}"
                f"  {status}")
        lines.append("excluded = outside the policy or below privacy_min_split; infeasible "
                     "rows show the fastest (f, p), or the least-energy one if only the "
                     "energy budget is missed")
    return "\n".join(lines)


def run(bundle: Path, scenario_path: Path, policy: str = "joint", explain: bool = False,
        verify: bool = False) -> tuple[dict[str, Any], Scenario, list[dict[str, Any]] | None]:
    """Plan one scenario: the decision dict, the scenario, and the candidate rows if asked."""
    scenario = load_scenario(scenario_path)
    manifest = _manifest(bundle, verify)
    if scenario.budget.privacy_min_split > manifest.num_layers:
        raise ConfigError(str(scenario_path), [
            f"budget.privacy_min_split: {scenario.budget.privacy_min_split} is more than the "
            f"bundle's {manifest.num_layers} layers"])
    table = options_from_manifest(manifest, scenario.objective, scenario.device.reference_hz)
    env = scenario.environment()
    pol = make_policy(policy, table, env)
    sol = solve_options(table, env, prefer=scenario.prefer)
    best = int(rank(table, sol, pol.allowed, prefer=scenario.prefer)[0])
    out = _decision(table, choice(table, sol, best), policy)
    rows = _candidates(table, sol, pol.allowed, best) if explain else None
    return out, scenario, rows


def main(argv: list[str]) -> int:
    """Entry point of `edgetok plan`; returns the exit status."""
    args = parser().parse_args(argv)
    try:
        out, scenario, rows = run(args.bundle, args.scenario, args.policy, args.explain,
                                  args.verify)
    except ConfigError as exc:
        print(f"edgetok plan: bad scenario {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (BundleError, ModelError, PolicyError) as exc:
        print(f"edgetok plan: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        if rows is not None:
            out = {**out, "candidates": rows}
        print(json.dumps(out, indent=2))
    else:
        print(_text(out, scenario, rows))
    return EXIT_OK if out["feasible"] else EXIT_INFEASIBLE
