"""`edgetok demo`: broker, edge server, gateway and a BasicMotions replay on one machine."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from edgetok.procs import (
    free_port,
    http_json,
    start_edgetok,
    start_mosquitto,
    stop,
    to_toml,
    wait_ready,
)

ROOT = Path(__file__).resolve().parent.parent
BUNDLES = ROOT / "bundles"
TOPIC = "sensors/imu"


def pick_bundle(explicit: Path | None) -> tuple[Path, bool]:
    """The bundle to run, building the quick one if none exists; (path, is_reference)."""
    if explicit is not None:
        return explicit, False
    ref, quick = BUNDLES / "reference", BUNDLES / "quick"
    if (ref / "manifest.json").exists():
        return ref, True
    if not (quick / "manifest.json").exists():
        print("no bundle yet: building the quick BasicMotions bundle (about a minute)...")
        subprocess.run([sys.executable, "-m", "edgetok", "build", "--recipe",
                        str(ROOT / "configs/models/quick.toml"), "--out", str(quick)],
                       check=True)
    return quick, False


def http_port_for(requested: int | None, preferred: int = 8080) -> int:
    """The port asked for, else `preferred` when nothing holds it, else any free one."""
    if requested:
        return requested
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:  # taken (say, by an installed gateway): the demo must not fail on it
            return free_port()
    return preferred


def write_configs(work: Path, bundle: Path, mqtt_port: int, http_port: int) -> tuple[Path, Path]:
    """Demo configs: the examples from configs/, pointed at the private broker and bundle."""
    gw: dict[str, Any] = tomllib.loads((ROOT / "configs/gateway.toml").read_text())
    gw["state_dir"] = str(work / "gateway")
    # The examples log in to an authenticating broker; the demo's private one is anonymous.
    gw["mqtt"].update(port=mqtt_port)
    gw["mqtt"].pop("username", None)
    gw["bundle"]["path"] = str(bundle)
    gw["http"]["port"] = http_port
    # The replay publishes faster than real time with timestamps on the true 10 Hz grid, so
    # after the first pass the readings run ahead of the wall clock; allow it for the demo.
    for s in gw["streams"]:
        s["max_future_s"] = 7 * 86400.0
    srv: dict[str, Any] = tomllib.loads((ROOT / "configs/server.toml").read_text())
    srv["bundles"] = [str(bundle)]
    srv["mqtt"].update(port=mqtt_port)
    srv["mqtt"].pop("username", None)
    srv["http"]["port"] = free_port()
    gpath, spath = work / "gateway.toml", work / "server.toml"
    gpath.write_text(to_toml(gw))
    spath.write_text(to_toml(srv))
    return gpath, spath


def describe(res: dict[str, Any]) -> str:
    """One live line per result."""
    lat = res["latency_ms"]
    return (f"{res['stream']:>4} #{res['window']:<10} {res['label']:<10} "
            f"p={max(res['scores'].values()):.2f}  {res['where']:<15} {res['variant']['id']:<9}"
            f" total {lat['total']:7.1f} ms (head {lat['head']:.1f}, uplink {lat['uplink']:.1f},"
            f" tail {lat['tail']:.1f})")


async def watch_results(port: int, gateway: str, count: list[int]) -> None:
    """Print every result the gateway publishes."""
    import aiomqtt

    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe(f"edgetok/{gateway}/results/+", qos=1)
        async for msg in client.messages:
            count[0] += 1
            print(describe(json.loads(bytes(msg.payload))), flush=True)


async def replay_forever(port: int, speed: float) -> None:
    """Replay the BasicMotions test set in a loop, each pass continuing the timeline."""
    from edgetok.replay import DEFAULT_CHANNELS, load_dataset, make_plan, publish_plan

    x, labels = load_dataset("BasicMotions", "test")
    order = np.random.default_rng(0).permutation(len(x))  # mix the classes for a lively demo
    x, labels = x[order], [labels[i] for i in order]
    plan = make_plan(x, labels, 10.0, time.time())
    while True:
        await publish_plan(plan, host="127.0.0.1", port=port, topic=TOPIC,
                           channels=DEFAULT_CHANNELS, chunk=10, speed=speed)
        plan = type(plan)(plan.x, plan.labels, plan.base_ts + len(x) * plan.window_s,
                          plan.rate_hz)


def summary(http_port: int, elapsed: float) -> str:
    """Throughput and per-stage latency percentiles from the gateway's own results."""
    _, page = http_json(f"http://127.0.0.1:{http_port}/v1/results?limit=10000")
    rows = page.get("results", []) if isinstance(page, dict) else []
    if not rows:
        return "no results"
    lines = [f"{len(rows)} results in {elapsed:.0f}s ({len(rows) / elapsed:.2f} windows/s)"]
    for stage in ("queue", "head", "uplink", "tail", "total"):
        v = np.array([r["latency_ms"][stage] for r in rows])
        lines.append(f"  {stage:<6} p50 {np.percentile(v, 50):8.2f} ms   "
                     f"p99 {np.percentile(v, 99):8.2f} ms")
    wheres: dict[str, int] = {}
    for r in rows:
        wheres[r["where"]] = wheres.get(r["where"], 0) + 1
    lines.append(f"  where: {wheres}")
    return "\n".join(lines)


