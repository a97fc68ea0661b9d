"""Broker faults against real processes: restart mid-replay, a fresh broker, store-and-forward."""

from __future__ import annotations

import json
import time
from pathlib import Path

import paho.mqtt.subscribe as subscribe
import pytest
from conftest import Broker
from harness import (
    Collector,
    Replayer,
    assert_exactly_once,
    basicmotions_plan,
    db_query,
    fault_config,
    first_result_after,
    plan_messages,
    report,
    server_config,
    spawn,
    status,
    wait_for,
)

pytestmark = pytest.mark.slow

GW = "gw-test"
# Paced so the replay is still running when the broker goes away: 10 readings per message,
# 10 ms apart, so 0.1 s per 10-second window and 3 s for all 30.
INTERVAL_S = 0.01
WINDOWS = 30


def test_broker_restart_mid_replay_loses_and_doubles_nothing(
        tmp_path: Path, mosquitto: Broker, tiny_bundle: Path) -> None:
    server = spawn("server", server_config(tiny_bundle, mosquitto.port), tmp_path, "server")
    gw = spawn("gateway", fault_config(tmp_path, tiny_bundle, mosquitto.port), tmp_path, "gw")
    server.start()
    gw.start()
    try:
        plan = basicmotions_plan(limit=WINDOWS)
        replay = Replayer(mosquitto.port, plan_messages(plan), INTERVAL_S).start()
        wait_for(lambda: replay.sent > len(replay.messages) // 3, what="a third of the replay")
        mosquitto.stop()  # SIGTERM: mosquitto writes its persistence file and exits
        time.sleep(0.5)
        mosquitto.start()
        t_back = time.time()
        reconnect_s = wait_for(lambda: status(gw)["mqtt"]["connects"] >= 2, what="reconnect")
        sent = replay.join()
        expected = {plan.window_seq(j) for j in range(WINDOWS)}
        rows = assert_exactly_once(gw, tmp_path, expected)
        counters = status(gw)["counters"]
        assert db_query(tmp_path, "SELECT count(*) FROM windows") == [(0,)]
        report("broker_restart", messages_sent=sent, sensor_resends=replay.retries,
               results=len(rows), duplicates_suppressed=counters["duplicates"],
               dead_letters=counters["deadletters"], reconnect_s=round(reconnect_s, 2),
               first_result_after_restart_s=first_result_after(rows, t_back),
               where=sorted({r["where"] for r in rows}))
        assert counters["deadletters"] == 0
    finally:
        assert gw.stop() == 0
        server.stop()


def test_fresh_broker_gets_resubscribed_and_a_new_birth(
        tmp_path: Path, mosquitto: Broker, tiny_bundle: Path) -> None:
    gw = spawn("gateway", fault_config(tmp_path, tiny_bundle, mosquitto.port,
                                       variant="r0.00-s2"), tmp_path, "gw").start()
    try:
        plan = basicmotions_plan(limit=4)
        Replayer(mosquitto.port, plan_messages(plan, windows=range(2))).start().join()
        assert_exactly_once(gw, tmp_path, {plan.window_seq(j) for j in range(2)})
        # A broker that lost its state: no session, no subscriptions, no retained birth.
        mosquitto.stop()
        (mosquitto.workdir / "mosquitto.db").unlink()
        mosquitto.start()
        wait_for(lambda: status(gw)["mqtt"]["connects"] >= 2, what="reconnect")
        birth = subscribe.simple(f"edgetok/{GW}/status", hostname="127.0.0.1",
                                 port=mosquitto.port, retained=True)
        assert json.loads(birth.payload)["state"] == "online"
        Replayer(mosquitto.port, plan_messages(plan, windows=range(2, 4))).start().join()
        assert_exactly_once(gw, tmp_path, {plan.window_seq(j) for j in range(4)})
    finally:
        assert gw.stop() == 0


def test_results_stored_while_the_broker_is_down_are_published_in_order(
        tmp_path: Path, mosquitto: Broker, tiny_bundle: Path) -> None:
    # No server runs: every window waits out its deadline, so results are still being
    # made after the broker goes away, and are kept for it.
    gw = spawn("gateway", fault_config(tmp_path, tiny_bundle, mosquitto.port,
                                       deadline_ms=3000.0), tmp_path, "gw")
    collector = Collector(mosquitto.port, [f"edgetok/{GW}/results/#"])
    gw.start()
    collector.start()
    try:
        n = 8
        plan = basicmotions_plan(limit=n)
        sent = Replayer(mosquitto.port, plan_messages(plan)).start().join()
        # A PUBACK to the sensor is not delivery to the gateway: let it take everything in.
        wait_for(lambda: status(gw)["counters"]["messages"] >= sent, what="delivery")
        mosquitto.stop()
        wait_for(lambda: db_query(tmp_path, "SELECT count(*) FROM results")[0][0] >= n - 1,
                 what="results stored")
        held = db_query(tmp_path, "SELECT count(*) FROM results WHERE published = 0")[0][0]
        assert held > 0, "every result was published before the broker went away"
        mosquitto.start()
        # Those stored during the outage go out on reconnect; the last window was still
        # open (silence while disconnected is not idleness) and closes afterwards.
        stored_s = wait_for(lambda: len(collector.on(f"edgetok/{GW}/results/")) >= n - 1,
                            what="publication of the stored results")
        wait_for(lambda: len(collector.on(f"edgetok/{GW}/results/")) >= n, what="the last")
        got = [json.loads(p) for p in collector.on(f"edgetok/{GW}/results/")]
        ids = [r["id"] for r in got]
        assert ids == sorted(ids), "results were published out of order"
        assert sorted({r["window"] for r in got}) == [plan.window_seq(j) for j in range(n)]
        assert db_query(tmp_path, "SELECT count(*) FROM results WHERE published = 0") == [(0,)]
        report("store_and_forward", results=n, held_while_broker_down=held,
               received_in_order=len(got),
               stored_published_after_broker_back_s=round(stored_s, 2))
    finally:
        collector.stop()
        assert gw.stop() == 0
