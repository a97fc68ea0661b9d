"""`edgetok replay` and `edgetok demo` front doors: bad input is a one-line error, and
--start-ts lets a second replay follow the first instead of landing in closed windows."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Broker
from harness import TOPIC, gateway_config, spawn, wait_results

from edgetok.demo import http_port_for
from edgetok.procs import free_port
from edgetok.replay import make_plan

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgetok", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize(("flag", "value"), [
    ("--speed", "0"), ("--speed", "nan"), ("--limit", "0"), ("--rate", "-10"),
    ("--chunk", "two"), ("--port", "70000"), ("--start-ts", "yesterday")])
def test_bad_numbers_are_usage_errors(flag: str, value: str) -> None:
    out = run_cli("replay", flag, value)
    assert out.returncode == 2
    assert f"argument {flag}:" in out.stderr and "Traceback" not in out.stderr


def test_demo_rejects_a_zero_speed() -> None:
    out = run_cli("demo", "--speed", "0")
    assert out.returncode == 2 and "argument --speed:" in out.stderr


def test_unknown_dataset_is_one_line() -> None:
    out = run_cli("replay", "--dataset", "NoSuchSet")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "edgetok replay: --dataset: no UCR/UEA dataset named 'NoSuchSet' (e.g. BasicMotions),"
        " and not an .npz path"]


def test_unreachable_broker_names_host_and_port() -> None:
    port = free_port()  # nothing listens there
    out = run_cli("replay", "--port", str(port), "--limit", "1")
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"MQTT broker at 127.0.0.1:{port}" in lines[0], out.stderr


def test_start_ts_rounds_up_to_the_grid_and_follows_a_backdated_plan() -> None:
    import numpy as np

    x = np.zeros((3, 6, 100))
    now = 1_800_000_003.0
    backdated = make_plan(x, ["a"] * 3, 10.0, now)
    assert backdated.base_ts + 3 * backdated.window_s <= now
    forward = make_plan(x, ["a"] * 3, 10.0, now, start=now)
    assert forward.base_ts == 1_800_000_010.0
    assert forward.window_seq(0) > backdated.window_seq(2)


def test_demo_http_port_avoids_a_taken_8080() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        chosen = http_port_for(None, preferred=taken)
        assert chosen != taken
    assert http_port_for(1234, preferred=taken) == 1234


def test_second_replay_with_start_now_is_not_late(tmp_path: Path, mosquitto: Broker,
                                                  tiny_bundle: Path) -> None:
    """Replays twice over the same span: with --start-ts now the second run's windows all
    get results; backdated again, its readings fall in closed windows (dead letters)."""
    gw = spawn("gateway", gateway_config(tmp_path, tiny_bundle, mosquitto.port, free_port(),
                                         deadline_ms=500.0), tmp_path, "gateway").start()
    try:
        common = ("replay", "--port", str(mosquitto.port), "--topic", TOPIC, "--speed", "1000",
                  "--chunk", "10")
        base = (*common, "--limit", "3")
        first = run_cli(*base, "--record", str(tmp_path / "first.json"))
        assert first.returncode == 0, first.stderr
        assert len(wait_results(gw, 3)) >= 3
        second = run_cli(*base, "--start-ts", "now", "--record", str(tmp_path / "second.json"))
        assert second.returncode == 0, second.stderr
        rows = wait_results(gw, 6)
        recorded = [w["seq"] for name in ("first", "second")
                    for w in json.loads((tmp_path / f"{name}.json").read_text())["windows"]]
        assert {r["window"] for r in rows} >= set(recorded)
        assert "late" not in gw.get("/v1/status")[1]["deadletters"]
        # Backdated over the first run's span again; two windows, so that its stamps (and
        # so its payloads) differ from the first run's, which would count as duplicates.
        third = run_cli(*common, "--limit", "2")
        assert third.returncode == 0, third.stderr
        assert gw.get("/v1/status")[1]["deadletters"].get("late", 0) > 0
    finally:
        gw.stop()
