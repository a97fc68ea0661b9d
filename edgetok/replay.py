"""`edgetok replay`: publish a real dataset over MQTT as sensors would, and record what was sent."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_CHANNELS = ["acc_x", "acc_y", "acc_z", "gyr_x", "gyr_y", "gyr_z"]
# A stream's default max_future_s: readings further ahead of the gateway clock are refused.
GATEWAY_MAX_FUTURE_S = 60.0


class DatasetError(ValueError):
    """The dataset to replay cannot be loaded; the message says why, in one line."""


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
        try:
            data = np.load(name, allow_pickle=False)
            return np.asarray(data["X"], np.float64), [str(v) for v in data["y"]]
        except (OSError, KeyError, ValueError) as exc:
            raise DatasetError(f"cannot read {name} (an .npz with X (N, C, T) and y): "
                               f"{exc}") from exc
    try:
        from aeon.datasets import load_classification
    except ImportError as exc:
        raise DatasetError("replaying a named dataset needs aeon (the build extra); "
                           "or pass an .npz with X and y") from exc
    try:
        x, y = load_classification(name, split=split)
    except ValueError as exc:  # aeon's answer to a name it does not know
        raise DatasetError(f"no UCR/UEA dataset named {name!r} (e.g. BasicMotions), and not "
                           "an .npz path") from exc
    return np.asarray(x, np.float64), [str(v) for v in y]


def make_plan(x: np.ndarray, labels: list[str], rate_hz: float, now: float,
              start: float | None = None) -> ReplayPlan:
    """Place the windows on the window grid: ending just before `now`, or, given `start`,
    beginning at the first grid point at or after it."""
    window_s = x.shape[2] / rate_hz
    if start is not None:
        # Up, not down: a start after the gateway's last closed window stays after it.
        return ReplayPlan(x, labels, math.ceil(start / window_s) * window_s, rate_hz)
    base = math.floor((now - len(x) * window_s) / window_s) * window_s
    return ReplayPlan(x, labels, base, rate_hz)


def positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    """An argparse type: a finite number above zero, else a one-line usage error."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _port(text: str) -> int:
    """An argparse type: a TCP port number."""
    port = int(positive(int)(text))
    if port > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1-65535, got {text!r}")
    return port


def _start_ts(text: str) -> float | str:
    """An argparse type: `now` or Unix seconds."""
    if text == "now":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'now' or Unix seconds, got {text!r}") \
            from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected 'now' or Unix seconds, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Replay's flags (shared with the demo)."""
    p.add_argument("--host", default="127.0.0.1", help="broker host")
    p.add_argument("--port", type=_port, default=1883, help="broker port")
    p.add_argument("--username", default=None,
                   help="broker user name; the password is read from EDGETOK_MQTT_PASSWORD")
    p.add_argument("--topic", default="sensors/imu", help="topic to publish readings on")
    p.add_argument("--dataset", default="BasicMotions",
                   help="aeon dataset name, or an .npz with X (N, C, T) and y")
    p.add_argument("--split", default="test", choices=["train", "test"], help="dataset split")
    p.add_argument("--rate", type=positive(float), default=10.0,
                   help="the dataset's sample rate in Hz")
    p.add_argument("--speed", type=positive(float), default=1.0,
                   help="publish this many times faster than real time (timestamps keep the "
                   "true rate)")
    p.add_argument("--chunk", type=positive(int), default=1,
                   help="readings per message (1: one JSON object per reading)")
    p.add_argument("--limit", type=positive(int), default=None,
                   help="replay only the first N windows")
    p.add_argument("--start-ts", type=_start_ts, default=None, metavar="now|UNIX_TS",
                   help="stamp the first reading at this time (rounded up to the window grid) "
                   "and play forward; 'now' starts at the current window boundary. Without "
                   "it the data is backdated to end just before now, so a second replay "
                   "within the data's span lands in windows the gateway has already closed "
                   "(dead letters 'late'); use --start-ts now for that. Above --speed 1 the "
                   "stamps run ahead of the clock: the stream's max_future_s must allow it")
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

    import aiomqtt

    try:
        x, labels = load_dataset(args.dataset, args.split)
    except DatasetError as exc:
        print(f"edgetok replay: --dataset: {exc}", file=sys.stderr)
        return 2
    if args.limit:
        x, labels = x[: args.limit], labels[: args.limit]
    channels = args.channels.split(",")
    if len(channels) != x.shape[1]:
        print(f"edgetok replay: --channels: {len(channels)} names for {x.shape[1]} dataset "
              "channels", file=sys.stderr)
        return 2
    now = time.time()
    start = None if args.start_ts is None else now if args.start_ts == "now" else args.start_ts
    plan = make_plan(x, labels, args.rate, now, start)
    # Published at `speed`x, the stamps outrun the clock; the gateway would refuse them.
    ahead = plan.base_ts + len(x) * plan.window_s * (1 - 1 / args.speed) - now
    if ahead > GATEWAY_MAX_FUTURE_S:
        print(f"edgetok replay: note: the last readings will be stamped {ahead:.0f}s ahead of "
              f"the clock; the gateway dead-letters them as 'future' unless the stream's "
              f"max_future_s (default {GATEWAY_MAX_FUTURE_S:g}) allows it", file=sys.stderr)
    if args.record:
        args.record.write_text(json.dumps(
            {"rate_hz": args.rate, "base_ts": plan.base_ts,
             "windows": [{"seq": plan.window_seq(j), "label": labels[j]}
                         for j in range(len(x))]}))
    try:
        sent = asyncio.run(publish_plan(plan, host=args.host, port=args.port, topic=args.topic,
                                        channels=channels, chunk=args.chunk, speed=args.speed,
                                        username=args.username,
                                        password=os.environ.get("EDGETOK_MQTT_PASSWORD")))
    except aiomqtt.MqttError as exc:  # refused, unreachable, or lost mid-replay
        print(f"edgetok replay: MQTT broker at {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(f"published {sent} messages ({len(x)} windows) to {args.topic}")
    return 0
