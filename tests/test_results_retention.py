"""The results table stays bounded and its per-stream reads stay cheap: retention deletes old
published results (never unpublished ones, nor the results that anchor a stream), counts
follow, and /v1/results still pages over what is left."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import free_port

from edgetok.gateway.config import GatewayConfig
from edgetok.gateway.daemon import Gateway
from edgetok.gateway.http import serve
from edgetok.gateway.models import Latency, Result, VariantRef
from edgetok.gateway.store import Store
from edgetok.replay import DEFAULT_CHANNELS
from edgetok.settings import parse_config


def result(stream: str, k: int, end_ts: float | None = None) -> Result:
    end = k * 10.0 if end_ts is None else end_ts
    return Result(gateway="gw", stream=stream, window=k, start_ts=end - 10, end_ts=end,
                  label="x", scores={"x": 1.0}, where="device",
                  variant=VariantRef(id="r0.00-s2", pruning_ratio=0.0, split=2,
                                     precision="fp32"),
                  latency_ms=Latency(queue=0, head=0, uplink=0, tail=0, total=0),
                  created_ts=0.0)


def add(s: Store, stream: str, k: int, published: bool = True) -> int:
    with s.tx():
        rid = s.add_result(result(stream, k))
        assert rid is not None
        if published:
            s.mark_published(rid)
    return rid


def stored(s: Store) -> dict[int, tuple[str, int]]:
    return {i: (st, k) for i, st, k in s.db.execute("SELECT id, stream, window FROM results")}


def test_pruning_keeps_unpublished_results_and_each_streams_anchors(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    s.use_grid("imu", "g1")
    s.use_grid("env", "g1")
    waiting = add(s, "imu", 0, published=False)  # the broker has been away since
    imu = [add(s, "imu", k) for k in range(1, 9)]
    highest = add(s, "imu", 10)  # the highest window: where windows resume after a restart
    newest = add(s, "imu", 9)  # finished last (windows finish out of order)
    env = [add(s, "env", k) for k in (1, 2, 3)]
    with s.tx():
        s.mark_refused(env[0], "[code:135] Not authorized")  # parked: settled too
    assert s.result_counts() == {"imu": (11, 100.0), "env": (3, 30.0)}

    assert s.prune_results(None, keep=1000, batch=5) == 0  # under the cap, no age limit
    assert s.prune_results(45.0, keep=1000, batch=50) == 6  # ended before 45 s
    assert {i for i, (_, k) in stored(s).items() if k * 10 < 45} == {waiting, env[-1]}
    while s.prune_results(None, keep=0, batch=3):
        pass
    assert stored(s) == {waiting: ("imu", 0), highest: ("imu", 10), newest: ("imu", 9),
                         env[-1]: ("env", 3)}
    assert set(imu).isdisjoint(stored(s))
    assert s.result_counts() == {"imu": (3, 100.0), "env": (1, 30.0)}
    assert [(r.stream, r.window) for r in s.latest()] == [("env", 3), ("imu", 9)]
    assert s.window_marks("imu") == (10, set())
    assert s.count_unpublished() == 1
    s.close()
    s = Store(tmp_path / "db.sqlite")  # the counts are kept in the database, not recounted
    assert s.result_counts() == {"imu": (3, 100.0), "env": (1, 30.0)}


def test_the_per_stream_reads_use_indexes_not_a_scan(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    s.use_grid("imu", "g1")
    for k in range(50):
        add(s, "imu", k, published=k % 2 == 0)
    s.add_deadletter("t", "bad_json", "x", b"x")
    sql: list[str] = []
    s.db.set_trace_callback(sql.append)
    s.latest()
    s.result_counts()
    s.unpublished()
    s.count_unpublished()
    s.unpublished_deadletters()
    s.results(stream="imu", since_id=10)
    s.prune_results(None, keep=10, batch=5)
    s.db.set_trace_callback(None)
    scans = [(q, d) for q in sql if q.lstrip().upper().startswith(("SELECT", "DELETE"))
             for (*_, d) in s.db.execute("EXPLAIN QUERY PLAN " + q)
             if d.startswith(("SCAN results", "SCAN deadletters"))]
    assert len(sql) >= 8 and scans == []


def config(tmp_path: Path, bundle: Path, **journal: Any) -> GatewayConfig:
    streams = [{"name": name, "topics": [f"sensors/{name}"], "channels": DEFAULT_CHANNELS,
                "rate_hz": 10.0, "window": 100} for name in ("env", "imu")]
    raw = {"id": "gw-r", "state_dir": str(tmp_path / "state"), "bundle": {"path": str(bundle)},
           "decision": {"variant": "r0.00-s2"}, "streams": streams, "journal": journal,
           "http": {"host": "127.0.0.1", "port": free_port()}}
    return parse_config(raw, GatewayConfig)


@pytest.mark.asyncio
async def test_results_page_correctly_after_retention(tmp_path: Path, tiny_bundle: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from edgetok.gateway import daemon

    monkeypatch.setattr(daemon, "RETENTION_BATCH", 4)  # several steps
    gw = Gateway(config(tmp_path, tiny_bundle, max_results=12, keep_results_days=1))
    now = time.time()
    with gw.store.tx():
        for k in range(40):  # imu and env alternate; the first 5 ended two days ago
            rid = gw.store.add_result(result(("imu", "env")[k % 2], 1000 + k,
                                             now - 2 * 86400 if k < 5 else now))
            assert rid is not None
            if k != 3:  # one old result is still to be published
                gw.store.mark_published(rid)
    while gw._prune_results():
        pass
    left = sorted(stored(gw.store))
    assert left == [4, *range(30, 41)]  # the newest up to the cap, and the unpublished one
    assert gw.counters["results_pruned"] == 28
    runner = await serve(gw)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{gw.http_port}") as http:
            async def page(query: str) -> list[int]:
                ids: list[int] = []
                cursor: int | None = 0
                while cursor is not None:
                    async with http.get(f"/v1/results?limit=3&since_id={cursor}{query}") as r:
                        body = await r.json()
                    assert r.status == 200
                    ids += [row["id"] for row in body["results"]]
                    cursor = body["next_since_id"]
                return ids

            assert await page("") == left
            imu = await page("&stream=imu")
            assert imu == [i for i in left if stored(gw.store)[i][0] == "imu"]
            async with http.get("/v1/streams") as r:
                counts = {s["name"]: s["results"] for s in (await r.json())["streams"]}
            assert counts == {"imu": len(imu), "env": len(left) - len(imu)}
            async with http.get("/v1/results/latest") as r:
                assert [x["id"] for x in (await r.json())["results"]] == [40, 39]
    finally:
        await runner.cleanup()
        gw.inferencer.close()
        gw.store.close()
