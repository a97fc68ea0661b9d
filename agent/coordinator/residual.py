"""Each path's residual: what one gateway's windows measure beyond the controller's own plan.

What no estimate models lands here. A 25% gateway's windows took 7.9 ms on its device where
5.0-5.8 was planned, and 6.1-7.2 ms on the server path where 5.5-7.0 was (e2e run 24: the
quota slows the head more than the probes and the profile say); the plans tied, so it
flipped between the paths all run while the server was 20% faster. The residual is kept per
path, on the device or transmitting, as a clipped smoothed difference; a path never measured
takes the other path's figure, and a stale one relaxes to it: what both share (tokenizing,
storing the result) then leaves the ranking as the model has it, and a path left after one
bad spell is tried again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from edgetok.agent.coordinator.estimates import Ewma, relaxed

# The least spread of a path's residual (s) that clipping assumes: window latencies that
# agree within 1 ms do not make a window 3 ms slower an outlier.
RESIDUAL_SIGMA_FLOOR_S = 0.001

DEVICE, TRANSMIT = False, True  # the two paths, as `OptionTable.transmits` tells them


@dataclass(slots=True)
class PathResiduals:
    """One gateway's measured-minus-planned window latency (s) by path, and when each path
    was last measured."""

    alpha: float
    clip_z: float
    est: dict[bool, Ewma] = field(default_factory=dict)
    ts: dict[bool, float] = field(default_factory=dict)
    # The option whose first report was skipped (by the seq that first decided it): that
    # report mixes in windows of the option before, and a path's first windows after a gap
    # are cold (the first reply after 10 s took 30 ms against 12-17 on a 10% gateway, run 19).
    skipped: int = -1
    planned: tuple[float, float] = (0.0, 0.0)  # (device, transmit) at the last solve

    def first_report(self, option_seq: int) -> bool:
        """True (and remembered) the first time the option decided at `option_seq` reports."""
        if self.skipped == option_seq:
            return False
        self.skipped = option_seq
        return True

    def fold(self, path: bool, measured_minus_planned_s: float, now: float) -> None:
        """Fold one report's difference between its windows' latency and the plan.

        The estimate starts from the model being right, worth one report, rather than from
        the first report: that is the median of two or three windows, of a path just
        opened. On a 25% gateway the first server windows of an e2e round took 8-13 ms where
        6 was usual; taken whole, the first report planned the server 4 ms slower than it
        was, and kept the gateway on its device for the rest of the round (run 29).
        """
        est = self.est.get(path)
        if est is None:
            est = self.est[path] = Ewma(self.alpha, mean=0.0, count=1, clip_z=self.clip_z,
                                        clip_floor=RESIDUAL_SIGMA_FLOOR_S)
        est.update(measured_minus_planned_s)
        self.ts[path] = now

    def last_ts(self, path: bool) -> float:
        """When `path` was last measured; -inf if never."""
        return self.ts.get(path, -math.inf)

    def by_path(self, now: float, stale_after_s: float) -> tuple[float, float]:
        """The (device, transmit) residual (s) to plan with now."""
        if not self.est:
            return 0.0, 0.0
        # The path measured last anchors the other: what they share, such as tokenizing,
        # leaves the ranking alone, and what sets the other apart fades once it is stale.
        anchor = max(self.ts, key=lambda path: self.ts[path])
        out = {anchor: self.est[anchor].mean}
        other = self.est.get(not anchor)
        out[not anchor] = out[anchor] if other is None else relaxed(
            other.mean, out[anchor], self.ts[not anchor], now, stale_after_s)
        return out[DEVICE], out[TRANSMIT]
