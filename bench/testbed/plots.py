"""PNG plots of bench/e2e.py's JSON: latency against link rate, hit rate against load, etc."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgetok.control import POLICY_NAMES

POLICIES = POLICY_NAMES
STYLE = {"joint": ("C0", "o"), "device-only": ("C1", "s"), "server-only": ("C2", "^"),
         "fixed-split": ("C3", "D")}


def _group(doc: dict[str, Any], group: str) -> list[dict[str, Any]]:
    """Scenarios of one plot group."""
    return [sc for sc in doc["scenarios"].values() if sc["group"] == group]


def _series(scs: list[dict[str, Any]], key: str, pol: str, metric: str
            ) -> tuple[list[float], list[float]]:
    """One policy's metric against a scenario parameter, sorted by that parameter."""
    xs, ys = [], []
    for sc in sorted(scs, key=lambda s: s[key]):
        m = sc["runs"].get(pol)
        if not m or "error" in m:
            continue
        v = m["latency_ms"][metric] if metric.startswith("p") else m[metric]
        if v is not None:
            xs.append(sc[key])
            ys.append(v)
    return xs, ys


def plot_all(doc: dict[str, Any], out: Path, stem: str = "e2e") -> list[Path]:
    """Write <stem>_<group>.png for the sweeps (link, cpu, load, link-pi) and the traces."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    deadline = doc["deadline_ms"]
    panels = [("link", "link_mbit", "uplink rate (Mbit/s)", True),
              ("cpu", "cpu_share", "gateway CPU (share of one core)", False),
              ("load", "gateways", "gateways sharing one server", False),
              ("link-pi", "link_mbit", "uplink rate (Mbit/s), Pi-class gateway", True)]
    for group, key, xlabel, logx in panels:
        scs = _group(doc, group)
        if not scs:
            continue
        if group == "link-pi":
            xlabel = f"uplink rate (Mbit/s), gateway at {scs[0]['cpu_share']:.0%} of a core"
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for pol in POLICIES:
            c, mk = STYLE[pol]
            xs, ys = _series(scs, key, pol, "p50")
            if xs:
                a1.plot(xs, ys, marker=mk, color=c, label=f"{pol} p50")
            xs, ys = _series(scs, key, pol, "p95")
            if xs:
                a1.plot(xs, ys, marker=mk, color=c, ls=":", alpha=0.6, label=f"{pol} p95")
            xs, ys = _series(scs, key, pol, "hit_rate")
            if xs:
                a2.plot(xs, ys, marker=mk, color=c, label=pol)
        a1.axhline(deadline, color="grey", ls="--", lw=0.8, label="deadline")
        a1.set_yscale("log")
        a1.set_ylabel("end-to-end latency (ms)")
        a2.set_ylabel("deadline hit rate")
        a2.set_ylim(-0.02, 1.02)
        for ax in (a1, a2):
            ax.set_xlabel(xlabel)
            if logx:
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
        a1.legend(fontsize=7, ncol=2)
        a2.legend(fontsize=7)
        act = "actuators on" if doc.get("actuators") else "full clock and power"
        fig.suptitle(f"edgetok test bed: {group} (deadline {deadline:g} ms, "
                     f"{doc['window_rate_per_gateway']:g} windows/s per gateway, {act})")
        fig.tight_layout()
        path = out / f"{stem}_{group}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    traces = ("trace", "trace-pi", "trace-cpu")
    for group, sc in [(g, sc) for g in traces for sc in _group(doc, g)]:
        fig, ax = plt.subplots(figsize=(11, 4.2))
        for pol in POLICIES:
            m = sc["runs"].get(pol)
            if not m or "error" in m:
                continue
            c, mk = STYLE[pol]
            rows = sorted(m["per_window"], key=lambda r: r["t"])  # every round on one clock
            ax.plot([r["t"] for r in rows], [r["latency_ms"] for r in rows], marker=mk,
                    ms=3, lw=0.6, color=c, label=pol)
        ax.axhline(deadline, color="grey", ls="--", lw=0.8, label="deadline")
        for at, mbit in sc["trace"]:
            ax.axvline(at, color="k", lw=0.5)
            ax.text(at, ax.get_ylim()[1], f" {mbit:g} Mbit/s", va="top", fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("time since replay start (s)")
        ax.set_ylabel("end-to-end latency (ms)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax.set_title(f"{group}: gateway at {sc['cpu_share']:.0%} of a core")
        fig.tight_layout()  # after the title, which it must leave room for
        path = out / f"{stem}_{group}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
