"""Backpressure benchmark: how fast the gateway journals readings until its journal is full,
and what happens then (it stops acknowledging; the broker keeps the rest; nothing is lost).

For each setting (readings per message x SQLite synchronous mode) a real gateway gets a
backlog it cannot finish: a split variant with no edge server, one window in flight and a
long deadline, so the first window holds the only slot and no reading can be pruned. The
backlog is queued in mosquitto beforehand (the gateway's persistent session), so the
gateway, not the publisher, sets the pace. /v1/status is polled: the sustained ingest rate
is the slope of journaled readings from 10 % to 90 % of the journal's capacity, before
backpressure engages; afterwards the journal must stay at its bound while the broker holds
the remaining messages.

    .venv/bin/python bench/backpressure.py [--bundle DIR] [--rows 20000] [--quick]

Writes bench/out/backpressure.json and bench/out/backpressure.png.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgetok.procs import free_port, http_json, start_edgetok, start_mosquitto, stop, to_toml
from edgetok.procs import wait_ready as wait_http_ready

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
TOPIC = "bench/backpressure/imu"
CHANNELS = ["acc_x", "acc_y", "acc_z", "gyr_x", "gyr_y", "gyr_z"]
RATE_HZ = 10.0
# Messages beyond the journal's capacity: enough to show the plateau, not so many that
# queueing them in the broker dominates the run.
OVERFILL = 1.3
# Status poll period: finer resolves the ramp better but costs the gateway's loop time.
POLL_S = 0.1
# How long the plateau is watched after backpressure engages.
PLATEAU_S = 3.0
# Unacknowledged QoS 1 publishes the loader keeps in flight: hides the loopback round trip.
LOAD_WINDOW = 1000


def payloads(n_readings: int, chunk: int, t0: float) -> list[bytes]:
    """Consecutive readings on the 10 Hz grid ending before t0, `chunk` per message."""
    rng = np.random.default_rng(0)
    start = math.floor(t0 * RATE_HZ) - n_readings
    out = []
    for i in range(0, n_readings, chunk):
        ts = [round((start + i + k) / RATE_HZ, 6) for k in range(min(chunk, n_readings - i))]
        vals = rng.normal(size=(len(CHANNELS), len(ts))).round(4)
        if chunk == 1:
            doc: dict[str, Any] = {"ts": ts[0], **{c: float(vals[j, 0])
                                                  for j, c in enumerate(CHANNELS)}}
        else:
            doc = {"ts": ts, **{c: vals[j].tolist() for j, c in enumerate(CHANNELS)}}
        out.append(json.dumps(doc).encode())
    return out


def load_broker(port: int, messages: list[bytes]) -> float:
    """Publish everything at QoS 1 and wait for every PUBACK; seconds taken."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-loader",
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(LOAD_WINDOW)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    t0 = time.monotonic()
    infos = [client.publish(TOPIC, body, qos=1) for body in messages]
    for info in infos:
        info.wait_for_publish(timeout=120)
    took = time.monotonic() - t0
    client.disconnect()
    client.loop_stop()
    return took


def gateway_config(work: Path, bundle: Path, mqtt_port: int, http_port: int, rows: int,
                   sync: str) -> dict[str, Any]:
    """A gateway that cannot finish a window: split, no server, one slot, long deadline."""
    return {"id": "gw-bench", "state_dir": str(work / "state"),
            "mqtt": {"host": "127.0.0.1", "port": mqtt_port, "client_id": "edgetok-gw-bench",
                     "session_expiry_s": 3600},
            "bundle": {"path": str(bundle), "threads": 1},
            "decision": {"variant": "r0.00-s1", "precision": "fp16",
                         "follow_coordinator": False},
            "http": {"host": "127.0.0.1", "port": http_port},
            "journal": {"max_rows": rows, "synchronous": sync},
            "max_inflight_windows": 1,
            "streams": [{"name": "imu", "topics": [TOPIC], "channels": CHANNELS,
                         "rate_hz": RATE_HZ, "window": 100, "deadline_ms": 600_000.0,
                         "idle_close_s": 600.0}]}


