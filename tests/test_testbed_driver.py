"""The test bed's sensor driver measures gateways under a coordinator's decision, not start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Broker
from harness import TOPIC, start_coordinated

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _drive(port: int, out: Path, *extra: str) -> dict[str, Any]:
    """Run bench/testbed/driver.py against the broker; its JSON document."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "bench"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    subprocess.run([sys.executable, "-m", "testbed.driver", "--port", str(port),
                    "--gateways", "gw-test", "--topic", TOPIC, "--windows", "2",
                    "--warmup", "1", "--window-rate", "4", "--online-timeout", "30",
                    "--out", str(out), *extra], check=True, env=env, timeout=90)
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def test_replay_waits_until_the_gateway_runs_a_decision(tmp_path: Path, mosquitto: Broker,
                                                        tiny_bundle: Path) -> None:
    """The gateway starts on its config's variant and reports telemetry only every 2 s, so
    the coordinator's first decision comes seconds after it is online. With
    --await-decision every replayed window, the first included, runs the decided variant."""
    server, gw = start_coordinated(tmp_path, tiny_bundle, mosquitto.port,
                                   telemetry_interval_s=2.0)
    try:
        doc = _drive(mosquitto.port, tmp_path / "driver.json", "--await-decision")
    finally:
        gw.stop()
        server.stop()
    assert len(doc["results"]) == 3, doc["results"]
    assert doc["decisions"], "the driver records the decision it waited for"
    decided = doc["decisions"][-1]["variant"]
    assert decided != "r0.00-s1", "the config's variant: the test would prove nothing"
    assert [r["variant"]["id"] for r in doc["results"]] == [decided] * 3
    applied = [t for t in doc["telemetry"] if t["gateway"] == "gw-test" and t["applied_seq"]]
    assert applied and applied[0]["received_ts"] <= doc["started"], \
        "the telemetry that said a decision was applied is kept, and came before the replay"
