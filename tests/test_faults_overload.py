"""Overload against real processes: a backlog far larger than the journal, one window in flight.

The gateway must stop acknowledging while its journal is full (the broker keeps the rest),
keep the journal within its bound, never stall when its in-flight limit is reached, and
still give every window exactly one result.
"""

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
    plan_messages,
    report,
    spawn,
    status,
)

pytestmark = pytest.mark.slow

WINDOWS = 30
MAX_ROWS = 400  # four windows of readings against a backlog of thirty
CHUNK = 10


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident set (VmHWM), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def test_backlog_waits_in_the_broker_and_the_journal_stays_bounded(
        tmp_path: Path, mosquitto: Broker, tiny_bundle: Path) -> None:
    # A split variant and no server: the first window holds the only in-flight slot for
    # its whole deadline (and a probe again every few seconds) while the backlog pours in.
    cfg = fault_config(tmp_path, tiny_bundle, mosquitto.port, variant="r0.00-s1",
                       extra={"journal": {"max_rows": MAX_ROWS}, "max_inflight_windows": 1})
    gw = spawn("gateway", cfg, tmp_path, "gw")
    gw.start()
    assert gw.stop() == 0  # the broker now holds a persistent session for the gateway
    plan = basicmotions_plan(limit=WINDOWS)
    sent = Replayer(mosquitto.port, plan_messages(plan, CHUNK)).start().join()
    t0 = time.monotonic()
    gw.start()
    peak_rows, results = 0, 0
    try:
        while results < WINDOWS and time.monotonic() - t0 < 60:
            doc = status(gw)
            peak_rows = max(peak_rows, doc["journal"]["rows"])
            results = doc["counters"]["results"]
            time.sleep(0.02)
        drain_s = time.monotonic() - t0
        rows = assert_exactly_once(gw, tmp_path, {plan.window_seq(j) for j in range(WINDOWS)})
        counters = status(gw)["counters"]
        assert counters["backpressure_events"] >= 1, "the journal never filled"
        # The bound plus one message's readings, by the gateway's own high-water mark.
        assert MAX_ROWS <= counters["journal_peak_rows"] <= MAX_ROWS + CHUNK
        assert counters["deadletters"] == 0 and counters["messages"] == sent
        assert gw.proc is not None
        report("overload", messages_sent=sent, results=len(rows),
               backpressure_events=counters["backpressure_events"],
               journal_peak_rows=counters["journal_peak_rows"], journal_max_rows=MAX_ROWS,
               journal_rows_seen_polling=peak_rows,
               duplicates_suppressed=counters["duplicates"],
               dead_letters=counters["deadletters"], drain_s=round(drain_s, 2),
               gateway_peak_rss_mib=round(peak_rss_kib(gw.proc.pid) / 1024, 1))
    finally:
        assert gw.stop() == 0
