"""report.json and PNG plots beside a bundle: accuracy, distortion, latency and bytes."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any

from edgetok.models.bundle import Manifest

log = logging.getLogger(__name__)

REPORT = "report.json"


def summarize(manifest: Manifest) -> dict[str, Any]:
    """Per-ratio and per-variant figures, plus whether parameter distortion bounds output."""
    ratios: dict[str, dict[str, Any]] = {}
    for v in manifest.variants:
        key = f"{v.pruning_ratio:.2f}"
        row = ratios.setdefault(key, {
            "ratio": v.pruning_ratio, "accuracy": v.profile.accuracy.get("fp32", 0.0),
            "params": 0, "param_distortion": v.profile.param_distortion,
            "output_distortion": v.profile.output_distortion, "splits": {},
            "before_recovery": manifest.build.get("before_recovery", {}).get(key)})
        row["params"] = max(row["params"], v.profile.params_head + v.profile.params_tail)
        row["splits"][str(v.split)] = {
            "head_ms": v.profile.head_ms, "tail_ms": v.profile.tail_ms,
            "head_ms_1t": v.profile.head_ms_1t, "tail_ms_1t": v.profile.tail_ms_1t,
            "flops_head": v.profile.flops_head, "flops_tail": v.profile.flops_tail,
            "feature_bytes": v.profile.feature_bytes, "accuracy": v.profile.accuracy}
    pruned = sorted((r for r in ratios.values() if r["ratio"] > 0), key=lambda r: r["ratio"])
    raw = [r["before_recovery"] for r in pruned if r["before_recovery"]]
    # The pruning-aware co-inference claim: output distortion grows with, and is bounded by
    # a multiple of, parameter distortion. Report the largest multiple and monotonicity,
    # for the pruned weights as cut (the claim's setting) and after recovery.
    bound = {name: {
        "max_output_over_param": max((r["output_distortion"] / r["param_distortion"]
                                      for r in rows if r["param_distortion"] > 0),
                                     default=None),
        "monotone_in_ratio": all(a["output_distortion"] <= b["output_distortion"] + 1e-12
                                 for a, b in itertools.pairwise(rows)),
    } for name, rows in (("after_recovery", pruned), ("before_recovery", raw))}
    return {"bundle_id": manifest.bundle_id, "num_layers": manifest.num_layers,
            "labels": manifest.labels, "ratios": ratios, "distortion_bound": bound,
            "build": {k: v for k, v in manifest.build.items() if k != "recipe"}}


def _plots(root: Path, summary: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(summary["ratios"].values(), key=lambda r: r["ratio"])
    made = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["ratio"] for r in rows], [r["accuracy"] for r in rows], "o-")
    ax.set(xlabel="pruning ratio", ylabel="test accuracy", ylim=(0, 1.02),
           title="accuracy vs pruning ratio")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(root / "accuracy_vs_ratio.png", dpi=110)
    made.append("accuracy_vs_ratio.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    pruned = [r for r in rows if r["ratio"] > 0]
    xs = [r["param_distortion"] for r in pruned]
    ys = [r["output_distortion"] for r in pruned]
    ax.plot(xs, ys, "o", label="after recovery")
    raw = [(r["ratio"], r["before_recovery"]) for r in pruned if r["before_recovery"]]
    if raw:
        xs += [b["param_distortion"] for _, b in raw]
        ys += [b["output_distortion"] for _, b in raw]
        ax.plot([b["param_distortion"] for _, b in raw],
                [b["output_distortion"] for _, b in raw], "x", label="as pruned")
        for ratio, b in raw:
            ax.annotate(f"{ratio:.2f}", (b["param_distortion"], b["output_distortion"]))
    for r in pruned:
        ax.annotate(f"{r['ratio']:.2f}", (r["param_distortion"], r["output_distortion"]))
    if xs:
        top = max(max(xs), max(ys)) * 1.1 or 1.0
        ax.plot([0, top], [0, top], "--", color="grey", label="y = x")
        ax.legend()
    ax.set(xlabel="parameter distortion", ylabel="output distortion",
           title="output vs parameter distortion")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(root / "distortion.png", dpi=110)
    made.append("distortion.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for r in rows:
        splits = sorted(r["splits"].items(), key=lambda kv: int(kv[0]))
        s = [int(k) for k, _ in splits]
        axes[0].plot(s, [v["head_ms_1t"] for _, v in splits], "o-",
                     label=f"head ρ={r['ratio']:.2f}")
        axes[0].plot(s, [v["tail_ms_1t"] for _, v in splits], "x--",
                     label=f"tail ρ={r['ratio']:.2f}")
        axes[1].plot(s, [v["feature_bytes"].get("fp32", 0) for _, v in splits], "o-",
                     label=f"fp32 ρ={r['ratio']:.2f}")
        axes[1].plot(s, [v["feature_bytes"].get("int8", 0) for _, v in splits], "x--",
                     label=f"int8 ρ={r['ratio']:.2f}")
    axes[0].set(xlabel="split point s", ylabel="ms (1 thread)", title="head/tail latency")
    axes[1].set(xlabel="split point s", ylabel="bytes per window", title="feature bytes")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "split_cost.png", dpi=110)
    made.append("split_cost.png")
    plt.close(fig)
    return made


def write(root: Path, manifest: Manifest) -> dict[str, Any]:
    """Write report.json and the plots; plots are skipped (logged) without matplotlib."""
    summary = summarize(manifest)
    try:
        summary["plots"] = _plots(root, summary)
    except ImportError:
        log.warning("matplotlib is not installed; report.json only, no plots")
        summary["plots"] = []
    (root / REPORT).write_text(json.dumps(summary, indent=1))
    return summary
