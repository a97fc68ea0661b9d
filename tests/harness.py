"""Test harness: real gateway and server processes around a real broker and bundle."""

from __future__ import annotations

import asyncio
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgetok.procs import free_port, http_json, start_edgetok, stop, to_toml, wait_ready
from edgetok.replay import DEFAULT_CHANNELS, ReplayPlan, load_dataset, make_plan, publish_plan

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


def offline_predictions(bundle: Path, plan: ReplayPlan, variant: str | None = None) -> np.ndarray:
    """Logits of the unsplit model (split = L) on the plan's windows, run in-process."""
    from pydantic import TypeAdapter

    from edgetok.models.runtime import Runtime
    from edgetok.tokenizers import TokenizerConfig

    rt = Runtime(bundle)
    m = rt.manifest
    tok = TypeAdapter(TokenizerConfig).validate_python(m.input.tokenizer).build()
    t = np.stack([plan.timestamps(j) for j in range(len(plan.x))])
    tokens = tok.tokenize_array(plan.x.astype(np.float32), t).model_input()
    vid = variant or m.device_variant(0.0).id
    return rt.full(vid, tokens)
