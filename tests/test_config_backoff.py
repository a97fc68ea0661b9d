"""MQTT reconnect backoff: a first delay above the cap is a config error naming both keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from harness import gateway_config, server_config

from edgetok.procs import to_toml
from edgetok.settings import ConfigError, MqttSettings, parse_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("role", ["gateway", "server"])
def test_check_config_names_the_backoff_keys(tmp_path: Path, role: str) -> None:
    bundle = tmp_path / "bundle"  # never reached: the config is refused first
    cfg = (gateway_config(tmp_path, bundle, 1883, 8080) if role == "gateway"
           else server_config(bundle, 1883))
    cfg["mqtt"].update(reconnect_min_s=10.0, reconnect_max_s=1.0)
    path = tmp_path / f"{role}.toml"
    path.write_text(to_toml(cfg))
    out = subprocess.run([sys.executable, "-m", "edgetok", role, "--config", str(path),
                          "--check-config"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 2
    problem = next(line for line in out.stderr.splitlines() if "reconnect_min_s" in line)
    assert problem.strip().startswith("mqtt:") and "reconnect_max_s" in problem
    assert "Traceback" not in out.stderr


def test_equal_delays_are_fine_and_the_default_cap_counts() -> None:
    same = parse_config({"reconnect_min_s": 2.0, "reconnect_max_s": 2.0}, MqttSettings)
    assert same.reconnect_min_s == same.reconnect_max_s == 2.0
    with pytest.raises(ConfigError) as info:
        parse_config({"reconnect_min_s": 20.0}, MqttSettings, source="t")  # cap: 15 s
    assert info.value.problems == [
        "(top level): Value error, reconnect_min_s (20) is above reconnect_max_s (15); "
        "the first reconnect delay cannot exceed the cap"]
