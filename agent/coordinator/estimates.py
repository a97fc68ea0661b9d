"""Running estimates the online controller keeps, and how a stale one returns to its prior."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class Ewma:
    """Exponentially weighted mean and variance of one quantity."""

    alpha: float
    mean: float = math.nan
    var: float = 0.0
    count: int = 0

    def update(self, x: float, alpha_down: float | None = None) -> None:
        """Fold in a sample; `alpha_down`, if given, weighs a sample below the mean in the mean
        (the variance always uses `alpha`, so a quick step down does not erase it)."""
        if self.count == 0:
            self.mean = x
        else:
            d = x - self.mean
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
