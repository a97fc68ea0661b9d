"""Run times of the ORT sessions here: robust estimates, and fresh samples for telemetry."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import statistics
import time
from collections import deque
from pathlib import Path

from edgetok.models.runtime import Part

log = logging.getLogger(__name__)

# Runs the estimate is the median of. A median ignores a spell shorter than half of them
# (another process starting, a variant switch opening sessions on a shared core) that a
# mean seeded by it would carry for many runs, and follows a lasting change within half.
RUN_SAMPLES = 8

Key = tuple[str, Part]
# Samples kept per key between two telemetry reports: their median is as good from the last
# thousand, and a long report interval must not pile them up.
FRESH_SAMPLES = 1024


class FreshMedians:
    """Samples by key since they were last taken, for one telemetry report each."""

    def __init__(self) -> None:
        self._samples: dict[str, deque[float]] = {}

    def add(self, key: str, ms: float) -> None:
        """Keep one sample for the next report."""
        self._samples.setdefault(key, deque(maxlen=FRESH_SAMPLES)).append(ms)

    def take(self) -> dict[str, float]:
        """The median of each key's samples since the last call; then forget them."""
        out = {k: statistics.median(v) for k, v in self._samples.items()}
        self._samples.clear()
        return out


class RunTimes:
    """Per (variant, part): the median of the recent run times (ms), and, if `reported`, the
    head runs since telemetry last took them (unreported times must not pile them up)."""

    def __init__(self, reported: bool = True) -> None:
        self._recent: dict[Key, deque[float]] = {}
        self._last: dict[Key, float] = {}  # monotonic time of each key's latest run
        self._fresh = FreshMedians()
        self.reported = reported

    def add(self, key: Key, ms: float) -> None:
        """Record one run; a reported head run is also kept for the next telemetry report."""
        self._recent.setdefault(key, deque(maxlen=RUN_SAMPLES)).append(ms)
        self._last[key] = time.monotonic()
        if self.reported and key[1] == "head":
            self._fresh.add(key[0], ms)

    def get(self, key: Key, default: float | None = None) -> float | None:
        """The estimate for `key`, or `default` before its first run."""
        runs = self._recent.get(key)
        return statistics.median(runs) if runs else default

    def __contains__(self, key: object) -> bool:
        return key in self._recent

    def last(self, key: Key) -> float:
        """When `key` last ran (monotonic); -inf if never."""
        return self._last.get(key, -math.inf)

    def count(self, key: Key) -> int:
        """Runs of `key` the estimate holds now (at most RUN_SAMPLES)."""
        return len(self._recent.get(key, ()))

    def heads(self) -> dict[str, float]:
        """The head estimate of every variant that has run."""
        return {v: statistics.median(runs) for (v, part), runs in self._recent.items()
                if part == "head"}

    def take_fresh_heads(self) -> dict[str, float]:
        """Median of the head runs since the previous call, by variant; then forget them.

        Each report carries only its own runs: a figure sent again would be folded in again
        by the coordinator, long after the device (its clock, its load) has changed.
        """
        return self._fresh.take()


# One calibration counts for at most this factor either way: a probe that reads more than
# 2x off a window's head is partly a measurement gone wrong, not the bias of a method.
PROBE_SCALE_LIMIT = 2.0
# Smoothing weight of one calibration; calibrations are rare (one per several probe
# intervals), so each counts for a good share.
PROBE_ALPHA = 0.3


class ProbeCalibration:
    """How a probe's head time reads against windows' heads: window / probe, smoothed in log.

    A probe runs when a window is done, a window's head right after its tokenizing; on a
    CPU capped by a quota the two read differently (probes 9-33% slower than the device-only
    lane's window heads at 10% of a core in e2e run 13; 14-22% faster when delayed past the
    result's publish, run 15). Learned while windows run heads here, applied to the probes
    that stand in for them while the server runs everything.

    With a `path`, it is kept across restarts: a gateway that starts on the server runs no
    window heads to calibrate against, and its first probes, taken as they read, told the
    coordinator a 25% device ran heads in 4 ms where its windows took 7 (e2e run 30). The
    file names the bundle it was learned on; another bundle starts afresh.
    """

    def __init__(self, path: Path | None = None, bundle: str = "") -> None:
        self.log_ratio = 0.0
        self.samples = 0
        self.path, self.bundle = path, bundle
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        """Take a saved calibration of this bundle; anything unreadable is no calibration."""
        try:
            saved = json.loads(path.read_text())
            if saved.get("bundle") != self.bundle:
                return
            x, n = float(saved["log_ratio"]), int(saved["samples"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("probe calibration %s unreadable, starting afresh: %s", path, exc)
            return
        lim = math.log(PROBE_SCALE_LIMIT)
        if n > 0 and math.isfinite(x):
            self.log_ratio, self.samples = min(max(x, -lim), lim), n

    def _save(self) -> None:
        """Write the calibration whole or not at all (a crash mid-write keeps the old)."""
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps({"bundle": self.bundle, "log_ratio": self.log_ratio,
                                       "samples": self.samples}))
            os.replace(tmp, self.path)
        except OSError as exc:  # a full or read-only disk costs the next start, not this one
            log.warning("cannot save probe calibration to %s: %s", self.path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def update(self, window_ms: float, probe_ms: float) -> None:
        """Fold in one probe timed beside the recent window heads' median."""
        if window_ms <= 0 or probe_ms <= 0:
            return
        lim = math.log(PROBE_SCALE_LIMIT)
        x = min(max(math.log(window_ms / probe_ms), -lim), lim)  # each sample, not the mean
        self.log_ratio = x if not self.samples else \
            (1 - PROBE_ALPHA) * self.log_ratio + PROBE_ALPHA * x
        self.samples += 1
        self._save()

    @property
    def scale(self) -> float:
        """The factor a probe's time is multiplied by to read as a window's head."""
        return math.exp(self.log_ratio)
