"""Bounded trials of the server path for a gateway held on its device by an old estimate.

On its device, a gateway sends no frame, so the per-frame overhead it was last measured with
stays as it was until it goes stale (`stale_after_s`, then as long again to relax). Measured
in a run's first seconds, while the broker and server warm up, that figure can be twice the
later one, and held a near tie on the device for a whole phase of e2e run 14 (1.19x the best
static). A trial is bounded: only near a tie (a transmitting option planned at most
`explore_margin` worse, as accurate and feasible), at most once per `explore_after_s`
(doubled, up to MAX_TRIAL_BACKOFF times, each time a trial goes back to the device); it
stands until the gateway's frames have measured the overhead afresh, and its windows their
latency if it reports them (or `explore_after_s` passed). The re-solve after that keeps it,
or goes back unless the trial's option beats the one it left by the usual switching margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Trials that each went back to the device space the next ones out up to this many times
# explore_after_s; past stale_after_s the overhead relaxes anyway.
MAX_TRIAL_BACKOFF = 4


@dataclass(slots=True)
class Trials:
    """One gateway's trials: when the last began, the option it left, how far apart the next."""

    last_ts: float = -math.inf
    left: int | None = None  # the on-device option a trial under way left
    backoff: int = 1  # trials are explore_after_s times this apart

    def standing(self, option: int | None, feasible: np.ndarray, measured_ts: float,
                 now: float, after_s: float) -> int | None:
        """The option of a trial under way whose frames have not yet measured it afresh
        (`measured_ts`: when they last did; it stands through the re-solves until then),
        else None."""
        if (self.left is None or option is None or not feasible[option]
                or measured_ts > self.last_ts or now - self.last_ts >= after_s):
            return None
        return option

    def end(self, back_on_device: bool) -> None:
        """Close a trial under way: back on the device, the next waits longer; kept, as usual."""
        if self.left is None:
            return
        self.backoff = min(2 * self.backoff, MAX_TRIAL_BACKOFF) if back_on_device else 1
        self.left = None

    def begin(self, best: int, eligible: np.ndarray, cost: np.ndarray, margin: float,
              overhead_ts: float, now: float, after_s: float) -> int | None:
        """Start a trial from on-device `best` if one is due: the cheapest `eligible` option
        (transmitting, allowed, feasible, as accurate) within `margin` of `best`'s cost."""
        if (margin <= 0 or not math.isfinite(overhead_ts) or now - overhead_ts < after_s
                or now - self.last_ts < after_s * self.backoff):
            return None
        near = [int(i) for i in np.flatnonzero(eligible) if cost[i] <= cost[best] * (1 + margin)]
        if not near:
            return None
        self.left, self.last_ts = best, now
        return min(near, key=lambda i: cost[i])
