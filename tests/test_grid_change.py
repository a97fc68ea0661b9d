"""A stream's window grid (rate, hop, length) changed on an existing state_dir: its windows
start afresh instead of every new reading being dead-lettered as late."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from edgetok.gateway.config import GatewayConfig, StreamConfig
from edgetok.gateway.daemon import Gateway
from edgetok.gateway.models import Latency, Result, VariantRef
from edgetok.gateway.store import Store
from edgetok.gateway.windows import WindowBuffer
from edgetok.replay import DEFAULT_CHANNELS
from edgetok.settings import parse_config

OLD = StreamConfig(name="imu", topics=["t"], channels=["x"], rate_hz=50.0, window=100)
SLOWER = OLD.model_copy(update={"rate_hz": 10.0})


def k_now(cfg: StreamConfig, ts: float) -> int:
    return round(ts * cfg.rate_hz) // cfg.hop_samples


def result(stream: str, k: int, end_ts: float) -> Result:
    return Result(gateway="gw", stream=stream, window=k, start_ts=end_ts - 2, end_ts=end_ts,
                  label="x", scores={"x": 1.0}, where="device",
                  variant=VariantRef(id="r0.00-s2", pruning_ratio=0.0, split=2,
                                     precision="fp32"),
                  latency_ms=Latency(queue=0, head=0, uplink=0, tail=0, total=0),
                  created_ts=0.0)


def test_a_changed_grid_starts_afresh_and_keeps_the_old_results(tmp_path: Path) -> None:
    now = time.time()
    s = Store(tmp_path / "db.sqlite")
    assert s.use_grid("imu", OLD.grid) is None
    with s.tx():
        old_ids = [s.add_result(result("imu", k_now(OLD, now) - i, now)) for i in (1, 0)]
        s.close_window("imu", k_now(OLD, now) + 1)  # cut off by the stop below
    s.close()

    s = Store(tmp_path / "db.sqlite")  # restart with the rate lowered
    assert s.use_grid("imu", SLOWER.grid) == OLD.grid
    marks = s.window_marks("imu")
    assert marks == (None, set())
    buf = WindowBuffer(SLOWER, *marks)
    assert buf.accepts(now) and buf.add(now, {"x": 1.0})  # not late
    assert [r.id for r in s.results(stream="imu")] == old_ids  # old results stay readable
    # A new window whose number an old result already has is a new window, not a duplicate.
    k = k_now(OLD, now)
    assert not s.has_result("imu", k)
    with s.tx():
        new_id = s.add_result(result("imu", k, now + 5))
    assert new_id is not None and new_id > max(i for i in old_ids if i is not None)
    assert s.window_marks("imu") == (k, set())
    s.close()

    s = Store(tmp_path / "db.sqlite")  # and back: the old grid's marks (and dedup) return
    assert s.use_grid("imu", OLD.grid) == SLOWER.grid
    assert s.window_marks("imu") == (k_now(OLD, now), set())
    assert s.has_result("imu", k_now(OLD, now) - 1)
    assert s.use_grid("imu", OLD.grid) is None  # the same grid again: nothing changes


def test_results_of_an_older_database_join_the_first_grid(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE results (id INTEGER PRIMARY KEY AUTOINCREMENT, stream TEXT NOT "
               "NULL, window INTEGER NOT NULL, end_ts REAL NOT NULL, body TEXT NOT NULL, "
               "published INTEGER NOT NULL DEFAULT 0, UNIQUE (stream, window))")
    for k in (5, 6, 7):
        db.execute("INSERT INTO results (stream, window, end_ts, body, published) VALUES "
                   "('imu', ?, ?, ?, 1)", (k, k * 10.0, result("imu", k, k * 10.0)
                                            .model_dump_json()))
    db.execute("DELETE FROM results WHERE window = 7")  # its id must not come back
    db.commit()
    db.close()
    s = Store(path)
    assert s.use_grid("imu", OLD.grid) is None
    assert s.window_marks("imu") == (6, set())
    assert s.has_result("imu", 6)
    with s.tx():
        assert s.add_result(result("imu", 6, 60.0)) is None  # still a duplicate
        new_id = s.add_result(result("imu", 8, 80.0))
    assert new_id is not None and new_id > 3
    assert s.count_unpublished() == 1


def gateway_config(tmp_path: Path, bundle: Path, **stream: Any) -> GatewayConfig:
    raw = {"id": "gw-g", "state_dir": str(tmp_path / "state"), "bundle": {"path": str(bundle)},
           "decision": {"variant": "r0.00-s2"},
           "streams": [{"name": "imu", "topics": ["sensors/imu"], "channels": DEFAULT_CHANNELS,
                        "rate_hz": 50.0, "window": 100, **stream}]}
    return parse_config(raw, GatewayConfig)


@pytest.mark.parametrize("change", [{"rate_hz": 10.0}, {"window": 200},
                                    {"window": 200, "hop": 150}])
def test_the_gateway_takes_new_readings_after_its_grid_changed(
        tmp_path: Path, tiny_bundle: Path, change: dict[str, Any],
        caplog: pytest.LogCaptureFixture) -> None:
    now = time.time()
    gw = Gateway(gateway_config(tmp_path, tiny_bundle))
    with gw.store.tx():
        gw.store.add_result(result("imu", k_now(gw.cfg.streams[0], now), now))
    gw.inferencer.close()
    gw.store.close()
    gw = Gateway(gateway_config(tmp_path, tiny_bundle))  # the same grid: that window is done
    assert not gw.buffers["imu"].accepts(now)
    gw.inferencer.close()
    gw.store.close()

    gw = Gateway(gateway_config(tmp_path, tiny_bundle, **change))
    try:
        assert gw.buffers["imu"].accepts(now) and gw.buffers["imu"].accepts(now + 60)
        assert "window grid changed" in caplog.text
        assert [r.window for r in gw.store.results()] == [k_now(OLD, now)]
    finally:
        gw.inferencer.close()
        gw.store.close()
