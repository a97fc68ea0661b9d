"""Sensor side of the test bed: replay BasicMotions to every gateway at a fixed window rate,
record publish times, and collect results, frames and decisions from the broker.

Runs next to the broker (inside the server namespace), so the sensors' readings reach the
gateways over the unshaped downlink direction, and recording costs the uplink nothing.
Gateways may sit behind different brokers (`id@port`): policies measured side by side each
have their own broker and server, and one driver staggers every gateway's windows evenly over
the window period, so no two gateways get a window at the same moment.

Each window goes out as one JSON chunk message holding its readings plus the first reading
of the next window: that reading moves the gateway's watermark past the window's end, so the
window closes on this message (with lateness_ms = 0). The end-to-end latency of a window is
`result.created_ts - t_pub`, where t_pub is the wall time just before that message was
handed to the client; the gateway can close the window no earlier than the message arrives.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgetok.frames import FrameError, decode_frame
from edgetok.replay import DEFAULT_CHANNELS, load_dataset

log = logging.getLogger("testbed.driver")

PREFIX = "edgetok"
# Readings of a 10 s BasicMotions window; with the next window's first reading, 101 per message.
WINDOW = 100
RATE_HZ = 10.0


def chunk(x: np.ndarray, start_ts: float, nxt: np.ndarray | None, first: bool) -> bytes:
    """JSON for one window (readings 1..T-1, or 0..T-1 for the first) plus the next one's
    reading 0, which closes it."""
    t = start_ts + np.arange(x.shape[1]) / RATE_HZ
    sl = slice(0 if first else 1, None)
    ts = [round(float(v), 6) for v in t[sl]]
    cols = {c: [float(v) for v in x[k, sl]] for k, c in enumerate(DEFAULT_CHANNELS)}
    if nxt is not None:
        ts.append(round(start_ts + x.shape[1] / RATE_HZ, 6))
        for k, c in enumerate(DEFAULT_CHANNELS):
            cols[c].append(float(nxt[k, 0]))
    return json.dumps({"ts": ts, **cols}).encode()


def parse_gateways(spec: str, default_port: int) -> dict[str, int]:
    """Gateway id -> broker port, in order, from 'g0,g1@1884,...' (no port: the default)."""
    out: dict[str, int] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        gw, _, port = item.partition("@")
        if not gw or gw in out:
            raise ValueError(f"empty or repeated gateway id in {spec!r}")
        try:
            out[gw] = int(port) if port else default_port
        except ValueError:
            raise ValueError(f"not a port in {item!r}") from None
    if not out:
        raise ValueError("no gateways")
    return out


class Driver:
    """Replays to N gateways and records everything the broker shows."""

    def __init__(self, args: argparse.Namespace) -> None:
        """Load the dataset, repeat it to the needed length and lay it on the time grid."""
        self.args = args
        self.ports = parse_gateways(args.gateways, args.port)
        self.gateways: list[str] = list(self.ports)
        x, labels = load_dataset(args.dataset, "test")
        reps = math.ceil((args.warmup + args.windows + 1) / len(x))
        self.x = np.concatenate([x] * reps)[: args.warmup + args.windows + 1]
        self.labels = (labels * reps)[: args.warmup + args.windows + 1]
        window_s = WINDOW / RATE_HZ
        total = len(self.x) * window_s
        # Windows on the gateway's grid, all in the recent past (the gateway rejects readings
        # from the future and keeps windows keyed by start time / window length).
        self.base_ts = math.floor((time.time() - total - window_s) / window_s) * window_s
        self.window_s = window_s
        self.online: dict[str, asyncio.Event] = {g: asyncio.Event() for g in self.gateways}
        # With a coordinator: set once the gateway's telemetry says a decision is applied.
        self.applied: dict[str, asyncio.Event] = {g: asyncio.Event() for g in self.gateways}
        if not args.await_decision:
            for e in self.applied.values():
                e.set()
        self.sent: list[dict[str, Any]] = []
        self.results: dict[tuple[str, int], dict[str, Any]] = {}
        self.frames: dict[tuple[str, int], int] = {}  # bytes, a window's probes included
        self.probes: dict[tuple[str, int], int] = {}  # server probes (frames) by window
        self.decisions: list[dict[str, Any]] = []
        self.telemetry: list[dict[str, Any]] = []  # kept so a run's decisions can be explained
        self.expected: set[tuple[str, int]] = set()
        self.done = asyncio.Event()

    def seq(self, j: int) -> int:
        """The gateway's window number of replayed window j."""
        return round(self.base_ts / self.window_s) + j

    async def _listen(self, client: Any) -> None:
        """Record statuses, results, frame sizes, decisions and telemetry as they arrive."""
        async for msg in client.messages:
            topic = str(msg.topic)
            parts = topic.split("/")
            try:
                if parts[1] == "uplink":
                    header, _ = decode_frame(bytes(msg.payload))
                    key = (header.gateway, header.window)
                    self.frames[key] = self.frames.get(key, 0) + len(msg.payload)
                    if header.extra.get("probe"):
                        self.probes[key] = self.probes.get(key, 0) + 1
                elif parts[2] == "status":
                    if json.loads(msg.payload).get("state") == "online" and \
                            parts[1] in self.online:
                        self.online[parts[1]].set()
                elif parts[2] == "telemetry":
                    t = json.loads(msg.payload)
                    t["received_ts"] = time.time()
                    self.telemetry.append(t)
                    if t.get("applied_seq") is not None and parts[1] in self.applied:
                        self.applied[parts[1]].set()
                elif parts[2] == "results":
                    r = json.loads(msg.payload)
                    r["received_ts"] = time.time()
                    self.results[(r["gateway"], r["window"])] = r
                    if self.expected and self.expected <= set(self.results):
                        self.done.set()
                elif parts[2] == "control":
                    d = json.loads(msg.payload)
                    d["received_ts"] = time.time()
                    self.decisions.append(d)
            except (ValueError, KeyError, IndexError, FrameError) as exc:
                log.warning("unreadable message on %s: %s", topic, exc)

    async def _feed(self, client: Any, g: int, gw: str, t0: float) -> None:
        """Publish one gateway's windows at the fixed rate, recording each publish time."""
        a = self.args
        period = 1.0 / a.window_rate
        slot = period / len(self.gateways)  # gateways are staggered within a period
        # Each publish moves by up to a quarter slot either way, at random: a strict period
        # would lock onto the gateway's own timers (telemetry, window closing) at a phase
        # fixed for the whole run, so a run would be lucky or unlucky as a whole.
        rng = random.Random(f"{a.tag}/{gw}")
        for j in range(a.warmup + a.windows):
            jitter = rng.uniform(-a.jitter, a.jitter) * slot / 4
            delay = t0 + g * slot + j * period + jitter - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            body = chunk(self.x[j], self.base_ts + j * self.window_s, self.x[j + 1], j == 0)
            t_pub = time.time()
            await client.publish(a.topic.format(gw=gw), body, qos=1)
            self.sent.append({"gateway": gw, "window": self.seq(j), "j": j, "t_pub": t_pub,
                              "t_acked": time.time(), "bytes": len(body),
                              "label": self.labels[j], "warmup": j < a.warmup})

    async def run(self) -> dict[str, Any]:
        """Wait for the gateways, replay, collect until every result is in or time is up."""
        import aiomqtt

        from edgetok.mqttlink import NODELAY

        a = self.args
        async with contextlib.AsyncExitStack() as stack:
            clients: dict[int, Any] = {}
            listeners = []
            for port in sorted(set(self.ports.values())):
                client = clients[port] = await stack.enter_async_context(aiomqtt.Client(
                    a.host, port, identifier=f"etk-driver-{a.tag}-{port}", timeout=30,
                    socket_options=NODELAY))
                await client.subscribe(f"{PREFIX}/+/status", qos=1)
                await client.subscribe(f"{PREFIX}/+/results/#", qos=1)
                await client.subscribe(f"{PREFIX}/+/control", qos=1)
                await client.subscribe(f"{PREFIX}/+/telemetry", qos=0)
                if a.frames:
                    await client.subscribe(f"{PREFIX}/uplink/+", qos=0)
                listeners.append(asyncio.create_task(self._listen(client)))
            try:
                ready = [*self.online.values(), *self.applied.values()]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)),
                                       a.online_timeout)
            except TimeoutError:
                missing = [g for g in self.gateways
                           if not (self.online[g].is_set() and self.applied[g].is_set())]
                raise SystemExit(f"gateways never came online with a decision applied: "
                                 f"{missing}") from None
            self.expected = {(gw, self.seq(j)) for gw in self.gateways
                             for j in range(a.warmup + a.windows)}
            started = time.time()
            print(f"REPLAY START {started:.6f}", flush=True)
            t0 = time.monotonic()
            await asyncio.gather(*(self._feed(clients[self.ports[gw]], g, gw, t0)
                                   for g, gw in enumerate(self.gateways)))
            published = time.time()
            print(f"REPLAY PUBLISHED {published:.6f}", flush=True)
            if not self.expected <= set(self.results):
                try:
                    await asyncio.wait_for(self.done.wait(), a.results_timeout)
                except TimeoutError:
                    log.warning("%d result(s) missing after %.0f s",
                                len(self.expected - set(self.results)), a.results_timeout)
            for task in listeners:
                task.cancel()
        return {"started": started, "published": published, "finished": time.time(),
                "base_ts": self.base_ts, "window_rate": a.window_rate, "sent": self.sent,
                "results": list(self.results.values()),
                "frames": [{"gateway": g, "window": w, "bytes": b,
                            "probes": self.probes.get((g, w), 0)}
                           for (g, w), b in self.frames.items()],
                "decisions": self.decisions, "telemetry": self.telemetry}


