"""Gateway SIGKILLed mid-replay, once and then five times (power loss): nothing lost or doubled."""

from __future__ import annotations

import random
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Broker
from harness import (
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


def assert_recovered(gw: Any, tmp_path: Path, plan: Any) -> list[dict[str, Any]]:
    """Every window exactly once, the journal pruned, and no window left in flight."""
    rows = assert_exactly_once(gw, tmp_path, {plan.window_seq(j) for j in range(WINDOWS)})
    wait_for(lambda: db_query(tmp_path, "SELECT count(*) FROM readings")[0][0] == 0,
             what="journal pruned")
    assert db_query(tmp_path, "SELECT count(*) FROM windows") == [(0,)]
    return rows

WINDOWS = 40


def reruns(log: str) -> int:
    """Windows re-run from the journal, summed over every start in a gateway log."""
    return sum(int(n) for n in re.findall(r"recovered (\d+) window", log))


def test_gateway_sigkill_mid_replay_reruns_from_the_journal(
        tmp_path: Path, mosquitto: Broker, tiny_bundle: Path) -> None:
    server = spawn("server", server_config(tiny_bundle, mosquitto.port), tmp_path, "server")
    gw = spawn("gateway", fault_config(tmp_path, tiny_bundle, mosquitto.port), tmp_path, "gw")
    server.start()
    gw.start()
    try:
        plan = basicmotions_plan(limit=WINDOWS)
        replay = Replayer(mosquitto.port, plan_messages(plan), 0.01).start()
        wait_for(lambda: status(gw)["counters"]["results"] >= 5, what="first results")
        # Freeze the server so frames go unanswered and windows wait in flight: the kill
        # then cuts windows off between close and result, the case recovery must re-run.
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        wait_for(lambda: db_query(tmp_path, "SELECT count(*) FROM windows")[0][0] > 0,
                 what="windows in flight")
        gw.kill()
        server.proc.send_signal(signal.SIGCONT)
        journaled = db_query(tmp_path, "SELECT count(*) FROM readings")[0][0]
        in_flight = db_query(tmp_path, "SELECT count(*) FROM windows")[0][0]
        t_back = time.time()
        gw.start()  # the replay goes on meanwhile; the broker queues for the gateway
        sent = replay.join()
        rows = assert_recovered(gw, tmp_path, plan)
        counters = status(gw)["counters"]
        report("gateway_sigkill", messages_sent=sent, results=len(rows),
               journal_rows_at_kill=journaled, windows_in_flight_at_kill=in_flight,
               windows_rerun=reruns(gw.logtext()),
               duplicates_suppressed=counters["duplicates"], dead_letters=counters["deadletters"],
               first_result_after_restart_s=first_result_after(rows, t_back))
        assert counters["deadletters"] == 0
        assert reruns(gw.logtext()) == in_flight
    finally:
        assert gw.stop() == 0
        server.stop()


def test_power_loss_five_times_in_one_run(tmp_path: Path, mosquitto: Broker,
                                          tiny_bundle: Path) -> None:
    # synchronous=FULL: the journal commit is fsynced before the PUBACK, so an acknowledged
    # reading survives the machine losing power, not only the process dying (SIGKILL keeps
    # the OS page cache, so NORMAL would pass this test without proving that).
    server = spawn("server", server_config(tiny_bundle, mosquitto.port), tmp_path, "server")
    gw = spawn("gateway", fault_config(tmp_path, tiny_bundle, mosquitto.port,
                                       extra={"journal": {"synchronous": "FULL"}}),
               tmp_path, "gw")
    server.start()
    gw.start()
    rng = random.Random(5)
    try:
        plan = basicmotions_plan(limit=WINDOWS)
        replay = Replayer(mosquitto.port, plan_messages(plan), 0.02).start()
        recover = []
        for _ in range(5):
            time.sleep(rng.uniform(0.1, 1.5))
            gw.kill()
            t0 = time.monotonic()
            gw.start()
            recover.append(round(time.monotonic() - t0, 2))
        sent = replay.join()
        rows = assert_recovered(gw, tmp_path, plan)
        counters = status(gw)["counters"]
        report("power_loss_x5", messages_sent=sent, results=len(rows),
               windows_rerun=reruns(gw.logtext()),
               duplicates_suppressed_last_run=counters["duplicates"],
               dead_letters=counters["deadletters"], restart_to_ready_s=recover,
               where=sorted({r["where"] for r in rows}))
        assert counters["deadletters"] == 0
    finally:
        assert gw.stop() == 0
        server.stop()
