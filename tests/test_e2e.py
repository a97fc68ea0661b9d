"""End to end: BasicMotions over a real broker, through real gateway and server processes."""

from __future__ import annotations

import collections
import json
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import Broker, free_port
from harness import (
    basicmotions_plan,
    gateway_config,
    offline_predictions,
    replay,
    server_config,
    spawn,
    wait_results,
)

pytestmark = pytest.mark.slow


def test_replay_gives_one_result_per_window_matching_the_unsplit_model(
        tmp_path: Path, mosquitto: Broker, tiny_bundle: Path) -> None:
    server = spawn("server", server_config(tiny_bundle, mosquitto.port), tmp_path, "server")
    gw = spawn("gateway", gateway_config(tmp_path, tiny_bundle, mosquitto.port, free_port()),
               tmp_path, "gateway")
    server.start()
    gw.start()
    try:
        plan = basicmotions_plan()
        replay(plan, mosquitto.port)
        rows = wait_results(gw, len(plan.x))
        seqs = collections.Counter(r["window"] for r in rows)
        expected = {plan.window_seq(j) for j in range(len(plan.x))}
        assert set(seqs) == expected, gw.logtext()[-3000:]
        assert all(n == 1 for n in seqs.values())
        assert {r["where"] for r in rows} == {"split"}
        logits = offline_predictions(tiny_bundle, plan)
        labels = json.loads((tiny_bundle / "manifest.json").read_text())["labels"]
        by_seq = {r["window"]: r for r in rows}
        for j in range(len(plan.x)):
            assert by_seq[plan.window_seq(j)]["label"] == labels[int(np.argmax(logits[j]))]
        r0 = rows[0]
        assert set(r0["latency_ms"]) == {"queue", "head", "uplink", "tail", "total"}
        assert r0["variant"] == {"id": "r0.00-s1", "pruning_ratio": 0.0, "split": 1,
                                 "precision": "fp32"}
        code, latest = gw.get("/v1/results/latest")
        assert code == 200 and latest["results"][0]["window"] == max(expected)
        code, page = gw.get(f"/v1/results?stream=imu&limit=5&since_id={rows[9]['id']}")
        assert [r["id"] for r in page["results"]] == [r["id"] for r in rows[10:15]]
        code, streams = gw.get("/v1/streams")
        assert streams["streams"][0]["results"] == len(plan.x)
    finally:
        assert gw.stop() == 0
        assert server.stop() == 0


def test_sigterm_drains_and_announces_stopped(tmp_path: Path, mosquitto: Broker,
                                             tiny_bundle: Path) -> None:
    import paho.mqtt.subscribe as subscribe

    gw = spawn("gateway", gateway_config(tmp_path, tiny_bundle, mosquitto.port, free_port(),
                                         variant="r0.00-s2"), tmp_path, "gateway").start()
    status = subscribe.simple("edgetok/gw-test/status", hostname="127.0.0.1",
                              port=mosquitto.port, retained=True)
    assert json.loads(status.payload)["state"] == "online"
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(timeout=30) == 0
    status = subscribe.simple("edgetok/gw-test/status", hostname="127.0.0.1",
                              port=mosquitto.port, retained=True)
    assert json.loads(status.payload)["state"] == "stopped"


def test_results_continue_after_broker_restart(tmp_path: Path, mosquitto: Broker,
                                              tiny_bundle: Path) -> None:
    gw = spawn("gateway", gateway_config(tmp_path, tiny_bundle, mosquitto.port, free_port(),
                                         variant="r0.00-s2"), tmp_path, "gateway").start()
    try:
        plan = basicmotions_plan(limit=20)
        first = type(plan)(plan.x[:10], plan.labels[:10], plan.base_ts, plan.rate_hz)
        replay(first, mosquitto.port)
        assert len(wait_results(gw, 10)) == 10
        mosquitto.stop()
        mosquitto.start()
        second = type(plan)(plan.x[10:], plan.labels[10:], plan.base_ts + 10 * plan.window_s,
                            plan.rate_hz)
        replay(second, mosquitto.port)
        rows = wait_results(gw, 20)
        assert sorted(r["window"] for r in rows) == [plan.window_seq(j) for j in range(20)]
        _, status = gw.get("/v1/status")
        assert status["mqtt"]["connects"] >= 2
    finally:
        assert gw.stop() == 0


def test_two_servers_share_the_uplink(tmp_path: Path, mosquitto: Broker,
                                      tiny_bundle: Path) -> None:
    servers = [spawn("server", server_config(tiny_bundle, mosquitto.port, f"srv-{i}"),
                     tmp_path / f"s{i}", f"server{i}").start() for i in range(2)]
    gw = spawn("gateway", gateway_config(tmp_path, tiny_bundle, mosquitto.port, free_port()),
               tmp_path, "gateway").start()
    try:
        plan = basicmotions_plan()
        replay(plan, mosquitto.port)
        rows = wait_results(gw, len(plan.x))
        assert len(rows) == len(plan.x)
        assert {r["where"] for r in rows} == {"split"}
        replies = [s.get("/v1/status")[1]["counters"]["replies"] for s in servers]
        assert sum(replies) == len(plan.x)
        assert min(replies) > 0, f"one server took everything: {replies}"
    finally:
        assert gw.stop() == 0
        for s in servers:
            assert s.stop() == 0


def test_channels_from_two_topics_merge_into_one_window(tmp_path: Path, mosquitto: Broker,
                                                        tiny_bundle: Path) -> None:
    """Accelerometer and gyroscope arrive on separate topics; windows hold all six channels."""
    import asyncio

    import aiomqtt

    from edgetok.replay import DEFAULT_CHANNELS

    cfg = gateway_config(tmp_path, tiny_bundle, mosquitto.port, free_port(),
                         variant="r0.00-s2", stream_extra={"topics": ["imu/acc", "imu/gyr"]})
    gw = spawn("gateway", cfg, tmp_path, "gateway").start()
    plan = basicmotions_plan(limit=6)

    async def publish() -> None:
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            for j in range(len(plan.x)):
                ts = [round(float(t), 6) for t in plan.timestamps(j)]
                for topic, chans in (("imu/gyr", range(3, 6)), ("imu/acc", range(3))):
                    doc: dict[str, object] = {"ts": ts}
                    doc.update({DEFAULT_CHANNELS[c]: [float(v) for v in plan.x[j, c]]
                                for c in chans})
                    await client.publish(topic, json.dumps(doc), qos=1)

    try:
        asyncio.run(publish())
        rows = wait_results(gw, len(plan.x))
        assert sorted(r["window"] for r in rows) == [plan.window_seq(j)
                                                     for j in range(len(plan.x))]
        logits = offline_predictions(tiny_bundle, plan)
        labels = json.loads((tiny_bundle / "manifest.json").read_text())["labels"]
        by_seq = {r["window"]: r for r in rows}
        for j in range(len(plan.x)):
            expected = logits[j] - logits[j].max()
            probs = np.exp(expected) / np.exp(expected).sum()
            got = by_seq[plan.window_seq(j)]["scores"]
            np.testing.assert_allclose([got[lab] for lab in labels], probs, atol=1e-4)
    finally:
        assert gw.stop() == 0
