"""A hostile or broken gateway cannot stop the edge server, speak for another gateway, or be
refused for a clock that disagrees with the server's."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import Broker
from harness import Collector, coordinating_server_config, spawn, wait_for

from edgetok.frames import FrameHeader, encode_frame
from edgetok.models.bundle import read_manifest

pytestmark = pytest.mark.slow


def _pub(port: int, topic: str, payload: bytes) -> None:
    """Publish raw bytes with the C client, as any device on the broker could."""
    subprocess.run(["mosquitto_pub", "-p", str(port), "-q", "1", "-t", topic, "-s"],
                   input=payload, check=True, timeout=10)


def _frame(bundle: Path, gateway: str, window: int, sent_ts: float) -> bytes:
    """A well-formed frame for the tiny bundle's first split variant, 1 s of budget."""
    m = read_manifest(bundle)
    v = next(v for v in m.variants if 0 < v.split < m.num_layers)
    hdr = FrameHeader(gateway=gateway, bundle=m.bundle_id, variant=v.id, stream="imu",
                      window=window, start_ts=0.0, end_ts=1.0, deadline_ts=sent_ts + 1.0,
                      sent_ts=sent_ts, precision="fp32", shape=tuple(v.feature_shape))
    return encode_frame(hdr, np.zeros((1, *v.feature_shape), np.float32))


def test_hostile_frames_and_telemetry_leave_the_server_serving(
        tmp_path: Path, mosquitto: Broker, tiny_bundle: Path) -> None:
    port = mosquitto.port
    server = spawn("server", coordinating_server_config(tiny_bundle, port), tmp_path, "server")
    server.start()
    seen = Collector(port, ["edgetok/+/downlink", "edgetok/+/control"]).start()
    try:
        # Infinity passed `gt=0`, and one such report ended the server's process.
        _pub(port, "edgetok/g1/telemetry",
             b'{"gateway":"g1","ts":%.3f,"link_bps":Infinity,"cpu_hz":1e9}' % time.time())
        # A report for another gateway on g1's topic: the topic is what the ACL vouches for.
        _pub(port, "edgetok/g1/telemetry", json.dumps(
            {"gateway": "g2", "ts": time.time(), "cpu_hz": 1e9}).encode())
        wait_for(lambda: server.get("/v1/status")[1]["coordinator"]["telemetry_rejected"] >= 2,
                 what="both reports rejected")
        # A header naming a wildcard made the server publish on it and the broker drop it.
        _pub(port, "edgetok/uplink/gwA", _frame(tiny_bundle, "x/#", 1, time.time()))
        _pub(port, "edgetok/uplink/gwA", _frame(tiny_bundle, "gwB", 2, time.time()))
        # Then a good frame from a gateway whose clock is an hour behind the server's.
        _pub(port, "edgetok/uplink/gwA", _frame(tiny_bundle, "gwA", 3, time.time() - 3600))
        wait_for(lambda: seen.on("edgetok/gwA/downlink"), what="a reply to gwA")
        reply = json.loads(seen.on("edgetok/gwA/downlink")[0])
        assert reply["window"] == 3 and reply["logits"] and reply.get("error") is None
        assert not seen.on("edgetok/gwB/") and not seen.on("edgetok/x/")
        code, st = server.get("/v1/status")
        assert code == 200 and st["mqtt"]["connects"] == 1, "the broker never dropped it"
        assert st["counters"]["errors"] == 2 and st["counters"]["expired"] == 0
        # And the coordinator still decides for a gateway that reports sanely.
        _pub(port, "edgetok/g1/telemetry", json.dumps(
            {"gateway": "g1", "ts": time.time(), "cpu_hz": 1e9}).encode())
        wait_for(lambda: seen.on("edgetok/g1/control"), what="a decision for g1")
        assert server.proc is not None and server.proc.poll() is None
    finally:
        seen.stop()
        server.stop()
    assert "Traceback" not in server.logtext()
