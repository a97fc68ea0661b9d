"""A coordinating server opens a tail before it tells a gateway to send frames for it."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import Broker, free_port
from harness import server_config, start_coordinated

from edgetok.agent.config import ServerConfig
from edgetok.agent.server import TailServer


def _status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=5) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
    return doc


def test_decided_tail_is_open_before_the_first_frame(tmp_path: Path, mosquitto: Broker,
                                                      tiny_bundle: Path) -> None:
    """server-only: the gateway's first decision names a split-0 variant. Its tail session is
    open (and has run once) on the server while no frame has arrived yet, so the first
    window does not pay ~40 ms for opening it."""
    server, gw = start_coordinated(tmp_path, tiny_bundle, mosquitto.port,
                                   telemetry_interval_s=0.3)
    try:
        deadline = time.monotonic() + 30
        decision: dict[str, Any] | None = None
        while decision is None and time.monotonic() < deadline:
            status = _status(server.http_port)
            view = (status["coordinator"] or {}).get("gateways", {}).get("gw-test")
            decision = view and view["decision"]
            time.sleep(0.2)
        assert decision is not None, server.logtext()[-2000:]
        assert decision["split"] == 0, decision
        bundle = json.loads((tiny_bundle / "manifest.json").read_text())["bundle_id"]
        assert f"{decision['variant']}/tail" in status["sessions"][bundle], status["sessions"]
        assert status["counters"]["frames"] == 0, "no window was sent: the tail was warmed"
    finally:
        gw.stop()
        server.stop()


def test_a_failing_warm_up_is_logged_and_never_raised(tiny_bundle: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Warm-up runs inside the coordinator's loop: an exception there would stop the server."""
    srv = TailServer(ServerConfig.model_validate(server_config(tiny_bundle, free_port())))
    rt = next(iter(srv.runtimes.values()))
    srv._warm_tail(rt, "r9.99-s0")  # no such variant
    assert "could not warm the tail of r9.99-s0" in caplog.text
    assert rt.session_names == []
