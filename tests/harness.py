"""Test harness: real gateway and server processes around a real broker and bundle."""

from __future__ import annotations

import asyncio
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetok.procs import free_port, http_json, start_edgetok, stop, to_toml, wait_ready
from edgetok.replay import DEFAULT_CHANNELS, ReplayPlan, load_dataset, make_plan, publish_plan

if TYPE_CHECKING:
    from edgetok.gateway.windows import ClosedWindow
    from edgetok.models.bundle import Manifest
    from edgetok.tokenizers import Tokenizer

TOPIC = "sensors/imu"


def gateway_config(workdir: Path, bundle: Path, mqtt_port: int, http_port: int, *,
                   variant: str = "r0.00-s1", precision: str = "fp32",
                   deadline_ms: float = 2000.0, gw_id: str = "gw-test",
                   extra: dict[str, Any] | None = None,
                   stream_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A gateway config dict for one IMU stream on TOPIC."""
    cfg: dict[str, Any] = {
        "id": gw_id, "state_dir": str(workdir / "state"),
        "mqtt": {"host": "127.0.0.1", "port": mqtt_port, "client_id": f"edgetok-{gw_id}",
                 "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "bundle": {"path": str(bundle), "threads": 1},
        "decision": {"variant": variant, "precision": precision},
        "http": {"host": "127.0.0.1", "port": http_port},
        "streams": [{"name": "imu", "topics": [TOPIC], "channels": DEFAULT_CHANNELS,
                     "rate_hz": 10.0, "window": 100, "deadline_ms": deadline_ms,
                     "idle_close_s": 1.0, **(stream_extra or {})}],
    }
    cfg.update(extra or {})
    return cfg


def server_config(bundle: Path, mqtt_port: int, server_id: str = "srv-test") -> dict[str, Any]:
    return {"id": server_id, "bundles": [str(bundle)], "workers": 1,
            "mqtt": {"host": "127.0.0.1", "port": mqtt_port, "session_expiry_s": 0,
                     "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
            "http": {"host": "127.0.0.1", "port": free_port()}}


def coordinating_server_config(bundle: Path, mqtt_port: int, policy: str = "server-only"
                                ) -> dict[str, Any]:
    """A server that also runs the coordinator, on a Wi-Fi-like link with a 1 s deadline."""
    cfg = server_config(bundle, mqtt_port)
    cfg["coordinator"] = {
        "policy": policy, "resolve_interval_s": 1.0,
        "link": {"bandwidth_hz": 20e6, "gain": 7.96e-12, "noise_w_per_hz": 3.98e-20,
                 "p_max_w": 0.1},
        "device": {"f_min_hz": 0.6e9, "f_max_hz": 1.5e9, "kappa": 1e-25},
        "budget": {"deadline_ms": 1000.0}}
    return cfg


def start_coordinated(workdir: Path, bundle: Path, mqtt_port: int, policy: str = "server-only",
                      **gateway_extra: Any) -> tuple[Proc, Proc]:
    """A started coordinating server (server-only by default) and a started gateway that
    follows it."""
    server = spawn("server", coordinating_server_config(bundle, mqtt_port, policy), workdir,
                   "server")
    gw = spawn("gateway", gateway_config(workdir, bundle, mqtt_port, free_port(),
                                         extra=gateway_extra), workdir, "gateway")
    server.start()
    gw.start()
    return server, gw


@dataclass
class Proc:
    """A running edgetok process with its config and log."""

    role: str
    config: Path
    log: Path
    http_port: int
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    def start(self, wait: bool = True) -> Proc:
        self.proc = start_edgetok(self.role, self.config, self.log, self.env)
        if wait:
            wait_ready(f"http://127.0.0.1:{self.http_port}/readyz", self.proc, timeout=60)
        return self

    def stop(self) -> int | None:
        code = stop(self.proc)
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def get(self, path: str) -> tuple[int, Any]:
        return http_json(f"http://127.0.0.1:{self.http_port}{path}")

    def logtext(self) -> str:
        return self.log.read_text(errors="replace")


def spawn(role: str, cfg: dict[str, Any], workdir: Path, name: str) -> Proc:
    """Write a config and return an unstarted process wrapper."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{name}.toml"
    path.write_text(to_toml(cfg))
    return Proc(role, path, workdir / f"{name}.log", int(cfg["http"]["port"]))


def basicmotions_plan(limit: int | None = None) -> ReplayPlan:
    """The BasicMotions test set laid on the time grid, ending now."""
    x, labels = load_dataset("BasicMotions", "test")
    if limit:
        x, labels = x[:limit], labels[:limit]
    return make_plan(x, labels, 10.0, time.time())


def replay(plan: ReplayPlan, port: int, speed: float = 1000.0, chunk: int = 10) -> int:
    """Publish a plan at QoS 1, waiting for every PUBACK."""
    return asyncio.run(publish_plan(plan, host="127.0.0.1", port=port, topic=TOPIC,
                                    channels=DEFAULT_CHANNELS, chunk=chunk, speed=speed))


def wait_results(gw: Proc, n: int, timeout: float = 60) -> list[dict[str, Any]]:
    """Poll /v1/results until at least n results are stored (or time runs out)."""
    deadline = time.monotonic() + timeout
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        code, body = gw.get("/v1/results?limit=10000")
        if code == 200:
            rows = body["results"]
            if len(rows) >= n:
                return rows
        time.sleep(0.2)
    return rows


def bundle_tokenizer(manifest: Manifest) -> Tokenizer:
    """The tokenizer a bundle's manifest names, built."""
    from pydantic import TypeAdapter

    from edgetok.tokenizers import TokenizerConfig

    return TypeAdapter(TokenizerConfig).validate_python(manifest.input.tokenizer).build()


def random_window(manifest: Manifest, seq: int) -> ClosedWindow:
    """A closed window of the bundle's input shape, normal noise seeded by `seq`."""
    from edgetok.gateway.windows import ClosedWindow
    from edgetok.tokenizers.base import SeriesWindow

    spec = manifest.input
    values = np.random.default_rng(seq).normal(size=(len(spec.channels), spec.window))
    ts = np.arange(spec.window) / spec.rate_hz
    return ClosedWindow(stream="imu", seq=seq, start_ts=0.0, end_ts=float(ts[-1]),
                        data=SeriesWindow(values=values, timestamps=ts),
                        closed_mono=time.monotonic())


def offline_predictions(bundle: Path, plan: ReplayPlan, variant: str | None = None) -> np.ndarray:
    """Logits of the unsplit model (split = L) on the plan's windows, run in-process."""
    from edgetok.models.runtime import Runtime

    rt = Runtime(bundle)
    m = rt.manifest
    tok = bundle_tokenizer(m)
    t = np.stack([plan.timestamps(j) for j in range(len(plan.x))])
    tokens = tok.tokenize_array(plan.x.astype(np.float32), t).model_input()
    vid = variant or m.device_variant(0.0).id
    return rt.full(vid, tokens)


# Fault injection (issue 5): a replayer that rides out broker restarts, a collector of what
# the gateway publishes, and exactly-once checks against the HTTP API and the database.

REPORT_ENV = "EDGETOK_FAULT_REPORT"


def plan_messages(plan: ReplayPlan, chunk: int = 10,
                  windows: range | None = None) -> list[tuple[str, bytes]]:
    """(topic, payload) for every message of the plan's windows, in publishing order."""
    from edgetok.replay import payloads

    js = windows if windows is not None else range(len(plan.x))
    return [(TOPIC, body) for j in js for body in payloads(plan, j, DEFAULT_CHANNELS, chunk)]


class Replayer:
    """Publishes messages at QoS 1 from a thread; after a lost connection it resends.

    Like a sensor with an outbox: a message whose PUBACK never came is published again, so
    the broker may hold it twice and the gateway must recognise the copy.
    """

    def __init__(self, port: int, messages: list[tuple[str, bytes]], interval_s: float = 0.0,
                 client_id: str = "edgetok-test-replay") -> None:
        import threading

        self.port = port
        self.messages = messages
        self.interval_s = interval_s
        self.client_id = client_id
        self.sent = 0
        self.retries = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="replayer", daemon=True)

    def start(self) -> Replayer:
        self.thread.start()
        return self

    def join(self, timeout: float = 120) -> int:
        """Wait for the last PUBACK; the number of messages published."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"replay stuck after {self.sent} messages"
        if self.error is not None:
            raise self.error
        return self.sent

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # surfaced by join()
            self.error = exc

    async def _run(self) -> None:
        from edgetok.mqttlink import MqttSession
        from edgetok.settings import MqttSettings

        settings = MqttSettings(port=self.port, session_expiry_s=0, reconnect_min_s=0.05,
                                reconnect_max_s=0.2)
        session = MqttSession(settings, self.client_id, password=None, manual_ack=False)
        runner = asyncio.create_task(session.run())
        t_next = time.monotonic()
        for topic, body in self.messages:
            while not await session.publish(topic, body, qos=1, wait_s=30, ack_s=2.0):
                self.retries += 1
            self.sent += 1
            t_next += self.interval_s
            if t_next > time.monotonic():
                await asyncio.sleep(t_next - time.monotonic())
        await session.close()
        await runner


class Collector:
    """Subscribes (persistent session, QoS 1) from a thread and keeps what arrives, in order."""

    def __init__(self, port: int, filters: list[str],
                 client_id: str = "edgetok-test-collector") -> None:
        import threading

        self.port = port
        self.filters = filters
        self.client_id = client_id
        self.messages: list[tuple[str, bytes]] = []
        self.ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()),
                                       name="collector", daemon=True)

    def start(self) -> Collector:
        self.thread.start()
        assert self.ready.wait(15), "collector did not connect"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(15)

    def on(self, topic_prefix: str) -> list[bytes]:
        """Payloads received on topics starting with `topic_prefix`, in arrival order."""
        return [p for t, p in list(self.messages) if t.startswith(topic_prefix)]

    async def _run(self) -> None:
        from edgetok.mqttlink import InMessage, MqttSession
        from edgetok.settings import MqttSettings

        async def keep(msg: InMessage) -> None:
            self.messages.append((msg.topic, msg.payload))

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        settings = MqttSettings(port=self.port, session_expiry_s=600, reconnect_min_s=0.05,
                                reconnect_max_s=0.3)
        session = MqttSession(settings, self.client_id, password=None, manual_ack=False,
                              subscriptions=self.filters, on_message=keep)
        runner = asyncio.create_task(session.run())
        await session.connected.wait()
        self.ready.set()
        await self._stop.wait()
        await session.close()
        await runner


def db_query(workdir: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows from the gateway's database (read-only; safe while the gateway runs)."""
    import sqlite3

    path = workdir / "state" / "edgetok.db"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return list(db.execute(sql, args))
    finally:
        db.close()


