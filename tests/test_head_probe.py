"""The gateway's head times: robust to a slow spell, and measured even when the server runs all."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from conftest import Broker
from harness import (
    TOPIC,
    basicmotions_plan,
    bundle_tokenizer,
    random_window,
    start_coordinated,
    wait_for,
)

from edgetok.gateway.inference import CALIBRATION_MIN_RUNS, Inferencer
from edgetok.gateway.inference import Decision as InfDecision
from edgetok.gateway.timing import PROBE_SCALE_LIMIT, RUN_SAMPLES, ProbeCalibration, RunTimes
from edgetok.models.runtime import Runtime
from edgetok.replay import DEFAULT_CHANNELS, publish_plan

KEY = ("r0.00-s2", "head")


def test_a_short_slow_spell_does_not_move_the_head_estimate() -> None:
    """Three 50 ms runs among 2 ms ones (other processes starting on a shared core) leave the
    estimate at 2 ms; a mean seeded by the first of them said 50 ms for many runs."""
    t = RunTimes()
    for ms in (50.0, 48.0, 2.0, 55.0, 2.1, 1.9, 2.0, 2.2):
        t.add(KEY, ms)
    est = t.get(KEY)
    assert est is not None and est < 2.5


def test_a_lasting_change_is_followed_within_half_the_window() -> None:
    t = RunTimes()
    for _ in range(RUN_SAMPLES):
        t.add(KEY, 2.0)
    for _ in range(RUN_SAMPLES // 2 + 1):
        t.add(KEY, 10.0)
    assert t.get(KEY) == 10.0
    assert t.count(KEY) == RUN_SAMPLES


def test_telemetry_takes_each_run_once_as_the_median_of_its_interval() -> None:
    t = RunTimes()
    for ms in (2.0, 9.0, 3.0):
        t.add(KEY, ms)
    t.add(("r0.00-s2", "tail"), 1.0)  # tails are not the device's head speed
    assert t.take_fresh_heads() == {"r0.00-s2": 3.0}
    assert t.take_fresh_heads() == {}
    t.add(KEY, 4.0)
    assert t.take_fresh_heads() == {"r0.00-s2": 4.0}, "only the runs since the last report"
    assert t.heads() == {"r0.00-s2": 3.5}, "the status page keeps the recent median"


async def _replay_and_listen(port: int, gw: str, windows: int, speed: float, idle_s: float
                             ) -> tuple[list[dict[str, Any]], float]:
    """Telemetry of one gateway while `windows` windows are replayed and for `idle_s` after
    the last result; with the time (monotonic) that last result arrived."""
    plan = basicmotions_plan(limit=windows)
    reports: list[dict[str, Any]] = []
    results = 0
    last = float("inf")
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe(f"edgetok/{gw}/telemetry")
        await client.subscribe(f"edgetok/{gw}/results/#", qos=1)
        feed = asyncio.create_task(publish_plan(
            plan, host="127.0.0.1", port=port, topic=TOPIC, channels=DEFAULT_CHANNELS,
            chunk=10, speed=speed))
        try:
            async with asyncio.timeout(60):
                async for msg in client.messages:
                    if msg.topic.matches(f"edgetok/{gw}/telemetry"):
                        body = json.loads(bytes(msg.payload))  # type: ignore[arg-type]
                        body["t"] = time.monotonic()
                        reports.append(body)
                    else:
                        results += 1
                        if results == windows:
                            last = time.monotonic()
                    if time.monotonic() > last + idle_s:
                        break
        finally:
            await feed
    return reports, last


def test_a_gateway_on_server_only_still_reports_its_head_speed(
        tmp_path: Path, mosquitto: Broker, tiny_bundle: Path) -> None:
    """server-only runs no head here, so without probes the coordinator's picture of this
    device's speed freezes where it was when it moved away. A probe after a window the
    server answered keeps it fresh; an idle gateway runs none."""
    server, gw = start_coordinated(tmp_path, tiny_bundle, mosquitto.port,
                                   telemetry_interval_s=0.2, head_probe_interval_s=0.3)
    try:
        wait_for(lambda: gw.get("/v1/status")[1]["decision"]["split"] == 0, 30,
                 "a server-only decision")
        # One 10 s window every 0.5 s: a probe may follow each, the interval allowing.
        reports, last = asyncio.run(_replay_and_listen(mosquitto.port, "gw-test", 6, 20.0,
                                                       idle_s=1.5))
        rows = gw.get("/v1/results")[1]["results"]
        assert len(rows) == 6, "probes make no results"
        # The decision's fallback reaches the gateway, which shows what it keeps back.
        status = gw.get("/v1/status")[1]
        running, sent = status["decision"], status["control"]["decision"]
        assert running["fallback_margin"] == sent["fallback_margin"] is not None
        assert running["fallback_variant"] == sent["fallback_variant"]
        assert running["fallback_reserve_ms"] > 10.0  # FALLBACK_SLACK_S and a run
        # Its probes measured that fallback: the coordinator is told the run the gateway
        # sizes its reserve from, so both keep back the same time.
        measured = [r for r in reports if r.get("fallback_ms")]
        assert measured, f"no fallback run in {len(reports)} reports"
        assert {r["fallback_variant"] for r in measured} == {running["fallback_variant"]}
        assert running["fallback_reserve_ms"] == pytest.approx(
            measured[-1]["fallback_ms"] * running["fallback_margin"] + 10.0, abs=0.01)
        assert {r["where"] for r in rows} == {"server"}, "no head ran for a window"
        busy = [r["head_ms"] for r in reports if r["head_ms"] and r["t"] <= last + 0.3]
        assert busy, f"no head time in {len(reports)} reports: {gw.logtext()[-1500:]}"
        manifest = json.loads((tiny_bundle / "manifest.json").read_text())
        on_device = {v["id"] for v in manifest["variants"]
                     if v["split"] == manifest["num_layers"]}
        assert set(busy[-1]) <= on_device and all(ms > 0 for ms in busy[-1].values())
        idle = [r["head_ms"] for r in reports if r["t"] > last + 0.5]
        assert idle and not any(idle), f"an idle gateway probed: {idle}"
    finally:
        gw.stop()
        server.stop()


def test_a_gateway_on_its_device_calibrates_its_probes_and_reports_its_windows(
        tmp_path: Path, mosquitto: Broker, tiny_bundle: Path) -> None:
    """The real daemon: with windows on the device, a probe after one of them (one per five
    probe intervals) is timed beside their heads; it makes no result. The windows' own
    latency reaches the coordinator, which learns the device path's residual from it."""
    server, gw = start_coordinated(tmp_path, tiny_bundle, mosquitto.port, policy="device-only",
                                   telemetry_interval_s=0.2, head_probe_interval_s=0.1)
    try:
        L = json.loads((tiny_bundle / "manifest.json").read_text())["num_layers"]
        wait_for(lambda: gw.get("/v1/status")[1]["decision"]["split"] == L, 30,
                 "an on-device decision")
        reports, _ = asyncio.run(_replay_and_listen(mosquitto.port, "gw-test", 10, 20.0,
                                                    idle_s=0.5))
        status = gw.get("/v1/status")[1]
        rows = gw.get("/v1/results")[1]["results"]
        assert len(rows) == 10 and {r["where"] for r in rows} == {"device"}
        probe = status["control"]["head_probe"]
        # 10 windows over ~5 s, a calibration due every 0.5 s once 4 heads have run.
        assert 1 <= probe["calibrations"] <= 10, probe
        # Each report carries its own windows' latency under the decision's variant, and
        # the coordinator learns the device path's residual from them.
        variant = status["control"]["decision"]["variant"]
        measured = [r["window_ms"] for r in reports if r["window_ms"]]
        assert measured and all(set(m) == {variant} for m in measured), measured
        # Its fallback is the variant its windows run: their runs are the fallback's, and
        # are reported so a server path is planned with them and not with an old figure.
        assert status["control"]["decision"]["fallback_variant"] == variant
        runs = [r["fallback_ms"] for r in reports if r.get("fallback_variant") == variant]
        assert runs and all(ms > 0 for ms in runs), reports[-1]
        view = server.get("/v1/status")[1]["coordinator"]["gateways"]["gw-test"]
        residual = view["residual_ms"]
        assert residual["device"] != 0.0 and residual["transmit"] == residual["device"], \
            (residual, server.logtext()[-1500:])
    finally:
        gw.stop()
        server.stop()


