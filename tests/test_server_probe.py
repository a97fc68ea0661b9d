"""Server probes in the real daemons: the server path measured while windows stay on the device."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from conftest import Broker
from harness import TOPIC, basicmotions_plan, gateway_config, server_config, spawn, wait_for

from edgetok.gateway.inference import SERVER_PROBE_BURST
from edgetok.procs import free_port
from edgetok.replay import DEFAULT_CHANNELS, publish_plan


async def _replay(port: int, windows: int) -> list[dict[str, Any]]:
    """Replay `windows` windows; the gateway's telemetry until its results are all in."""
    reports: list[dict[str, Any]] = []
    results = 0
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe("edgetok/gw-test/telemetry")
        await client.subscribe("edgetok/gw-test/results/#", qos=1)
        feed = asyncio.create_task(publish_plan(
            basicmotions_plan(limit=windows), host="127.0.0.1", port=port, topic=TOPIC,
            channels=DEFAULT_CHANNELS, chunk=10, speed=20.0))
        try:
            async with asyncio.timeout(60):
                async for msg in client.messages:
                    if msg.topic.matches("edgetok/gw-test/telemetry"):
                        reports.append(json.loads(bytes(msg.payload)))  # type: ignore[arg-type]
                    else:
                        results += 1
                    if results == windows and len(reports) >= 3:
                        break
        finally:
            await feed
    return reports


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a veth pair and tc")
def test_a_gateway_on_its_device_reports_the_server_paths_overhead_from_probes(
        tmp_path: Path, mosquitto: Broker, tiny_bundle: Path) -> None:
    """The uplink rate sensed on a real interface (a veth end with tbf), a gateway whose
    windows run on its device probes the server with their tokens: the real server answers,
    the gateway's telemetry carries the per-frame overhead though no window went out, and
    every result is the device's."""
    iface = f"etksp{os.getpid() % 10000}"
    subprocess.run(["ip", "link", "add", iface, "type", "veth", "peer", "name", iface + "b"],
                   check=True)
    subprocess.run(["tc", "qdisc", "replace", "dev", iface, "root", "tbf", "rate", "20mbit",
                    "burst", "30000", "latency", "400ms"], check=True)
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    on_device = f"r0.00-s{manifest['num_layers']}"
    server = spawn("server", server_config(tiny_bundle, mosquitto.port), tmp_path, "server")
    gw = spawn("gateway", gateway_config(
        tmp_path, tiny_bundle, mosquitto.port, free_port(), variant=on_device,
        extra={"telemetry_interval_s": 0.3, "server_probe_interval_s": 0.5,
               "actuators": {"cpu_mode": "off", "tx_mode": "off", "interface": iface,
                             "link_sense": "tc", "link_sense_interval_s": 0.1}}),
        tmp_path, "gateway")
    try:
        server.start()
        gw.start()
        wait_for(lambda: gw.get("/v1/status")[1]["uplink"]["link_bps"] == 20e6, 10,
                 "the sensed rate")
        reports = asyncio.run(_replay(mosquitto.port, 8))
        rows = gw.get("/v1/results")[1]["results"]
        assert len(rows) == 8 and {r["where"] for r in rows} == {"device"}
        up = gw.get("/v1/status")[1]["uplink"]
        assert up["frames_sent"] == up["bytes_sent"] == 0, "probes are not windows' frames"
        assert up["server_probes"] >= SERVER_PROBE_BURST and up["server_probe_bytes"] > 0
        assert up["server_probes_lost"] == 0, gw.logtext()[-1500:]
        counters = server.get("/v1/status")[1]["counters"]
        assert counters["replies"] == up["server_probes"], "the server ran every probe"
        overheads = [r["frame_overhead_ms"] for r in reports if r["frame_overhead_ms"]]
        assert overheads and all(ms >= 0 for ms in overheads), reports
        assert all(r["uplink_bps"] is None for r in reports), "no goodput from probes"
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.http_port}/metrics") as resp:
            metrics = resp.read().decode()
        assert f"edgetok_server_probes_total {float(up['server_probes'])}" in metrics
    finally:
        gw.stop()
        server.stop()
        subprocess.run(["ip", "link", "del", iface], check=False)
