"""The results outbox against a broker that refuses some topics: a refused row is parked and
the rest go on; a lost connection still stops the publisher, and nothing is lost."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from conftest import Broker, free_port
from harness import Collector, until

from edgetok.gateway.config import GatewayConfig
from edgetok.gateway.daemon import Gateway
from edgetok.gateway.http import status_doc
from edgetok.gateway.models import Latency, Result, VariantRef
from edgetok.gateway.store import REFUSED
from edgetok.replay import DEFAULT_CHANNELS
from edgetok.settings import parse_config

GW = "gw-acl"
RESULTS = f"edgetok/{GW}/results/"
NOT_AUTHORIZED = "[code:135] Not authorized"


def config(tmp_path: Path, bundle: Path, port: int) -> GatewayConfig:
    """Two streams; the broker will refuse the results of `env` and every dead letter."""
    streams = [{"name": name, "topics": [f"sensors/{name}"], "channels": DEFAULT_CHANNELS,
                "rate_hz": 10.0, "window": 100} for name in ("env", "imu")]
    raw = {"id": GW, "state_dir": str(tmp_path / "state"), "bundle": {"path": str(bundle)},
           "decision": {"variant": "r0.00-s2"}, "streams": streams,
           "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_min_s": 0.05,
                    "reconnect_max_s": 0.2}}
    return parse_config(raw, GatewayConfig)


def result(stream: str, k: int) -> Result:
    return Result(gateway=GW, stream=stream, window=k, start_ts=k * 10.0, end_ts=k * 10.0 + 10,
                  label="x", scores={"x": 1.0}, where="device",
                  variant=VariantRef(id="r0.00-s2", pruning_ratio=0.0, split=2,
                                     precision="fp32"),
                  latency_ms=Latency(queue=0, head=0, uplink=0, tail=0, total=0),
                  created_ts=time.time())


def published(gw: Gateway, table: str) -> dict[int, tuple[int, str | None]]:
    return {i: (p, r) for i, p, r in gw.store.db.execute(
        f"SELECT id, published, refused FROM {table} ORDER BY id")}


@pytest.mark.asyncio
async def test_a_refused_row_is_parked_and_the_rest_still_go_out(
        tmp_path: Path, tiny_bundle: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite #\ntopic deny edgetok/{GW}/deadletter\n"
                   f"topic deny {RESULTS}env\n")
    broker = Broker(free_port(), tmp_path / "broker", extra_conf=f"acl_file {acl}\n")
    broker.start()
    gw = Gateway(config(tmp_path, tiny_bundle, broker.port))
    collector = Collector(broker.port, [f"{RESULTS}#"], client_id="acl-collector").start()
    runner = asyncio.create_task(gw.session.run())
    try:
        with gw.store.tx():
            # Oldest first: the refused rows lead each lane, as they would block it.
            gw.store.add_deadletter("sensors/imu", "bad_json", "x", b"not json")
            env = gw.store.add_result(result("env", 1))
            imu = [gw.store.add_result(result("imu", k)) for k in (1, 2)]
            gw.store.add_deadletter("sensors/imu", "bad_json", "y", b"nor this")
        await until(gw.session.connected.is_set)
        assert await gw._publish_stored() is False  # one pass took everything
        await until(lambda: len(collector.on(RESULTS)) == 2)
        assert [json.loads(b)["window"] for b in collector.on(RESULTS)] == [1, 2]
        assert published(gw, "results") == {env: (REFUSED, NOT_AUTHORIZED),
                                            imu[0]: (1, None), imu[1]: (1, None)}
        assert set(published(gw, "deadletters").values()) == {(REFUSED, NOT_AUTHORIZED)}
        assert gw.store.count_unpublished() == 0 and gw.store.unpublished_deadletters() == []
        counters = status_doc(gw).counters
        assert (counters["results_refused"], counters["deadletters_refused"]) == (1, 2)
        sample = gw.metrics.registry.get_sample_value
        assert sample("edgetok_publish_refused_total",
                      {"kind": "deadletter", "reason": NOT_AUTHORIZED}) == 2

        # A lost connection is not a refusal: the row waits, unmarked, and goes out later.
        broker.stop()
        with gw.store.tx():
            late = gw.store.add_result(result("imu", 3))
        assert await gw._publish_stored() is False
        assert published(gw, "results")[late] == (0, None)
        broker.start()
        await until(lambda: gw.session.connects == 2 and gw.session.connected.is_set())
        assert await gw._publish_stored() is False
        await until(lambda: len(collector.on(RESULTS)) == 3)
        assert json.loads(collector.on(RESULTS)[-1])["window"] == 3
        assert published(gw, "results")[late] == (1, None)
        assert status_doc(gw).counters["results_refused"] == 1  # the parked row stayed put
    finally:
        collector.stop()
        await gw.session.close()
        await runner
        gw.inferencer.close()
        gw.store.close()
        broker.stop()


@pytest.mark.asyncio
async def test_parked_rows_get_another_try_at_the_next_start(
        tmp_path: Path, tiny_bundle: Path) -> None:
    """Fixing the ACL and restarting the gateway sends what the broker had refused."""
    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite #\ntopic deny {RESULTS}env\n")
    broker = Broker(free_port(), tmp_path / "broker", extra_conf=f"acl_file {acl}\n")
    broker.start()
    collector: Collector | None = None
    try:
        gw = Gateway(config(tmp_path, tiny_bundle, broker.port))
        runner = asyncio.create_task(gw.session.run())
        with gw.store.tx():
            env = gw.store.add_result(result("env", 1))
        await until(gw.session.connected.is_set)
        assert await gw._publish_stored() is False
        assert published(gw, "results") == {env: (REFUSED, NOT_AUTHORIZED)}
        await gw.session.close()
        await runner
        gw.inferencer.close()
        gw.store.close()

        broker.stop()
        acl.write_text("topic readwrite #\n")  # the operator's fix
        broker.start()
        collector = Collector(broker.port, [f"{RESULTS}#"], client_id="acl-fixed").start()
        gw = Gateway(config(tmp_path, tiny_bundle, broker.port))
        runner = asyncio.create_task(gw.session.run())
        try:
            assert published(gw, "results") == {env: (0, None)}
            await until(gw.session.connected.is_set)
            assert await gw._publish_stored() is False
            await until(lambda: len(collector.on(RESULTS)) == 1)
            assert published(gw, "results") == {env: (1, None)}
        finally:
            await gw.session.close()
            await runner
            gw.inferencer.close()
            gw.store.close()
    finally:
        if collector is not None:
            collector.stop()
        broker.stop()
