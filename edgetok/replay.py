"""`edgetok replay`: publish a real dataset over MQTT as sensors would, and record what was sent."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_CHANNELS = ["acc_x", "acc_y", "acc_z", "gyr_x", "gyr_y", "gyr_z"]


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    """Dataset windows laid onto the sample grid: what will be published and when."""

    x: np.ndarray  # (N, C, T)
    labels: list[str]
    base_ts: float
    rate_hz: float

    @property
    def window_s(self) -> float:
        return self.x.shape[2] / self.rate_hz

    def window_seq(self, j: int) -> int:
        """The gateway's window number for dataset window j (non-overlapping grid)."""
        return round(self.base_ts / self.window_s) + j

    def timestamps(self, j: int) -> np.ndarray:
        return self.base_ts + j * self.window_s + np.arange(self.x.shape[2]) / self.rate_hz


def load_dataset(name: str, split: str) -> tuple[np.ndarray, list[str]]:
    """X (N, C, T) float64 and labels from an aeon dataset name or an .npz path."""
    if name.endswith(".npz"):
        data = np.load(name, allow_pickle=False)
        return np.asarray(data["X"], np.float64), [str(v) for v in data["y"]]
    try:
        from aeon.datasets import load_classification
    except ImportError as exc:
        raise SystemExit("replaying a named dataset needs aeon (the build extra); "
                         "or pass an .npz with X and y") from exc
    x, y = load_classification(name, split=split)
    return np.asarray(x, np.float64), [str(v) for v in y]


def make_plan(x: np.ndarray, labels: list[str], rate_hz: float, now: float) -> ReplayPlan:
    """Place the windows so they end just before `now`, aligned to the window grid."""
    window_s = x.shape[2] / rate_hz
    base = math.floor((now - len(x) * window_s) / window_s) * window_s
    return ReplayPlan(x, labels, base, rate_hz)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Replay's flags (shared with the demo)."""
    p.add_argument("--host", default="127.0.0.1", help="broker host")
    p.add_argument("--port", type=int, default=1883, help="broker port")
    p.add_argument("--username", default=None,
                   help="broker user name; the password is read from EDGETOK_MQTT_PASSWORD")
    p.add_argument("--topic", default="sensors/imu", help="topic to publish readings on")
    p.add_argument("--dataset", default="BasicMotions",
                   help="aeon dataset name, or an .npz with X (N, C, T) and y")
    p.add_argument("--split", default="test", choices=["train", "test"], help="dataset split")
    p.add_argument("--rate", type=float, default=10.0, help="the dataset's sample rate in Hz")
    p.add_argument("--speed", type=float, default=1.0,
                   help="publish this many times faster than real time (timestamps keep the "
                   "true rate)")
    p.add_argument("--chunk", type=int, default=1,
                   help="readings per message (1: one JSON object per reading)")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N windows")
    p.add_argument("--channels", default=",".join(DEFAULT_CHANNELS),
                   help="comma-separated channel (JSON field) names")
    p.add_argument("--record", type=Path, default=None,
                   help="write the replayed windows (seq, label) as JSON to this file")


def payloads(plan: ReplayPlan, j: int, channels: list[str], chunk: int) -> list[bytes]:
    """JSON messages for dataset window j."""
    ts = plan.timestamps(j)
    xs = plan.x[j]
    out = []
    for i in range(0, len(ts), chunk):
        sl = slice(i, i + chunk)
        if chunk == 1:
            doc: dict[str, object] = {"ts": round(float(ts[i]), 6)}
            doc.update({c: float(xs[k, i]) for k, c in enumerate(channels)})
        else:
            doc = {"ts": [round(float(t), 6) for t in ts[sl]]}
            doc.update({c: [float(v) for v in xs[k, sl]] for k, c in enumerate(channels)})
        out.append(json.dumps(doc).encode())
    return out


async def publish_plan(plan: ReplayPlan, *, host: str, port: int, topic: str,
                       channels: list[str], chunk: int = 1, speed: float = 1.0,
                       username: str | None = None, password: str | None = None) -> int:
    """Publish every window at QoS 1, waiting for each PUBACK; returns messages sent."""
    import aiomqtt

    sent = 0
    interval = chunk / plan.rate_hz / speed
    from edgetok.mqttlink import NODELAY

    async with aiomqtt.Client(host, port, username=username, password=password,
                              timeout=30, socket_options=NODELAY) as client:
        t_next = time.monotonic()
        for j in range(len(plan.x)):
            for body in payloads(plan, j, channels, chunk):
                await client.publish(topic, body, qos=1)
                sent += 1
                t_next += interval
                delay = t_next - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
    return sent


def main(args: argparse.Namespace) -> int:
    """Entry point for `edgetok replay`."""
    import os

    x, labels = load_dataset(args.dataset, args.split)
    if args.limit:
        x, labels = x[: args.limit], labels[: args.limit]
    channels = args.channels.split(",")
    if len(channels) != x.shape[1]:
        raise SystemExit(f"{len(channels)} channel names for {x.shape[1]} dataset channels")
    plan = make_plan(x, labels, args.rate, time.time())
    if args.record:
        args.record.write_text(json.dumps(
            {"rate_hz": args.rate, "base_ts": plan.base_ts,
             "windows": [{"seq": plan.window_seq(j), "label": labels[j]}
                         for j in range(len(x))]}))
    sent = asyncio.run(publish_plan(plan, host=args.host, port=args.port, topic=args.topic,
                                    channels=channels, chunk=args.chunk, speed=args.speed,
                                    username=args.username,
                                    password=os.environ.get("EDGETOK_MQTT_PASSWORD")))
    print(f"published {sent} messages ({len(x)} windows) to {args.topic}")
    return 0
