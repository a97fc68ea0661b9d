"""Running estimates the online controller keeps, and how a stale one returns to its prior."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field


@dataclass(slots=True)
class Ewma:
    """Exponentially weighted mean and variance of one quantity."""

    alpha: float
    mean: float = math.nan
    var: float = 0.0
    count: int = 0
    # With clip_z > 0, a sample's step is limited to clip_z standard deviations (at least
    # clip_floor): one outlier moves the mean by alpha·clip_z·σ at most, while a lasting
    # change, clipped report after report, widens σ by ~25% a report until it is followed.
    clip_z: float = 0.0
    clip_floor: float = 0.0

    def update(self, x: float, alpha_down: float | None = None) -> None:
        """Fold in a sample; `alpha_down`, if given, weighs a sample below the mean in the mean
        (the variance always uses `alpha`, so a quick step down does not erase it)."""
        if self.count == 0:
            self.mean = x
        else:
            d = x - self.mean
            if self.clip_z > 0 and self.count >= 2:
                lim = self.clip_z * max(math.sqrt(self.var), self.clip_floor)
                d = min(max(d, -lim), lim)
            a = alpha_down if alpha_down is not None and d < 0 else self.alpha
            self.mean += a * d
            self.var = (1 - self.alpha) * (self.var + self.alpha * d * d)
        self.count += 1

    def value(self, default: float) -> float:
        """The mean, or `default` before the first sample."""
        return default if self.count == 0 else self.mean


def relaxed(value: float, prior: float, measured_at: float, now: float,
            stale_after_s: float) -> float:
    """`value` while fresh; once `stale_after_s` old, moved linearly to `prior` over the next
    `stale_after_s`. An option left after one bad spell yields no new measurement, so only
    this brings it back into consideration (the gateway's guard and fallback cover the try).
    """
    age = now - measured_at - stale_after_s
    if age <= 0:
        return value
    return value + min(age / stale_after_s, 1.0) * (prior - value)


@dataclass(slots=True)
class RiseDetector:
    """Tells a lasting rise from a fluctuation: `reports` samples in a row above the band
    mean + z·σ that held when the first of them came.

    The variance of an Ewma is there for fading, and a step up (a link that recovers) adds to
    it as if it were fading: planned at the mean less a few σ, the better link would go unused
    for as many reports as it takes the σ to decay. On a lasting rise the estimate restarts
    at the new level with the spread it had before. Under fading around one level, several
    reports in a row above mean + 3σ are rare; a run that breaks leaves the Ewma as it was.
    """

    reports: int = 0  # 0: never
    z: float = 3.0
    run: list[float] = field(default_factory=list)
    band: tuple[float, float] = (math.nan, 0.0)  # (mean, var) when the run began

    def update(self, est: Ewma, x: float, alpha_down: float | None = None) -> bool:
        """Fold `x` into `est`; True if it was the last report of a lasting rise."""
        mean, var = self.band if self.run else (est.mean, est.var)
        if self.reports and est.count and x > mean + self.z * math.sqrt(var):
            if not self.run:
                self.band = (est.mean, est.var)
            self.run.append(x)
        else:
            self.run.clear()
        est.update(x, alpha_down)
        if not self.reports or len(self.run) < self.reports:
            return False
        est.mean, est.var = statistics.median(self.run), self.band[1]
        self.run.clear()
        return True
