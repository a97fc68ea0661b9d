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
class StepDetector:
    """Tells a lasting step from a fluctuation: `rise_reports` samples in a row above the
    band mean + z·σ, or `fall_reports` below mean - z·σ, the band being the one that held
    when the first of them came.

    The variance of an Ewma is there for fading, and a step (a link that recovers, or one
    that drops to a new level and stays) adds to it as if it were fading: planned at the mean
    less a few σ, the link would be planned far worse than it is for as many reports as it
    takes the σ to decay (e2e run 17's Pi trace: 15 s on the device after a drop from 50 to
    0.5 Mbit/s, where the server was still 1.5x faster). On a lasting step the estimate
    restarts at the new level with the spread it had before. Under fading around one level,
    several reports in a row beyond 3σ are rare; a run that breaks leaves the Ewma as it was.
    """

    rise_reports: int = 0  # 0: never
    fall_reports: int = 0  # 0: never
    z: float = 3.0
    floor: float = 0.0  # the least reach beyond the mean, whatever the spread
    run: list[float] = field(default_factory=list)
    band: tuple[float, float] = (math.nan, 0.0)  # (mean, var) when the run began
    side: int = 0  # +1: the run is a rise, -1: a fall

    def _side(self, mean: float, var: float, x: float) -> int:
        """+1 above the band, -1 below it, 0 inside; only for the steps being watched."""
        reach = max(self.z * math.sqrt(var), self.floor)
        if self.rise_reports and x > mean + reach:
            return 1
        if self.fall_reports and x < mean - reach:
            return -1
        return 0

    def update(self, est: Ewma, x: float, alpha_down: float | None = None) -> int:
        """Fold `x` into `est`; +1 if it was the last report of a lasting rise, -1 of a
        lasting fall, else 0."""
        side = self._side(*(self.band if self.run else (est.mean, est.var)), x) \
            if est.count else 0
        if self.run and side != self.side:
            self.run.clear()  # the run broke; x may start one the other way
            side = self._side(est.mean, est.var, x)
        if side:
            if not self.run:
                self.band, self.side = (est.mean, est.var), side
            self.run.append(x)
        est.update(x, alpha_down)
        need = self.rise_reports if side > 0 else self.fall_reports
        if not side or len(self.run) < need:
            return 0
        est.mean, est.var = statistics.median(self.run), self.band[1]
        self.run.clear()
        return side
