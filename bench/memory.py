"""Memory bench: resident memory of ONNX sessions, old (Python API) against new (shared weights).

Run: .venv/bin/python bench/memory.py [--bundle bundles/reference] [--windows 200]
[--rounds 200]. Each configuration runs in a fresh process (RSS is per process) and records
VmRSS after its imports and the manifest (idle), after opening each of the heads a gateway
typically holds (the on-device fallback first, then other splits and ratios the coordinator
picks), and after N windows run round-robin through them (load). The latency of every head is
measured old-vs-new in one process, interleaved window by window, so a busy machine slows
both alike; outputs are compared there too. Also: what each import costs, and what the
gateway's Runtime holds at start with the default decision (head + tail of r0.00-s1 pinned,
plus the on-device fallback head), old against new. Writes
bench/out/memory.json and bench/out/memory.png.

Configurations:
  old        onnxruntime.InferenceSession per session, default options (runtime.py before)
  noprepack  as old with session.disable_prepacking=1 (a candidate, rejected: slower)
  capi       Runtime(share_weights=False): the C API binding alone, no sharing
  new        Runtime(): C API, one mapped + one pre-packed weight copy per ratio
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
CONFIGS = ("old", "noprepack", "capi", "new")
# Heads a gateway holds over a day of coordinator decisions (the default max_sessions is 8):
# (ratio, split) with split None meaning the on-device variant (split = L), opened first.
ORDER = ((0.0, None), (0.0, 3), (0.0, 1), (0.0, 5), (0.5, None), (0.5, 3), (0.25, None),
         (0.75, None))
# Import steps, cumulative, in the order the gateway's daemon pulls them in; "ort-capi" loads
# libonnxruntime through ortcapi. The Python onnxruntime module comes last: the gateway no
# longer imports it, and the step shows what that saves.
IMPORTS = ("numpy", "ort-capi", "pydantic", "aiomqtt", "aiohttp", "edgetok.tokenizers",
           "edgetok.gateway.daemon", "onnxruntime")


def rss_mb(key: str = "VmRSS") -> float:
    """This process's resident set in MiB (VmRSS), or its peak so far (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def anon_mb() -> float:
    """Anonymous (not file-backed, not reclaimable without swap) resident memory in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _variant_ids(bundle: Path) -> list[str]:
    from edgetok.models.bundle import read_manifest

    m = read_manifest(bundle)
    return [f"r{r:.2f}-s{m.num_layers if s is None else s}" for r, s in ORDER]


def _tokens(bundle: Path, n: int) -> Any:
    """n single-window token batches, seeded (the head's input, shape [1, N, D])."""
    import numpy as np

    from edgetok.models.bundle import read_manifest

    m = read_manifest(bundle)
    shape = next(v.feature_shape for v in m.variants if v.split == 0)
    rng = np.random.default_rng(0)
    return [rng.standard_normal((1, *shape)).astype(np.float32) for _ in range(n)]


class PyHeads:
    """The old way: one onnxruntime.InferenceSession per head, as runtime.py used to."""

    def __init__(self, bundle: Path, prepack: bool = True) -> None:
        import onnxruntime as ort

        from edgetok.models.bundle import load_manifest

        self.ort, self.bundle, self.prepack = ort, bundle, prepack
        self.manifest = load_manifest(bundle)
        self.sessions: dict[str, Any] = {}

    def open(self, vid: str) -> None:
        """Open the head of a variant."""
        opts = self.ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        if not self.prepack:
            opts.add_session_config_entry("session.disable_prepacking", "1")
        head = self.manifest.variant(vid).head
        self.sessions[vid] = self.ort.InferenceSession(
            str(self.bundle / str(head)), sess_options=opts, providers=["CPUExecutionProvider"])

    def run(self, vid: str, x: Any) -> Any:
        """The head's first output."""
        s = self.sessions[vid]
        return s.run(None, {s.get_inputs()[0].name: x})[0]


class NewHeads:
    """The new way: Runtime, with or without shared weights."""

    def __init__(self, bundle: Path, share: bool) -> None:
        from edgetok.models.runtime import Runtime

        self.rt = Runtime(bundle, threads=1, max_sessions=len(ORDER), share_weights=share)

    def open(self, vid: str) -> None:
        """Open the head of a variant."""
        self.rt.session(vid, "head")

    def run(self, vid: str, x: Any) -> Any:
        """The head's first output."""
        return self.rt.run(vid, "head", x)


def _heads(config: str, bundle: Path) -> PyHeads | NewHeads:
    if config in ("old", "noprepack"):
        return PyHeads(bundle, prepack=config == "old")
    return NewHeads(bundle, share=config == "new")


def child_rss(config: str, bundle: Path, windows: int) -> dict[str, Any]:
    """RSS idle, after each session opened, and after `windows` windows of load."""
    import numpy  # noqa: F401  (both sides pay for numpy before "idle")

    heads = _heads(config, bundle)
    vids = _variant_ids(bundle)
    xs = _tokens(bundle, 16)
    gc.collect()
    out: dict[str, Any] = {"idle_mb": rss_mb(), "idle_anon_mb": anon_mb(), "open_mb": []}
    for vid in vids:
        heads.open(vid)
        out["open_mb"].append(rss_mb())
        if len(out["open_mb"]) == 1:
            # The transient while the first session is built (new: the mapped weights file
            # is resident until its pages are dropped; those pages are clean, reclaimable).
            out["peak_first_open_mb"] = rss_mb("VmHWM")
    t0 = time.perf_counter()
    for i in range(windows):
        heads.run(vids[i % len(vids)], xs[i % len(xs)])
    out["ms_per_window"] = (time.perf_counter() - t0) * 1000 / max(windows, 1)
    out["load_mb"] = rss_mb()
    out["load_anon_mb"] = anon_mb()
    out["peak_mb"] = rss_mb("VmHWM")
    return out


def child_gateway(config: str, bundle: Path) -> dict[str, float]:
    """What the gateway's Runtime holds at start with the default decision (r0.00-s1).

    It pins the decision's head and tail (preload) and opens the on-device fallback head.
    "old" is the same Runtime with the C API switched off (the Python API, as before).
    """
    import edgetok.models.runtime as runtime

    if config == "old":
        runtime.capi = lambda: None
    base = rss_mb()
    rt = runtime.Runtime(bundle, threads=1, preload=["r0.00-s1"])
    rt.session(f"r0.00-s{rt.manifest.num_layers}", "head")
    return {"sessions": rt.open_sessions, "runtime_mb": rss_mb() - base,
            "anon_mb": anon_mb(), "rss_mb": rss_mb()}


def child_latency(bundle: Path, rounds: int) -> dict[str, Any]:
    """Per-head latency, old and new in one process, interleaved; and output equality."""
    import numpy as np

    old, new = PyHeads(bundle), NewHeads(bundle, share=True)
    vids = _variant_ids(bundle)
    xs = _tokens(bundle, 16)
    out: dict[str, Any] = {}
    for vid in vids:
        old.open(vid)
        new.open(vid)
        diff, equal = 0.0, True
        for x in xs:  # warm-up, and the outputs compared on every window
            a, b = old.run(vid, x), new.run(vid, x)
            diff = max(diff, float(np.max(np.abs(a - b))))
            equal = equal and bool(np.array_equal(a, b))
        times: dict[str, list[float]] = {"old": [], "new": []}
        for i in range(rounds):
            x = xs[i % len(xs)]
            pair = (("old", old), ("new", new)) if i % 2 else (("new", new), ("old", old))
            for name, heads in pair:  # alternate who goes first
                t0 = time.perf_counter()
                heads.run(vid, x)
                times[name].append((time.perf_counter() - t0) * 1000)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[vid] = {"old_ms": round(med["old"], 4), "new_ms": round(med["new"], 4),
                    "ratio_new_old": round(med["new"] / med["old"], 3),
                    "max_abs_diff": diff, "bit_identical": equal}
    return out


def child_imports() -> dict[str, float]:
    """Cumulative RSS after each import step."""
    import importlib

    out = {"python": rss_mb()}
    for mod in IMPORTS:
        if mod == "ort-capi":
            from edgetok.models.ortcapi import capi

            capi()
        else:
            importlib.import_module(mod)
        out[mod] = rss_mb()
    return out


def _spawn(args: list[str]) -> Any:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                          text=True, check=False, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(doc: dict[str, Any], path: Path) -> None:
    """RSS against sessions open (and under load), and latency new/old per head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    vids = doc["sessions"]
    for config, r in doc["rss"].items():
        ys = [r["idle_mb"], *r["open_mb"], r["load_mb"]]
        line = ax.plot(range(len(vids) + 1), ys[:-1], marker="o", label=config)[0]
        ax.plot([len(vids)], [ys[-1]], marker="*", ms=12, color=line.get_color())
    ax.axhline(doc["goal_mb"], color="grey", ls="--", lw=1)
    ax.set_xticks(range(len(vids) + 1), ["idle", *vids], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("RSS (MiB); star = after load")
    ax.set_title("Resident memory as heads are opened")
    ax.legend()
    lat = doc["latency"]
    bx.bar(range(len(lat)), [lat[v]["ratio_new_old"] for v in lat])
    bx.axhline(1.0, color="grey", lw=1)
    bx.axhline(1.1, color="red", ls="--", lw=1)
    bx.set_xticks(range(len(lat)), list(lat), rotation=45, ha="right", fontsize=8)
    bx.set_ylabel("median latency, new / old")
    bx.set_title("Per-window head latency (interleaved, 1 thread)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Run every configuration in its own process; print and write JSON and PNG."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "reference")
    p.add_argument("--windows", type=int, default=200)
    p.add_argument("--rounds", type=int, default=200, help="timed runs per head and side")
    p.add_argument("--out", type=Path, default=OUT / "memory.json")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bundle = args.bundle.resolve()
    if args.child:
        kind = args.child[0]
        res = (child_imports() if kind == "imports" else
               child_gateway(args.child[1], bundle) if kind == "gateway" else
               child_latency(bundle, args.rounds) if kind == "latency" else
               child_rss(kind, bundle, args.windows))
        print(json.dumps(res))
        return 0
    rss = {c: _spawn([c, "--bundle", str(bundle), "--windows", str(args.windows)])
           for c in CONFIGS}
    latency = _spawn(["latency", "--bundle", str(bundle), "--rounds", str(args.rounds)])
    imports = _spawn(["imports"])
    gateway = {c: _spawn(["gateway", c, "--bundle", str(bundle)]) for c in ("old", "new")}
    old, new = rss["old"], rss["new"]
    ratios = [v["ratio_new_old"] for v in latency.values()]
    doc = {
        "bundle": str(bundle), "sessions": _variant_ids(bundle), "windows": args.windows,
        "goal_mb": 200.0,
        "rss": {c: {k: ([round(x, 1) for x in v] if isinstance(v, list) else round(v, 2))
                    for k, v in r.items()} for c, r in rss.items()},
        "latency": latency,
        "imports_mb": {k: round(v, 1) for k, v in imports.items()},
        "gateway_default_decision": {c: {k: round(v, 1) for k, v in g.items()}
                                     for c, g in gateway.items()},
        "summary": {
            "sessions_mb_old": round(old["load_mb"] - old["idle_mb"], 1),
            "sessions_mb_new": round(new["load_mb"] - new["idle_mb"], 1),
            "gateway_runtime_mb_old": round(gateway["old"]["runtime_mb"], 1),
            "gateway_runtime_mb_new": round(gateway["new"]["runtime_mb"], 1),
            "one_session_mb_old": round(old["open_mb"][0] - old["idle_mb"], 1),
            "one_session_mb_new": round(new["open_mb"][0] - new["idle_mb"], 1),
            "first_open_peak_mb_old": round(old["peak_first_open_mb"] - old["idle_mb"], 1),
            "first_open_peak_mb_new": round(new["peak_first_open_mb"] - new["idle_mb"], 1),
            "load_rss_ratio_new_old": round(new["load_mb"] / old["load_mb"], 3),
            "latency_ratio_new_old_median": round(statistics.median(ratios), 3),
            "latency_ratio_new_old_max": max(ratios),
            "bit_identical": all(v["bit_identical"] for v in latency.values()),
            "max_abs_diff": max(v["max_abs_diff"] for v in latency.values())},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    plot(doc, args.out.with_suffix(".png"))
    print(json.dumps(doc["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