def assert_exactly_once(gw: Proc, workdir: Path, expected: set[int],
                        timeout: float = 60) -> list[dict[str, Any]]:
    """Every expected window has exactly one result, per the HTTP API and the database."""
    import collections

    rows = wait_results(gw, len(expected), timeout)
    api = collections.Counter(r["window"] for r in rows)
    missing = sorted(expected - set(api))
    assert not missing, f"windows without a result: {missing}\n{gw.logtext()[-4000:]}"
    assert set(api) == expected, f"unexpected windows {sorted(set(api) - expected)}"
    assert max(api.values()) == 1, f"doubled: {[k for k, n in api.items() if n > 1]}"
    db = collections.Counter(w for (w,) in db_query(workdir, "SELECT window FROM results"))
    assert db == api
    return rows


def status(gw: Proc) -> dict[str, Any]:
    """The gateway's /v1/status document."""
    code, body = gw.get("/v1/status")
    assert code == 200, body
    return dict(body)


def report(name: str, **figures: Any) -> None:
    """Print a fault test's figures, and append them to $EDGETOK_FAULT_REPORT if set."""
    import json
    import os

    line = json.dumps({"test": name, **figures})
    print(f"FAULT-REPORT {line}")
    target = os.environ.get(REPORT_ENV)
    if target:
        with open(target, "a") as f:
            f.write(line + "\n")


def fault_config(workdir: Path, bundle: Path, mqtt_port: int, *, deadline_ms: float = 1000.0,
                 idle_close_s: float = 0.5, stream_extra: dict[str, Any] | None = None,
                 **kw: Any) -> dict[str, Any]:
    """A gateway config with the short deadline and idle rule the fault tests need."""
    return gateway_config(workdir, bundle, mqtt_port, free_port(), deadline_ms=deadline_ms,
                          stream_extra={"idle_close_s": idle_close_s, **(stream_extra or {})},
                          **kw)


def wait_for(cond: Any, timeout: float = 30.0, what: str = "condition") -> float:
    """Poll until cond() is truthy; the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - t0


def first_result_after(rows: list[dict[str, Any]], wall_ts: float) -> float | None:
    """Seconds from `wall_ts` to the first result stored after it."""
    later = [r["created_ts"] for r in rows if r["created_ts"] >= wall_ts]
    return round(min(later) - wall_ts, 3) if later else None


async def until(cond: Any, limit_s: float = 20.0) -> None:
    """Yield to the loop until cond() holds (polling: the conditions span several objects)."""
    async with asyncio.timeout(limit_s):
        while not cond():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
