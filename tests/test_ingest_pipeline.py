"""The gateway's ingest, journal, windows and recovery in-process: a real Gateway object on a
real SQLite journal and real ONNX Runtime, with messages fed straight to its inbox."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from harness import until

from edgetok.gateway import ingest
from edgetok.gateway.config import GatewayConfig
from edgetok.gateway.daemon import Gateway
from edgetok.gateway.models import Latency, Result, VariantRef
from edgetok.mqttlink import InMessage
from edgetok.replay import DEFAULT_CHANNELS
from edgetok.settings import parse_config

TOPIC = "sensors/imu"
RATE = 10.0
WINDOW = 100
# A window number on the epoch grid, some minutes ago: recent enough for the stale check.
K0 = int(time.time() * RATE) // WINDOW - 50


def config(tmp_path: Path, bundle: Path, **extra: Any) -> GatewayConfig:
    """One IMU stream; the on-device variant, so no server is involved."""
    stream = {"name": "imu", "topics": [TOPIC], "channels": DEFAULT_CHANNELS, "rate_hz": RATE,
              "window": WINDOW, "deadline_ms": 1000.0, "idle_close_s": 0.2,
              **extra.pop("stream", {})}
    raw = {"id": "gw-t", "state_dir": str(tmp_path / "state"),
           "bundle": {"path": str(bundle)}, "decision": {"variant": "r0.00-s2"},
           "streams": [stream], **extra}
    return parse_config(raw, GatewayConfig)


def chunk(k: int, i: int, n: int = 10, scale: float = 1.0) -> bytes:
    """Readings i..i+n-1 of window k, as one chunked message."""
    ts = [round((k * WINDOW + i + m) / RATE, 6) for m in range(n)]
    doc: dict[str, Any] = {"ts": ts}
    for c, name in enumerate(DEFAULT_CHANNELS):
        doc[name] = [scale * float(np.sin(0.1 * (i + m) + c)) for m in range(n)]
    return json.dumps(doc).encode()


def window_messages(ks: range) -> list[bytes]:
    """Every reading of windows ks, 10 per message, plus the first of the next window."""
    out = [chunk(k, i) for k in ks for i in range(0, WINDOW, 10)]
    return [*out, chunk(ks[-1] + 1, 0, n=3)]  # passes the watermark past the last window


def msg(payload: bytes, mid: int, topic: str = TOPIC) -> InMessage:
    return InMessage(topic=topic, payload=payload, qos=1, retain=False, mid=mid, generation=0)


def fake_result(stream: str, k: int) -> Result:
    """A stored result as an earlier run would have left it."""
    return Result(gateway="gw-t", stream=stream, window=k, start_ts=k * 10.0,
                  end_ts=k * 10.0 + 10, label="x", scores={"x": 1.0}, where="device",
                  variant=VariantRef(id="r0.00-s2", pruning_ratio=0.0, split=2,
                                     precision="fp32"),
                  latency_ms=Latency(queue=0, head=0, uplink=0, tail=0, total=0),
                  created_ts=0.0)


@asynccontextmanager
async def running(gw: Gateway, connected: bool = True) -> AsyncIterator[Gateway]:
    """Ingest, closer and recovery running as in the daemon, without a broker."""
    if connected:
        gw.session.connected.set()  # publishing then fails fast: there is no client
    async with asyncio.TaskGroup() as tg:
        gw.tg = tg
        tasks = [tg.create_task(gw.ingest.run()), tg.create_task(gw._closer())]
        gw.recover()
        try:
            yield gw
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.wait_for(gw.no_inflight.wait(), 10)
    gw.store.close()


def result_windows(gw: Gateway) -> list[int]:
    """Windows with a stored result, read as another process would (after close, too)."""
    db = sqlite3.connect(gw.store.path)
    try:
        return [k for (k,) in db.execute("SELECT window FROM results ORDER BY window")]
    finally:
        db.close()


@pytest.mark.asyncio
async def test_windows_cut_off_out_of_order_are_rerun(tmp_path: Path, tiny_bundle: Path) -> None:
    # The state a crash leaves when window K0+1 was still in flight but K0+2 had finished:
    # the highest finished window must not hide the unfinished one below it.
    cfg = config(tmp_path, tiny_bundle)
    gw = Gateway(cfg)
    with gw.store.tx():
        for payload in window_messages(range(K0 + 1, K0 + 3)):
            doc = json.loads(payload)
            for i, t in enumerate(doc["ts"]):
                gw.store.journal([("imu", t, {c: doc[c][i] for c in DEFAULT_CHANNELS})])
        gw.store.add_result(fake_result("imu", K0))
        gw.store.add_result(fake_result("imu", K0 + 2))
        gw.store.close_window("imu", K0 + 1)
    gw.store.close()
    gw = Gateway(cfg)
    async with running(gw):
        await until(lambda: len(result_windows(gw)) == 3)
    assert result_windows(gw) == [K0, K0 + 1, K0 + 2]
    assert gw.counters["windows_rerun"] == 1
    db = sqlite3.connect(cfg.state_dir / "edgetok.db")
    assert db.execute("SELECT count(*) FROM windows").fetchone() == (0,)


@pytest.mark.asyncio
async def test_ack_only_after_commit_and_redelivery_is_not_a_second_result(
        tmp_path: Path, tiny_bundle: Path) -> None:
    # The 3-reading tail window must close by idling here: no coverage floor.
    cfg = config(tmp_path, tiny_bundle, stream={"min_coverage": 0.0})
    payloads = window_messages(range(K0, K0 + 2))
    gw = Gateway(cfg)
    acked: list[int] = []
    reader = sqlite3.connect(cfg.state_dir / "edgetok.db")

    def ack(m: InMessage) -> None:
        # Another connection sees the readings: the commit happened before this PUBACK.
        first = json.loads(m.payload)["ts"][0]
        assert reader.execute("SELECT count(*) FROM readings WHERE ts = ?",
                              (first,)).fetchone() == (1,)
        acked.append(m.mid)

    gw.session.ack = ack
    async with running(gw):
        for mid, p in enumerate(payloads):
            await gw.inbox.put(msg(p, mid))
        await until(lambda: len(result_windows(gw)) == 2)
    assert sorted(acked) == list(range(len(payloads)))
    # A restart, and the broker redelivers what it thinks was not acknowledged: all of it.
    gw = Gateway(cfg)
    async with running(gw):
        for mid, p in enumerate(payloads):
            await gw.inbox.put(msg(p, mid))
        await until(lambda: gw.counters["messages"] == len(payloads))
        await asyncio.sleep(0.5)  # longer than idle_close_s: any window would close by now
    assert gw.counters["duplicate_messages"] == len(payloads)
    # The window still open at the restart was rebuilt from the journal and closed (idle);
    # the two finished ones were neither re-run nor doubled.
    assert result_windows(gw) == [K0, K0 + 1, K0 + 2]
    assert gw.counters["windows"] == 1
    assert gw.counters["deadletters"] == 0


@pytest.mark.asyncio
async def test_full_journal_stops_acking_and_drops_nothing(tmp_path: Path,
                                                           tiny_bundle: Path) -> None:
    limit = 4 * WINDOW
    cfg = config(tmp_path, tiny_bundle, journal={"max_rows": limit}, max_inflight_windows=1)
    gw = Gateway(cfg)
    payloads = window_messages(range(K0, K0 + 12))
    peak = 0
    unacked_peak = 0
    acked: set[int] = set()

    def ack(m: InMessage) -> None:
        acked.add(m.mid)

    gw.session.ack = ack
    infer = gw.inferencer.infer

    async def slow_infer(win: Any, deadline_s: float) -> Result:
        await asyncio.sleep(0.05)  # a device slower than the burst: readings pile up
        return await infer(win, deadline_s)

    gw.inferencer.infer = slow_infer
    async with running(gw):
        for mid, p in enumerate(payloads):  # a burst, as a broker sends after an outage
            gw.inbox.put_nowait(msg(p, mid))

        def watch() -> bool:
            nonlocal peak, unacked_peak
            peak = max(peak, gw.store.journal_rows)
            unacked_peak = max(unacked_peak, len(payloads) - len(acked))
            return len(result_windows(gw)) == 12
        await until(watch)
    assert gw.counters["backpressure_events"] >= 1
    # The bound plus at most one message's readings (10), seen from outside and inside.
    assert limit <= peak <= gw.counters["journal_peak_rows"] <= limit + 10
    assert unacked_peak > len(payloads) // 2  # the rest waited, unacknowledged
    assert result_windows(gw) == list(range(K0, K0 + 12))
    assert acked == set(range(len(payloads)))
    assert gw.counters["deadletters"] == 0


@pytest.mark.asyncio
async def test_silence_while_disconnected_does_not_close_windows(tmp_path: Path,
                                                                tiny_bundle: Path) -> None:
    gw = Gateway(config(tmp_path, tiny_bundle))
    async with running(gw, connected=False):
        for mid, p in enumerate([chunk(K0, i) for i in range(0, 50, 10)]):
            await gw.inbox.put(msg(p, mid))
        await until(lambda: gw.counters["readings"] == 50)
        await asyncio.sleep(1.0)  # five times idle_close_s, but the broker is gone
        assert gw.buffers["imu"].open == {K0}
        gw.session.connected.set()
        await until(lambda: result_windows(gw) == [K0])  # now silence is idleness


@pytest.mark.asyncio
async def test_late_and_unknown_input_is_dead_lettered_with_its_head(
        tmp_path: Path, tiny_bundle: Path) -> None:
    cfg = config(tmp_path, tiny_bundle, unclaimed_topics=["sensors/#"])
    gw = Gateway(cfg)
    async with running(gw):
        for mid, p in enumerate(window_messages(range(K0, K0 + 1))):
            await gw.inbox.put(msg(p, mid))
        await until(lambda: result_windows(gw) == [K0])
        late = chunk(K0, 20, scale=2.0)  # new values for a closed window
        # Through the MQTT entry point: our own output under a broad filter is no input.
        await gw._on_message(msg(late, 100))
        await gw._on_message(msg(b"21.5", 101, topic="sensors/temperature"))
        await gw._on_message(msg(b"ignored", 102, topic="edgetok/gw-t/results/imu"))
        await until(lambda: gw.counters["messages"] == 13)
    rows = list(sqlite3.connect(cfg.state_dir / "edgetok.db").execute(
        "SELECT topic, reason, payload_head, payload_bytes FROM deadletters ORDER BY id"))
    assert rows == [(TOPIC, "late", late[:128], len(late)),
                    ("sensors/temperature", "unknown_topic", b"21.5", 4)]
    assert gw.counters["late_readings"] == 10


@pytest.mark.asyncio
async def test_a_burst_with_repeats_is_journaled_once_and_acknowledged_whole(
        tmp_path: Path, tiny_bundle: Path) -> None:
    # One burst, so one batch: a message and its redelivery side by side, and garbage.
    cfg = config(tmp_path, tiny_bundle)
    gw = Gateway(cfg)
    acked: list[int] = []
    gw.session.ack = lambda m: acked.append(m.mid)
    first, second = chunk(K0, 0), chunk(K0, 10)
    burst = [first, second, first, b"{oops", second, chunk(K0, 20)]
    async with running(gw):
        for mid, p in enumerate(burst):
            gw.inbox.put_nowait(msg(p, mid))
        await until(lambda: gw.counters["messages"] == len(burst))
    assert sorted(acked) == list(range(len(burst)))
    assert gw.counters["duplicate_messages"] == 2 and gw.counters["readings"] == 30
    db = sqlite3.connect(cfg.state_dir / "edgetok.db")
    assert db.execute("SELECT count(*) FROM readings").fetchone() == (30,)
    assert db.execute("SELECT reason FROM deadletters").fetchall() == [("bad_json",)]


@pytest.mark.asyncio
async def test_a_trickle_is_journaled_at_once_and_only_a_burst_lingers(
        tmp_path: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A linger far longer than the test may take: a lone message that waited for company
    # would not be acknowledged in time.
    monkeypatch.setattr(ingest, "INGEST_LINGER_S", 60.0)
    gw = Gateway(config(tmp_path, tiny_bundle))
    acked: list[int] = []
    gw.session.ack = lambda m: acked.append(m.mid)
    async with running(gw):
        await gw.inbox.put(msg(chunk(K0, 0), 0))
        await until(lambda: acked == [0])
        assert gw.ingest.last_batch == 1
        await asyncio.sleep(0.05)
        await gw.inbox.put(msg(chunk(K0, 10), 1))
        await until(lambda: acked == [0, 1])
        for mid in range(2, 6):  # queued together: one batch, and a burst from now on
            gw.inbox.put_nowait(msg(chunk(K0, 10 * mid), mid))
        await until(lambda: len(acked) == 6)
        assert gw.ingest.last_batch == 4
    assert gw.counters["readings"] == 60


@pytest.mark.asyncio
async def test_telemetry_reports_frame_overhead_only_for_fresh_frames_on_a_sensed_link(
        tmp_path: Path, tiny_bundle: Path) -> None:
    gw = Gateway(config(tmp_path, tiny_bundle))
    up, sensor = gw.inferencer.uplink, gw.control.sensor
    up.learn_overhead(0.050, 0.001, 8000.0, 8e6)  # the first reply, cold: not kept
    for x in (0.004, 0.030, 0.005):  # one throttling spike among them: the median ignores it
        up.learn_overhead(x + 0.001, 0.001, 8000.0, 8e6)
    for _ in range(2):  # frames that left 20 ms after their 1 ms hold: a 20 ms floor each
        up.learn_overhead(0.025, 0.001, 8000.0, 8e6, left_s=0.020, hold_s=0.001)
    # A reading as the link sensor keeps it (this host has no tbf link to sense).
    sensor._rate, sensor._at = 10e6, asyncio.get_running_loop().time()
    assert gw.control.telemetry().frame_overhead_ms is None  # no frame went out since
    up.bytes_sent += 1000
    t = gw.control.telemetry()
    assert t.link_bps == 10e6 and t.frame_overhead_ms == pytest.approx(4.0)
    assert t.frame_floor_ms == 0.0  # the median: three of five frames left on time
    up.bytes_sent += 1000
    sensor._rate = None  # measured against a rate no longer known: not reported
    assert gw.control.telemetry().frame_overhead_ms is None
    gw.store.close()


@pytest.mark.asyncio
async def test_telemetry_counts_the_replies_cut_off_since_the_last_report(
        tmp_path: Path, tiny_bundle: Path) -> None:
    """Windows the link guard kept off the server and replies that came after their cutoff
    but before their deadline both say the server answers later than the reserve lets it;
    each report carries the ones since the previous report."""
    gw = Gateway(config(tmp_path, tiny_bundle))
    up = gw.inferencer.uplink
    assert gw.control.telemetry().cut_off == 0
    up.guarded += 2
    up.replies_cut += 1
    assert gw.control.telemetry().cut_off == 3
    assert gw.control.telemetry().cut_off == 0, "counted once"
    up.replies_cut += 1
    assert gw.control.telemetry().cut_off == 1
    gw.store.close()


def test_share_weights_setting_reaches_the_runtime(tmp_path: Path, tiny_bundle: Path) -> None:
    """[bundle] share_weights = false: every session loads its own copy (Python API)."""
    shared = Gateway(config(tmp_path / "a", tiny_bundle))
    raw = config(tmp_path / "b", tiny_bundle).model_dump(mode="json")
    raw["bundle"]["share_weights"] = False
    alone = Gateway(parse_config(raw, GatewayConfig))
    try:
        assert shared.runtime.share_weights and shared.runtime.backend == "capi"
        assert not alone.runtime.share_weights and alone.runtime.backend == "python"
    finally:
        shared.store.close()
        alone.store.close()