def start_reference_build(work: Path) -> subprocess.Popen[bytes]:
    """Build the reference bundle in the background, at low priority, logging to a file."""
    log = work / "reference-build.log"
    print(f"building the reference bundle in the background (log: {log}); the demo switches "
          "to it when it is ready", flush=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            ["nice", "-n", "10", sys.executable, "-m", "edgetok", "build", "--no-progress",
             "--recipe", str(ROOT / "configs/models/reference.toml"), "--out",
             str(BUNDLES / "reference")], stdout=out, stderr=subprocess.STDOUT)


class Daemons:
    """The demo's server and gateway processes, restartable on another bundle."""

    def __init__(self, work: Path, mqtt_port: int, http_port: int) -> None:
        self.work, self.mqtt_port, self.http_port = work, mqtt_port, http_port
        self.server: subprocess.Popen[bytes] | None = None
        self.gateway: subprocess.Popen[bytes] | None = None

    def start(self, bundle: Path) -> None:
        gcfg, scfg = write_configs(self.work, bundle, self.mqtt_port, self.http_port)
        self.server = start_edgetok("server", scfg, self.work / "server.log")
        self.gateway = start_edgetok("gateway", gcfg, self.work / "gateway.log")
        wait_ready(f"http://127.0.0.1:{self.http_port}/readyz", self.gateway)

    def stop(self) -> list[int | None]:
        return [stop(self.gateway), stop(self.server)]


async def switch_when_built(build: subprocess.Popen[bytes], daemons: Daemons) -> None:
    """Restart server and gateway on the reference bundle once its build succeeds."""
    code = await asyncio.to_thread(build.wait)
    if code != 0:
        print(f"reference build failed (exit {code}); staying on the quick bundle", flush=True)
        return
    print("reference bundle ready: switching server and gateway to it", flush=True)
    await asyncio.to_thread(daemons.stop)
    await asyncio.to_thread(daemons.start, BUNDLES / "reference")


async def run_demo(args: argparse.Namespace, work: Path) -> int:
    bundle, is_reference = pick_bundle(args.bundle)
    mqtt_port = args.mqtt_port or free_port()
    http_port = http_port_for(args.http_port)
    if args.check_config:
        gcfg, scfg = write_configs(work, bundle, mqtt_port, http_port)
        from edgetok.cli import _check

        return _check("gateway", gcfg) or _check("server", scfg)
    broker = start_mosquitto(work / "broker", mqtt_port)
    daemons = Daemons(work, mqtt_port, http_port)
    build = None
    started = time.monotonic()
    count = [0]
    try:
        daemons.start(bundle)
        print(f"bundle {bundle}\nbroker 127.0.0.1:{mqtt_port}  logs in {work}\n"
              f"results: http://127.0.0.1:{http_port}/v1/results   "
              f"status: http://127.0.0.1:{http_port}/v1/status\n"
              f"replaying BasicMotions (test set) at {args.speed:g}x real time; Ctrl-C stops\n",
              flush=True)
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(watch_results(mqtt_port, "gw-1", count)),
                     tg.create_task(replay_forever(mqtt_port, args.speed))]
            if not is_reference and args.bundle is None and args.build_reference:
                build = start_reference_build(work)
                tasks.append(tg.create_task(switch_when_built(build, daemons)))
            try:
                await asyncio.sleep(args.duration if args.duration else 10**9)
            finally:
                await asyncio.sleep(1.0)
                print("\n" + summary(http_port, time.monotonic() - started))
                for t in tasks:
                    t.cancel()
    finally:
        codes = daemons.stop()
        stop(build)
        stop(broker)
    return 0 if all(c in (0, None) for c in codes) else 1


def main(args: argparse.Namespace) -> int:
    """Entry point for `edgetok demo`."""
    work = Path(tempfile.mkdtemp(prefix="edgetok-demo-"))
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run_demo(args, work))
    return 0
