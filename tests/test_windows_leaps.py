"""The watermark: one glitched timestamp cannot wreck a stream; a real resume is followed."""

from __future__ import annotations

import json
import time
from pathlib import Path

from edgetok.gateway.config import StreamConfig
from edgetok.gateway.decode import Router
from edgetok.gateway.store import Store
from edgetok.gateway.windows import JUMP_QUORUM, WindowBuffer

CFG = StreamConfig(name="imu", topics=["sensors/imu"], channels=["x"], rate_hz=10.0,
                   window=50, hop=25)
T0 = (int(time.time()) // 10) * 10.0


class Feed:
    """Readings through the real decoder into a buffer, closing windows as the gateway does.

    `mono` stands still: windows close by the watermark alone, never by the idle rule.
    """

    def __init__(self, buf: WindowBuffer | None = None) -> None:
        self.buf = buf or WindowBuffer(CFG)
        self.router = Router([CFG])
        self.closed: dict[int, float] = {}  # window -> coverage when it closed
        self.late = 0
        self.mono = time.monotonic()

    def __call__(self, ts: float, now: float | None = None) -> None:
        payload = json.dumps({"ts": ts, "x": 1.0}).encode()
        _, fresh, late = self.router.admit("sensors/imu", payload,
                                           lambda _s, t: self.buf.accepts(t),
                                           ts if now is None else now)
        self.late += late
        for r in fresh:
            self.buf.add(r.ts, r.values)
        self.close(self.mono)

    def close(self, mono: float) -> None:
        for k in self.buf.due(mono):
            self.closed[k] = self.buf.coverage(*self.buf.bounds(k))
            self.buf.close(k, mono)


def test_one_reading_a_minute_ahead_loses_nothing() -> None:
    """The reviewer's case: +59 s once, then a minute of clean data."""
    feed = Feed()
    for i in range(300):
        feed(T0 + i / 10)
    before = len(feed.closed)
    feed(T0 + 30 + 59.0, now=T0 + 30)  # accepted by decode: within max_future_s
    assert feed.buf.watermark == T0 + 29.9  # held, not followed
    for i in range(300, 900):
        feed(T0 + i / 10)
    after = {k: c for k, c in list(feed.closed.items())[before:]}
    assert feed.late == 0
    assert len(after) == 600 // 25  # every hop of the minute closed once
    assert set(after.values()) == {1.0}  # each whole: none closed at its first reading
    assert feed.buf.held == []  # the stream caught up with the glitch


def test_two_agreeing_glitches_are_not_yet_a_jump() -> None:
    feed = Feed()
    for i in range(100):
        feed(T0 + i / 10)
    for dt in range(JUMP_QUORUM - 1):
        feed(T0 + 40.0 + dt / 10, now=T0 + 10)
    for i in range(100, 300):
        feed(T0 + i / 10)
    assert feed.late == 0 and feed.buf.watermark == T0 + 29.9
    assert set(list(feed.closed.values())[1:]) == {1.0}


def test_a_glitch_left_behind_still_closes_when_the_stream_stops() -> None:
    """Held, never dropped: with no stream to catch up, the idle rule closes its window."""
    feed = Feed()
    for i in range(100):
        feed(T0 + i / 10)
    feed(T0 + 50.0, now=T0 + 10)
    glitch = max(feed.buf.open)
    assert glitch == round((T0 + 50.0) * 10) // 25
    feed.close(feed.mono + CFG.sparse_close_s + 1)
    assert glitch in feed.closed and not feed.buf.open


def test_a_sensor_that_resumes_after_a_gap_is_followed() -> None:
    feed = Feed()
    for i in range(95):  # 9.5 s, then ten minutes of silence (the idle rule kept still)
        feed(T0 + i / 10)
    open_before = sorted(feed.buf.open)
    assert open_before  # the last windows wait for readings beyond their end
    resume = T0 + 600.0
    for i in range(JUMP_QUORUM - 1):
        feed(resume + i / 10)
        assert feed.buf.watermark < resume  # not yet corroborated
    feed(resume + (JUMP_QUORUM - 1) / 10)
    assert feed.buf.watermark >= resume  # many readings agree: followed
    assert all(k in feed.closed for k in open_before)  # the windows before the gap close
    for i in range(JUMP_QUORUM, 100):
        feed(resume + i / 10)
    resumed = {k: c for k, c in feed.closed.items() if feed.buf.bounds(k)[0] >= resume}
    assert len(resumed) == 2 and set(resumed.values()) == {1.0}  # 10 s: windows at 0 and 2.5 s
    assert feed.late == 0 and feed.buf.held == []


def test_a_trickle_through_a_stalled_link_still_closes_windows() -> None:
    """Readings 5 s apart (two hops) never sit near the watermark: each run of them moves it."""
    feed = Feed()
    for i in range(100):
        feed(T0 + i / 10)
    for i in range(1, 13):
        feed(T0 + 10 + 5.0 * i)
    assert feed.buf.watermark >= T0 + 60
    assert max(feed.closed) >= round((T0 + 50) * 10) // 25  # not all left to the idle rule
    assert feed.late == 0


def test_recovery_from_the_journal_holds_the_glitch_again(tmp_path: Path) -> None:
    """A restart replays the journal in timestamp order: the glitch is held all the same,
    and the windows closed before the crash stay closed."""
    store = Store(tmp_path / "db.sqlite")
    feed = Feed()
    rows: list[tuple[str, float, dict[str, float]]] = []
    for i in range(200):
        rows.append(("imu", T0 + i / 10, {"x": 1.0}))
        if i == 100:
            rows.append(("imu", T0 + 59.0, {"x": 1.0}))
    for _, ts, _ in rows:
        feed(ts, now=T0 + 10)
    with store.tx():
        store.journal(rows)
        for k in feed.closed:
            store.close_window("imu", k)
    closed_upto = max(feed.closed)
    again = Feed(WindowBuffer(CFG, closed_upto=closed_upto))
    for ts, vals in store.all_readings("imu"):
        again.buf.add(ts, vals)
    assert again.buf.watermark == feed.buf.watermark == T0 + 19.9
    assert again.buf.held == [T0 + 59.0]
    for i in range(200, 300):
        again(T0 + i / 10)
    assert again.late == 0 and set(again.closed.values()) == {1.0}
    assert min(again.closed) == closed_upto + 1
    store.close()