def main(argv: list[str] | None = None) -> int:
    """Replay, collect, and write the run's JSON."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--gateways", required=True,
                   help="comma-separated gateway ids, each optionally with its broker's port "
                   "(g0@1884); without one, --port")
    p.add_argument("--topic", default="sensors/{gw}/imu", help="per-gateway sensor topic")
    p.add_argument("--dataset", default="BasicMotions")
    p.add_argument("--window-rate", type=float, default=2.0, help="windows/s per gateway")
    p.add_argument("--windows", type=int, default=40, help="measured windows per gateway")
    p.add_argument("--warmup", type=int, default=4, help="windows before the measured ones")
    p.add_argument("--frames", action="store_true", help="also record uplink frame sizes")
    p.add_argument("--jitter", type=float, default=1.0,
                   help="random shift of each publish, in quarters of a gateway's slot "
                   "(period / gateways); 0: a strict period")
    p.add_argument("--await-decision", action="store_true",
                   help="start the replay only once every gateway has applied a coordinator "
                   "decision (its telemetry names one): a fleet started at once switches "
                   "variants together, opening sessions side by side, which is start-up, "
                   "not the steady state a scenario compares")
    p.add_argument("--online-timeout", type=float, default=60.0)
    p.add_argument("--results-timeout", type=float, default=30.0)
    p.add_argument("--tag", default="0")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        parse_gateways(args.gateways, args.port)
    except ValueError as exc:
        p.error(f"--gateways: {exc}")
    if not 0.0 <= args.jitter <= 1.0:
        p.error("--jitter must be within 0..1 (more would let neighbouring slots overlap)")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s driver %(levelname)s %(message)s")
    out = asyncio.run(Driver(args).run())
    args.out.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
