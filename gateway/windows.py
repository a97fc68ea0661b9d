"""Group a stream's readings into windows on a grid fixed by timestamps, and close them."""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from edgetok.gateway.config import StreamConfig
from edgetok.tokenizers import SeriesWindow, align

# Readings in a row far ahead of a stream's watermark before it follows them: a lone glitched
# timestamp never moves it; a sensor that resumed after a gap is followed this many readings
# in. More: glitches that come in runs are ignored too, but a resume is followed later.
JUMP_QUORUM = 3


@dataclass(frozen=True, slots=True)
class ClosedWindow:
    """A window ready for inference."""

    stream: str
    seq: int
    start_ts: float
    end_ts: float
    data: SeriesWindow
    closed_mono: float


class WindowBuffer:
    """Readings of one stream. Window k spans samples [k*hop, k*hop + window) since the epoch.

    Fixing the grid by timestamps (not by arrival) makes a window's identity (stream, k)
    the same after a crash, a redelivery or a restart, which is what deduplication keys on.
    """

    def __init__(self, cfg: StreamConfig, closed_upto: int | None = None,
                 rerun: set[int] | None = None) -> None:
        self.cfg = cfg
        self.readings: dict[float, dict[str, float]] = {}
        self.open: set[int] = set()
        self.closed_upto = closed_upto if closed_upto is not None else -(1 << 62)
        # Windows at or below closed_upto that a crash cut off: they may open once more.
        self.rerun: set[int] = set(rerun or ())
        self.watermark = -math.inf
        # Timestamps held ahead of the watermark (sorted), and the latest of them in a row
        # with no reading near the watermark in between: see _leap_ahead.
        self.held: list[float] = []
        self._run: deque[float] = deque(maxlen=JUMP_QUORUM)
        self._leap = cfg.hop_samples / cfg.rate_hz + cfg.lateness_ms / 1000.0
        self.last_arrival = time.monotonic()
        self.duplicates = 0

    def _windows_of(self, ts: float) -> list[int]:
        n = round(ts * self.cfg.rate_hz)
        hop, win = self.cfg.hop_samples, self.cfg.window
        first = math.ceil((n - win + 1) / hop)
        ks = range(max(first, self.closed_upto + 1), n // hop + 1)
        if not self.rerun:
            return list(ks)
        return sorted({k for k in range(first, n // hop + 1) if k in self.rerun}.union(ks))

    def bounds(self, k: int) -> tuple[float, float]:
        """Start and end time of window k."""
        start = k * self.cfg.hop_samples / self.cfg.rate_hz
        return start, start + self.cfg.window / self.cfg.rate_hz

    def accepts(self, ts: float) -> bool:
        """Whether a reading at ts still belongs to some open-able window."""
        n = round(ts * self.cfg.rate_hz)
        last = n // self.cfg.hop_samples
        if last > self.closed_upto:  # the common case, decided without building the list
            first = math.ceil((n - self.cfg.window + 1) / self.cfg.hop_samples)
            if last >= first:
                return True
        return bool(self.rerun) and len(self._windows_of(ts)) > 0

    def add(self, ts: float, values: dict[str, float]) -> bool:
        """Buffer a reading; False if every window it belongs to has already closed."""
        ks = self._windows_of(ts)
        if not ks:
            self.duplicates += 1
            return False
        old = self.readings.get(ts)
        if old is not None:
            if all(old.get(c) == v for c, v in values.items()):
                self.duplicates += 1
            old.update(values)
        elif ts - self.watermark > self._leap:
            self._leap_ahead(ts)
            self.readings[ts] = dict(values)
        else:
            self.readings[ts] = dict(values)
            if ts > self.watermark:
                self.watermark = ts
                if self.held and self.held[0] <= ts:  # the stream has caught up with them
                    del self.held[:bisect.bisect(self.held, ts)]
            if self._run:
                self._run.clear()  # the stream is still here: what leapt alone was a glitch
        self.open.update(ks)
        self.last_arrival = time.monotonic()
        return True

    def _leap_ahead(self, ts: float) -> None:
        """Hold a new reading far ahead of the watermark; follow once enough in a row leap.

        Every window ending before the watermark (less the lateness) closes, so one reading
        stamped far ahead (a glitched sensor clock) would close each later window at its first
        reading and turn the rest of its readings late, for as long as the glitch was ahead.
        So a reading more than a hop (plus the lateness) ahead is held: buffered and windowed
        like any other, waiting in its window for the stream to get there, without moving the
        watermark. Only JUMP_QUORUM such readings in a row (a sensor that resumed after a
        gap, a chunk after a silence, a trickle through a stalled link) move it, to their
        median, which one glitch among them cannot set. A reading within reach of the
        watermark in between ends the run. One reading thus closes at most one window early.
        """
        bisect.insort(self.held, ts)
        self._run.append(ts)
        if len(self._run) == JUMP_QUORUM:
            self.watermark = max(self.watermark, sorted(self._run)[JUMP_QUORUM // 2])
            del self.held[:bisect.bisect(self.held, self.watermark)]

    def hold_idle(self, now_mono: float) -> None:
        """Silence while the gateway cannot listen (broker gone, backpressure) is not idling."""
        self.last_arrival = max(self.last_arrival, now_mono)

    def due(self, now_mono: float) -> list[int]:
        """Open windows that should close now: passed by the watermark, or the stream idles.

        Idling closes a window only if enough of it arrived: a stalled link looks like
        silence too, and closing then would infer on a fragment and turn the rest late.
        """
        silent = now_mono - self.last_arrival
        late = self.cfg.lateness_ms / 1000.0
        def ready(k: int) -> bool:
            start, end = self.bounds(k)
            if self.watermark >= end + late:
                return True
            return silent >= self.cfg.idle_close_s and (
                silent >= self.cfg.sparse_close_s
                or self.coverage(start, end) >= self.cfg.min_coverage)

        return sorted(k for k in self.open if ready(k))

    def coverage(self, start: float, end: float) -> float:
        """Fraction of the samples in [start, end) that have a reading."""
        lo = start - 0.5 / self.cfg.rate_hz
        n = sum(1 for t in self.readings if lo <= t < end)
        return n / self.cfg.window

    def close(self, k: int, now_mono: float) -> ClosedWindow:
        """Cut window k out of the buffer and align it onto the sample grid."""
        self.open.discard(k)
        self.rerun.discard(k)
        self.closed_upto = max(self.closed_upto, k)
        start, end = self.bounds(k)
        stamps = [t for t in self.readings if start - 0.5 / self.cfg.rate_hz <= t < end]
        chans = self.cfg.channels
        vals = np.array([[self.readings[t].get(c, np.nan) for c in chans] for t in stamps],
                        dtype=np.float64).reshape(len(stamps), len(chans))
        values, grid = align(np.array(stamps, dtype=np.float64), vals, start=start,
                             rate_hz=self.cfg.rate_hz, length=self.cfg.window)
        self._forget_before(min((self.bounds(j)[0] for j in self.open), default=end))
        return ClosedWindow(self.cfg.name, k, start, end, SeriesWindow(values, grid), now_mono)

    def _forget_before(self, ts: float) -> None:
        limit = ts - 0.5 / self.cfg.rate_hz
        for t in [t for t in self.readings if t < limit]:
            del self.readings[t]

    def keep_from(self) -> float:
        """Earliest timestamp any open or future window may still need."""
        if self.open:
            return min(self.bounds(k)[0] for k in self.open) - 0.5 / self.cfg.rate_hz
        return self.bounds(self.closed_upto + 1)[0] - 0.5 / self.cfg.rate_hz
