"""Edge server SIGKILLed mid-replay: on-device fallback within the deadline, then split again."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import Broker
from harness import (
    Replayer,
    assert_exactly_once,
    basicmotions_plan,
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

WINDOWS = 40
DEADLINE_MS = 1000.0
# 0.3 s per window: each half of the replay outlasts a kill, or a probe interval.
INTERVAL_S = 0.03


def test_server_sigkill_falls_back_then_resumes_split(tmp_path: Path, mosquitto: Broker,
                                                      tiny_bundle: Path) -> None:
    server = spawn("server", server_config(tiny_bundle, mosquitto.port), tmp_path, "server")
    gw = spawn("gateway", fault_config(tmp_path, tiny_bundle, mosquitto.port,
                                       deadline_ms=DEADLINE_MS), tmp_path, "gw")
    server.start()
    gw.start()
    try:
        plan = basicmotions_plan(limit=WINDOWS)
        half = WINDOWS // 2
        replay = Replayer(mosquitto.port, plan_messages(plan, windows=range(half)),
                          INTERVAL_S).start()
        wait_for(lambda: status(gw)["counters"]["results"] >= 4, what="split results")
        server.kill()
        t_kill = time.time()
        wait_for(lambda: status(gw)["uplink"]["fallbacks"] >= 3, what="fallbacks")
        server.start()  # returns once it is ready; the gateway must notice by itself
        t_back = time.time()
        sent = replay.join()
        sent += Replayer(mosquitto.port, plan_messages(plan, windows=range(half, WINDOWS)),
                         INTERVAL_S).start().join()
        rows = assert_exactly_once(gw, tmp_path, {plan.window_seq(j) for j in range(WINDOWS)})
        by_close = sorted(rows, key=lambda r: r["window"])
        fallback = [r for r in rows if r["where"] == "device-fallback"]
        assert fallback, "no window fell back while the server was dead"
        assert all(r["variant"]["split"] == 2 for r in fallback)  # the on-device variant
        # The deadline mechanism itself (not speed): a fallback is decided before the
        # deadline, not after a publish or reply timeout of several seconds.
        assert max(r["latency_ms"]["total"] for r in fallback) < 2 * DEADLINE_MS
        assert by_close[-1]["where"] == "split", "split inference did not resume"
        resumed = [r for r in rows if r["where"] == "split" and r["created_ts"] > t_back]
        assert resumed
        counters = status(gw)["counters"]
        report("server_sigkill", messages_sent=sent, results=len(rows),
               fallback_results=len(fallback),
               split_results=sum(r["where"] == "split" for r in rows),
               duplicates_suppressed=counters["duplicates"], dead_letters=counters["deadletters"],
               first_fallback_after_kill_s=first_result_after(fallback, t_kill),
               fallback_total_ms_max=max(r["latency_ms"]["total"] for r in fallback),
               split_resumed_after_server_ready_s=first_result_after(resumed, t_back))
        assert counters["deadletters"] == 0
    finally:
        assert gw.stop() == 0
        server.stop()