def test_unreported_run_times_keep_no_backlog_for_telemetry() -> None:
    """Fallback runs at a raised clock are never reported; a long-lived gateway must not
    keep every one of them waiting for a report that never takes them."""
    boosted = RunTimes(reported=False)
    for _ in range(100):
        boosted.add(KEY, 5.0)
    assert boosted.get(KEY) == 5.0 and boosted.take_fresh_heads() == {}


def test_a_calibration_learns_the_probes_bias_in_log_and_bounds_each_sample() -> None:
    cal = ProbeCalibration()
    assert cal.scale == 1.0, "no calibration: probes are taken as they read"
    cal.update(12.0, 10.0)
    assert cal.scale == pytest.approx(1.2), "the first sample is taken whole"
    for _ in range(30):
        cal.update(8.0, 10.0)
    assert cal.scale == pytest.approx(0.8, rel=1e-3)
    cal.update(0.0, 10.0)  # a failed timing is no sample
    assert cal.samples == 31
    wild = ProbeCalibration()
    wild.update(100.0, 1.0)
    assert wild.scale == pytest.approx(PROBE_SCALE_LIMIT), "one sample counts for 2x at most"
    wild.update(10.0, 10.0)
    assert wild.scale == pytest.approx(PROBE_SCALE_LIMIT ** 0.7), "and is forgotten as fast"


