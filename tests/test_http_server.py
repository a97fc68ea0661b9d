"""The edge server's HTTP API against live processes: health, metrics, spec, auth."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import Broker, free_port
from harness import Proc, basicmotions_plan, gateway_config, replay, server_config, spawn
from harness import wait_results as wait_gateway_results
from openapi_spec_validator import validate as validate_spec
from prometheus_client.parser import text_string_to_metric_families

TOKEN = "server-test-token"
WINDOWS = 3


@dataclass
class Live:
    """A server (with a bearer token) that has answered WINDOWS frames of a real gateway."""

    server: Proc

    def get(self, path: str, token: str | None = TOKEN) -> tuple[int, str, bytes]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.server.http_port}{path}",
                                     headers={"Authorization": f"Bearer {token}"} if token
                                     else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.headers.get("Content-Type", ""), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def _wait_alive(proc: Proc) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.proc is not None and proc.proc.poll() is None, proc.logtext()[-2000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{proc.http_port}/healthz",
                                        timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(proc.logtext()[-2000:])


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Iterator[Live]:
    work = tmp_path_factory.mktemp("http_server")
    broker = Broker(port=free_port(), workdir=work / "broker")
    broker.start()
    server = spawn("server", server_config(tiny_bundle, broker.port), work, "server")
    server.env = {"EDGETOK_API_TOKEN": TOKEN}
    gw = spawn("gateway", gateway_config(work, tiny_bundle, broker.port, free_port()), work,
               "gateway")
    server.start(wait=False)
    try:
        _wait_alive(server)
        gw.start()
        replay(basicmotions_plan(limit=WINDOWS), broker.port)
        rows = wait_gateway_results(gw, WINDOWS)
        assert [r["where"] for r in rows] == ["split"] * WINDOWS, gw.logtext()[-2000:]
        yield Live(server)
    finally:
        gw.stop()
        server.stop()
        broker.stop()


def test_health_and_readiness(live: Live) -> None:
    assert live.get("/healthz", token=None)[0] == 200
    code, _, body = live.get("/readyz")
    doc = json.loads(body)
    assert code == 200 and doc["ready"] and doc["checks"]["broker_connected"]


def test_token_guards_everything_but_healthz(live: Live) -> None:
    _, _, body = live.get("/openapi.json")
    paths = list(json.loads(body)["paths"])
    assert set(paths) == {"/healthz", "/readyz", "/v1/status", "/metrics", "/openapi.json"}
    for path in paths:
        expected = 200 if path == "/healthz" else 401
        assert live.get(path, token=None)[0] == expected, path
        assert live.get(path, token="wrong")[0] == expected, path
        assert live.get(path)[0] == 200, path


def test_metrics_count_the_tails_it_ran(live: Live) -> None:
    code, ctype, body = live.get("/metrics")
    assert code == 200 and ctype.startswith("text/plain")
    samples: dict[str, float] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            samples[s.name] = s.value
    assert samples["edgetok_server_frames_received_total"] == WINDOWS
    assert samples["edgetok_server_replies_total"] == WINDOWS
    assert samples["edgetok_server_tail_latency_seconds_count"] == WINDOWS
    assert 0 < samples["edgetok_server_tail_latency_seconds_sum"] <= \
        samples["edgetok_server_tail_busy_seconds_total"] + 1e-3
    assert samples["edgetok_server_errors_total"] == 0
    assert samples["edgetok_mqtt_connected"] == 1 and samples["edgetok_ready"] == 1


def test_openapi_is_valid_and_matches_the_status(live: Live) -> None:
    spec: dict[str, Any] = json.loads(live.get("/openapi.json")[2])
    validate_spec(spec)
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    code, _, body = live.get("/v1/status")
    status = json.loads(body)
    schema = spec["paths"]["/v1/status"]["get"]["responses"]["200"]["content"][
        "application/json"]["schema"]
    jsonschema.validate(status, {**schema, "components": spec["components"]})
    assert code == 200 and status["counters"]["replies"] == WINDOWS


def test_refuses_to_bind_beyond_loopback_without_a_token(tmp_path: Path,
                                                         tiny_bundle: Path) -> None:
    cfg = server_config(tiny_bundle, free_port())
    cfg["http"]["host"] = "0.0.0.0"
    srv = spawn("server", cfg, tmp_path, "server")
    srv.env = {"EDGETOK_API_TOKEN": ""}
    srv.start(wait=False)
    assert srv.proc is not None and srv.proc.wait(timeout=60) == 2
    assert "refusing to serve the HTTP API beyond loopback" in srv.logtext()


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors_or_schema_violations(live: Live,
                                                                  tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run",
         f"http://127.0.0.1:{live.server.http_port}/openapi.json",
         "-H", f"Authorization: Bearer {TOKEN}", "--checks", "all", "--max-examples", "10",
         "--seed", "1"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:]
    assert "No issues found" in run.stdout
