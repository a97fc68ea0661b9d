"""WindowBuffer: windows re-opened for a re-run, and idleness that is really deafness."""

from __future__ import annotations

import time

from edgetok.gateway.config import StreamConfig
from edgetok.gateway.windows import WindowBuffer

# min_coverage 0: these tests are about the idle rule itself, on one-reading windows.
CFG = StreamConfig(name="s", topics=["t"], channels=["x"], rate_hz=10.0, window=10,
                   idle_close_s=0.5, lateness_ms=0.0, min_coverage=0.0)


def test_only_the_cut_off_windows_below_the_mark_reopen() -> None:
    buf = WindowBuffer(CFG, closed_upto=5, rerun={3})
    assert [buf.accepts(k + 0.05) for k in range(7)] == [False, False, False, True, False,
                                                          False, True]
    for k in (3, 6):
        buf.add(k + 0.2, {"x": 1.0})
    assert buf.open == {3, 6}
    win = buf.close(3, time.monotonic())
    assert win.seq == 3 and not buf.rerun
    assert not buf.accepts(3.5)  # once re-run, closed for good


def test_hold_idle_postpones_the_idle_rule() -> None:
    buf = WindowBuffer(CFG)
    buf.add(100.0, {"x": 1.0})
    t = buf.last_arrival
    assert buf.due(t + 0.6) == [100]  # silent for longer than idle_close_s
    buf.hold_idle(t + 0.6)  # ... but we could not hear: the silence starts now
    assert buf.due(t + 0.6) == [] and buf.due(t + 1.2) == [100]


def test_a_sparse_window_waits_for_the_longer_silence() -> None:
    cfg = CFG.model_copy(update={"min_coverage": 0.5, "sparse_close_s": 3.0})
    buf = WindowBuffer(cfg)
    for i in range(3):  # 3 of 10 samples: a stalled link, not a finished burst
        buf.add(100.0 + i / 10, {"x": 1.0})
    t = buf.last_arrival
    assert buf.due(t + 0.6) == []
    assert buf.due(t + 3.1) == [100]  # never dropped: it closes after sparse_close_s
    for i in range(3, 6):
        buf.add(100.0 + i / 10, {"x": 1.0})
    t = buf.last_arrival
    assert buf.due(t + 0.6) == [100]  # 6 of 10 arrived: the idle rule applies again