def test_a_calibration_survives_a_restart_on_the_same_bundle_only(tmp_path: Path) -> None:
    """A restarted gateway that the coordinator keeps on the server runs no window heads to
    calibrate against: the calibration it learned before comes back. Another bundle, or a
    file that is torn or wild, is no calibration (a wild one is held to the limit)."""
    path = tmp_path / "probe-calibration.json"
    cal = ProbeCalibration(path, "bundle-a")
    cal.update(7.0, 4.0)
    again = ProbeCalibration(path, "bundle-a")
    assert again.samples == 1 and again.scale == pytest.approx(7.0 / 4.0)
    again.update(7.0, 4.0)
    assert ProbeCalibration(path, "bundle-a").samples == 2
    assert ProbeCalibration(path, "bundle-b").samples == 0, "learned on another model"
    path.write_text('{"bundle": "bundle-a", "log_ratio": 0.5, "sam')
    assert ProbeCalibration(path, "bundle-a").scale == 1.0
    path.write_text(json.dumps({"bundle": "bundle-a", "log_ratio": 9.0, "samples": 3}))
    assert ProbeCalibration(path, "bundle-a").scale == pytest.approx(PROBE_SCALE_LIMIT)
    assert not list(tmp_path.glob("*.tmp")), "written whole, through a rename"
    blocked = tmp_path / "blocked"
    blocked.mkdir()  # a directory where the file should be: saving fails, calibrating not
    cal = ProbeCalibration(blocked, "bundle-a")
    cal.update(8.0, 4.0)
    assert cal.samples == 1 and cal.scale == pytest.approx(2.0)
    assert not (tmp_path / "blocked.tmp").exists()


@pytest.mark.asyncio
async def test_probes_are_calibrated_against_window_heads_only_and_scaled_on_the_server(
        tiny_bundle: Path, tmp_path: Path) -> None:
    """Real ORT sessions. On the server, probes stand in for the device's heads. Back on the
    device, a calibrating probe waits for enough windows' own heads (the probes recorded
    before count for nothing), is compared with their median, and is no window head
    itself. On the server again, a probe is reported as the calibration scales it."""
    runtime = Runtime(tiny_bundle, threads=1)
    m = runtime.manifest
    device = m.device_variant(0.0)
    server = next(v for v in m.variants if v.split == 0 and v.pruning_ratio == 0.0)
    tok = bundle_tokenizer(m)

    async def nowhere(frame: bytes, wait_s: float) -> bool:
        return False  # no broker: a server window falls back to the device

    kept = tmp_path / "probe-calibration.json"
    inf = Inferencer("gw1", runtime, {"imu": tok}, nowhere, InfDecision(server.id, "fp32"),
                     kept)
    assert await inf.probe_head(0.1) is None, "nothing to run before the first window"
    heads = []
    for seq in range(2):  # the first run of a session is never timed
        r = await inf.infer(random_window(m, seq), 5.0)
        assert r.where == "device-fallback" and r.variant.id == device.id
    heads.append(r.latency_ms.head)
    for _ in range(2 * CALIBRATION_MIN_RUNS):
        inf.last_head_mono = -float("inf")  # due: as if a probe interval had passed
        assert await inf.probe_head(0.1) is not None
    assert inf.run_ms.count((device.id, "head")) >= CALIBRATION_MIN_RUNS
    inf.decision = InfDecision(device.id, "fp32")
    cal = inf.probe_calibration
    for seq in range(2, 2 + CALIBRATION_MIN_RUNS - 2):
        heads.append((await inf.infer(random_window(m, seq), 5.0)).latency_ms.head)
        assert await inf.probe_head(0.0) is None
    assert cal.samples == 0, "probes are not window heads to calibrate against"
    heads.append((await inf.infer(random_window(m, 99), 5.0)).latency_ms.head)
    inf.take_fresh_head_ms()
    assert await inf.probe_head(0.0) is None, "a calibration reports nothing"
    assert cal.samples == 1 and inf.last_probe_ms is not None
    # (Results round their times to 1 µs.)
    assert cal.scale == pytest.approx(statistics.median(heads) / inf.last_probe_ms,
                                      abs=0.0011 / inf.last_probe_ms)
    assert inf.take_fresh_head_ms() == {}, "the calibrating probe is no window head"
    assert await inf.probe_head(0.1) is None and cal.samples == 1, \
        "not due again within CALIBRATE_EVERY intervals"
    # The server runs everything again: a probe stands in for the device's heads.
    inf.decision = InfDecision(server.id, "fp32")
    inf.last_head_mono = -float("inf")
    ms = await inf.probe_head(0.1)
    assert ms is not None and ms == pytest.approx(cal.scale * inf.last_probe_ms)
    assert inf.take_fresh_head_ms() == {device.id: pytest.approx(ms)}
    assert await inf.probe_head(10.0) is None, "at most one probe per interval"
    inf.close()
    # Restarted on the same bundle, the gateway scales its first probe as it did before.
    back = Inferencer("gw1", runtime, {"imu": tok}, nowhere, InfDecision(server.id, "fp32"),
                      kept)
    assert back.probe_calibration.scale == pytest.approx(cal.scale)
    back.close()