def run_one(bundle: Path, rows: int, chunk: int, sync: str, work: Path) -> dict[str, Any]:
    """One setting: queue the backlog, start the gateway, watch the ramp and the plateau."""
    port, http_port = free_port(), free_port()
    broker = start_mosquitto(work / "broker", port)
    cfg = work / "gateway.toml"
    cfg.write_text(to_toml(gateway_config(work, bundle, port, http_port, rows, sync)))
    url = f"http://127.0.0.1:{http_port}"
    gw = None
    try:
        gw = start_edgetok("gateway", cfg, work / "gateway.log")
        wait_http_ready(f"{url}/readyz", gw)
        stop(gw)  # the broker keeps the session: what follows is queued for the gateway
        bodies = payloads(int(rows * OVERFILL), chunk, time.time())
        load_s = load_broker(port, bodies)
        gw = start_edgetok("gateway", cfg, work / "gateway.log")
        t0 = time.monotonic()
        series: list[tuple[float, int, int, int]] = []
        engaged_at = None
        while time.monotonic() - t0 < 300:
            try:
                code, doc = http_json(f"{url}/v1/status", timeout=2)
            except OSError:
                time.sleep(POLL_S)
                continue
            if code == 200:
                c = doc["counters"]
                series.append((time.monotonic() - t0, doc["journal"]["rows"], c["messages"],
                               c["backpressure_events"]))
                if engaged_at is None and c["backpressure_events"] > 0:
                    engaged_at = series[-1][0]
                if engaged_at is not None and series[-1][0] - engaged_at > PLATEAU_S:
                    break
            time.sleep(POLL_S)
        final = doc
    finally:
        stop(gw)
        broker.terminate()
        broker.wait(10)
    t = np.array([s[0] for s in series])
    journal = np.array([s[1] for s in series])
    lo, hi = np.searchsorted(journal, 0.1 * rows), np.searchsorted(journal, 0.9 * rows)
    rate = float((journal[hi] - journal[lo]) / (t[hi] - t[lo])) if hi > lo else None
    after = journal[t >= (engaged_at or math.inf)]
    return {
        "chunk": chunk, "synchronous": sync, "max_rows": rows,
        "messages_queued": len(bodies), "broker_load_s": round(load_s, 2),
        "readings_per_s": round(rate) if rate else None,
        "messages_per_s": round(rate / chunk) if rate else None,
        "backpressure_engaged_s": round(engaged_at, 2) if engaged_at is not None else None,
        "journal_after_engaged": [int(after.min()), int(after.max())] if after.size else None,
        "journal_peak_rows": final["counters"]["journal_peak_rows"],
        "messages_taken_in": final["counters"]["messages"],
        "messages_left_in_broker": len(bodies) - final["counters"]["messages"],
        "deadletters": final["counters"]["deadletters"],
        "series": {"t": t.round(3).tolist(), "journal_rows": journal.tolist()},
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Journal rows over time per setting, with the bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.plot(r["series"]["t"], r["series"]["journal_rows"],
                label=f"{r['chunk']}/msg, {r['synchronous']}: {r['readings_per_s']} readings/s")
    ax.axhline(results[0]["max_rows"], color="k", ls="--", lw=0.8, label="journal.max_rows")
    ax.set_xlabel("seconds since gateway start")
    ax.set_ylabel("journaled readings")
    ax.set_title("Ingest until backpressure (then nothing is acked, nothing dropped)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    """Run every setting, write JSON and PNG."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "reference")
    p.add_argument("--rows", type=int, default=20_000, help="journal.max_rows")
    p.add_argument("--quick", action="store_true", help="chunked messages only")
    args = p.parse_args()
    settings = [(10, "NORMAL"), (10, "FULL")] + ([] if args.quick else
                                                 [(1, "NORMAL"), (1, "FULL")])
    results = []
    for chunk, sync in settings:
        work = Path(tempfile.mkdtemp(prefix="edgetok-bp-"))
        try:
            r = run_one(args.bundle, args.rows, chunk, sync, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"{chunk:>3} per message, {sync:<6}: {r['readings_per_s']} readings/s "
              f"({r['messages_per_s']} msg/s); backpressure after "
              f"{r['backpressure_engaged_s']} s, journal then {r['journal_after_engaged']}, "
              f"{r['messages_left_in_broker']} messages left in the broker, "
              f"{r['deadletters']} dead letters")
        results.append(r)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "backpressure.json").write_text(json.dumps(
        {"bundle": str(args.bundle), "cpus": __import__("os").cpu_count(),
         "results": results}, indent=1))
    plot(results, OUT / "backpressure.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
