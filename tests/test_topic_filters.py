"""Topic filter validation: what a broker would answer by dropping the connection."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from conftest import Broker
from harness import TOPIC, gateway_config, spawn, status, wait_for

from edgetok.procs import free_port
from edgetok.topics import filter_problem


@pytest.mark.parametrize("f", [
    "#", "+", "sensors/#", "sensors/+/temp", "+/+/#", "/", "a//b", "sensors/ü/+",
    "$share/grp/edgetok/uplink/+", "$SYS/#", "x" * 65535])
def test_valid_filters(f: str) -> None:
    assert filter_problem(f) is None


@pytest.mark.parametrize(("f", "why"), [
    ("", "empty"),
    ("sensors/#/bad", "'#' must be alone in the last level"),
    ("sensors#", "'#' must be alone in the last level"),
    ("sensors/a#", "'#' must be alone in the last level"),
    ("sensors/+x", "'+' must be alone in its level"),
    ("a+/b", "'+' must be alone in its level"),
    ("a/\0/b", "NUL"),
    ("a/\ud800", "not valid UTF-8"),
    ("ü" * 32768, "over MQTT's 65535"),
    ("$share//t", "share name"),
    ("$share/g+/t", "share name"),
    ("$share/g", "a filter after its share name"),
    ("$share/g/t/#/x", "'#' must be alone"),
])
def test_invalid_filters_say_why(f: str, why: str) -> None:
    problem = filter_problem(f)
    assert problem is not None and why in problem


def test_a_bad_filter_in_a_config_is_a_config_error_with_its_location(tmp_path: Path) -> None:
    """`sensors/#/bad` passed --check-config; then the broker dropped the gateway for it,
    and it reconnected for ever. A server group with a '/' broke its shared subscription."""
    from edgetok.agent.config import ServerConfig
    from edgetok.gateway.config import GatewayConfig
    from edgetok.settings import ConfigError, parse_config

    stream = {"name": "imu", "topics": ["sensors/imu", "sensors/#/bad"], "channels": ["x"],
              "rate_hz": 10.0, "window": 10}
    raw = {"id": "gw", "state_dir": str(tmp_path), "bundle": {"path": str(tmp_path)},
           "decision": {"variant": "r0.00-s1"}, "streams": [stream],
           "unclaimed_topics": ["sensors+"]}
    with pytest.raises(ConfigError) as info:
        parse_config(raw, GatewayConfig)
    text = "\n".join(info.value.problems)
    assert "streams.0.topics" in text and "'#' must be alone" in text
    assert "unclaimed_topics" in text and "'+' must be alone" in text
    with pytest.raises(ConfigError) as info:
        parse_config({"bundles": [str(tmp_path)], "group": "a/b"}, ServerConfig)
    assert "group" in "\n".join(info.value.problems)
    assert parse_config({"bundles": [str(tmp_path)], "group": "tail-2"}, ServerConfig)


@pytest.mark.slow
def test_a_topic_dropped_from_the_config_stops_arriving(
        tmp_path: Path, mosquitto: Broker, tiny_bundle: Path) -> None:
    """The gateway's session outlives a restart, and with it every filter it subscribed;
    one taken out of the config must stop delivering, not turn into unknown-topic noise."""
    cfg = gateway_config(tmp_path, tiny_bundle, mosquitto.port, free_port(),
                         stream_extra={"topics": [TOPIC, "sensors/old"]})
    gw = spawn("gateway", cfg, tmp_path, "gw").start()
    wait_for(lambda: gw.get("/readyz")[0] == 200, what="ready")
    gw.stop()
    cfg["streams"][0]["topics"] = [TOPIC]
    gw = spawn("gateway", cfg, tmp_path, "gw").start()
    try:
        wait_for(lambda: gw.get("/readyz")[0] == 200, what="ready again")
        _pub(mosquitto.port, "sensors/old", b'{"ts": 1, "acc_x": 1.0}')
        _pub(mosquitto.port, TOPIC, b"not json")  # a marker that does arrive
        wait_for(lambda: status(gw)["counters"]["messages"] >= 1, what="the marker")
        time.sleep(0.5)  # the old topic's message, had it come, came before the marker
        st = status(gw)
        assert st["counters"]["messages"] == 1, st["counters"]
    finally:
        gw.stop()


def _pub(port: int, topic: str, payload: bytes) -> None:
    subprocess.run(["mosquitto_pub", "-p", str(port), "-q", "1", "-t", topic, "-s"],
                   input=payload, check=True, timeout=10)
