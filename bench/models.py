"""Model bench: ORT latency of every variant's head and tail against batch size and threads.

Run: .venv/bin/python bench/models.py [--bundle bundles/reference] [--repeats 30]. Uses only
the runtime (numpy + ONNX Runtime, no torch). Writes bench/out/models.json and
bench/out/models.png: per pruning ratio, whole-model latency (s = 0 tail) by batch size, and
head/tail latency by split point at batch 1, single thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgetok.models.bundle import load_manifest

OUT = Path(__file__).resolve().parent / "out"
# Batches a server's tail might see: 1 (one gateway) up to a burst of queued windows.
BATCHES = (1, 4, 16, 64)


def _session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _median_ms(sess: ort.InferenceSession, x: np.ndarray, repeats: int) -> float:
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def bench(bundle: Path, repeats: int) -> dict[str, Any]:
    """Latency table of one bundle."""
    m = load_manifest(bundle)
    rng = np.random.default_rng(0)
    first = m.variant(f"r{m.variants[0].pruning_ratio:.2f}-s0")
    token_shape = first.feature_shape
    ratios = sorted({v.pruning_ratio for v in m.variants})
    out: dict[str, Any] = {"bundle": m.bundle_id, "num_layers": m.num_layers, "ratios": {}}
    for r in ratios:
        whole = bundle / str(m.variant(f"r{r:.2f}-s0").tail)
        row: dict[str, Any] = {"batch": {}, "splits": {}}
        for threads in (1, 0):
            sess = _session(whole, threads)
            for b in BATCHES:
                x = rng.standard_normal((b, *token_shape)).astype(np.float32)
                key = f"{b}x{'1t' if threads == 1 else 'default'}"
                row["batch"][key] = _median_ms(sess, x, repeats)
        x1 = rng.standard_normal((1, *token_shape)).astype(np.float32)
        for s in range(m.num_layers + 1):
            v = m.variant(f"r{r:.2f}-s{s}")
            head_ms = tail_ms = 0.0
            mid = x1
            if v.head:
                hs = _session(bundle / v.head, 1)
                head_ms = _median_ms(hs, x1, repeats)
                mid = np.asarray(hs.run(None, {"tokens": x1})[0])
            if v.tail:
                tail_ms = _median_ms(_session(bundle / v.tail, 1), mid, repeats)
            row["splits"][str(s)] = {"head_ms_1t": head_ms, "tail_ms_1t": tail_ms}
        out["ratios"][f"{r:.2f}"] = row
        print(f"ratio {r:.2f}: whole model batch 1, 1 thread {row['batch']['1x1t']:.3f} ms")
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Two panels: latency by batch, head/tail by split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for r, row in result["ratios"].items():
        axes[0].plot(BATCHES, [row["batch"][f"{b}x1t"] for b in BATCHES], "o-",
                     label=f"ρ={r} 1 thread")
        axes[0].plot(BATCHES, [row["batch"][f"{b}xdefault"] for b in BATCHES], "x--",
                     label=f"ρ={r} default")
        s = sorted(int(k) for k in row["splits"])
        axes[1].plot(s, [row["splits"][str(k)]["head_ms_1t"] for k in s], "o-",
                     label=f"head ρ={r}")
        axes[1].plot(s, [row["splits"][str(k)]["tail_ms_1t"] for k in s], "x--",
                     label=f"tail ρ={r}")
    axes[0].set(xscale="log", yscale="log", xlabel="batch", ylabel="ms",
                title="whole model (s = 0 tail)")
    axes[1].set(xlabel="split point s", ylabel="ms, batch 1, 1 thread", title="head / tail")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(result["bundle"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    """Bench one bundle, write JSON and PNG under bench/out/."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle", type=Path, default=Path("bundles/reference"))
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    result = bench(args.bundle, args.repeats)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "models.json").write_text(json.dumps(result, indent=1))
    plot(result, OUT / "models.png")
    print(f"wrote {OUT / 'models.json'} and {OUT / 'models.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
