"""What the gateway knows about its uplink: is the server answering, and how long replies take."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

from edgetok.frames import TailReply

# Smoothing of the reply round trip the link guard predicts from: larger follows a change
# sooner, smaller rides out one slow reply.
RTT_ALPHA = 0.3
# Replies whose per-frame overhead the median is taken over: more rides out throttling
# spikes on a slow gateway, fewer follows a change sooner.
OVERHEAD_SAMPLES = 16
# Overheads from before a gap this long in replies are dropped: the gateway was away from
# the server (on its device), and a figure from its first, warming-up replies would
# otherwise still set the median when it comes back for a coordinator's trial.
OVERHEAD_GAP_S = 10.0
# Replies kept before the overhead is reported: the median of three ignores one outlier, and
# one early figure (8 ms where 2.5 was usual, at 10% CPU) sent a gateway back to its device
# for the rest of an e2e round.
MIN_OVERHEAD_SAMPLES = 3
# A frame that left this much later than its radio hold waited for more than the radio: on
# a CPU quota, for the period that refills it (e2e run 19: ~9 ms on a 10% gateway).
LATE_SLACK_S = 0.001
# Windows cut off before their deadline that are remembered until it passes, to tell a reply
# the reserve cut off from one that would have been late anyway; a bound, not a tuning knob.
CUT_REMEMBERED = 64


def link_key(variant: str, precision: str) -> str:
    """The key the uplink keeps a kind of frame's size and round trip under."""
    return f"{variant}/{precision}"


@dataclass
class UplinkState:
    """Whether the edge server is answering, and replies awaited by window."""

    server_ok: bool = True
    next_probe: float = 0.0
    pending: dict[tuple[str, int], asyncio.Future[TailReply]] = field(default_factory=dict)
    frames_sent: int = 0
    bytes_sent: int = 0
    replies_late: int = 0
    # Of those, replies that came after their cutoff but before their window's deadline: the
    # server answered in time, and the fallback reserve cut it off (never one after a stall).
    replies_cut: int = 0
    cut_until: dict[tuple[str, int], float] = field(default_factory=dict)  # key -> deadline
    fallbacks: int = 0
    # Server probes (frames of windows done on the device, for their replies' round trip):
    # sent, their bytes, and those without a reply in time. Not in frames_sent/bytes_sent.
    probes_sent: int = 0
    probe_bytes: int = 0
    probes_lost: int = 0
    guarded: int = 0  # windows kept off a link that was sensed too slow for their deadline
    frame_bits: dict[str, float] = field(default_factory=dict)  # last frame size by key
    rtt_s: dict[str, float] = field(default_factory=dict)  # smoothed reply round trip by frame
    rtt_rate: dict[str, float] = field(default_factory=dict)  # sensed rate at those replies
    # Recent times of a reply after its frame left that are not the server's tail:
    # publishing here, the broker's hops, the reply's way back.
    overheads_s: deque[float] = field(default_factory=lambda: deque(maxlen=OVERHEAD_SAMPLES))
    # Beside each: how long the frame took to leave when that was later than its radio hold
    # (else 0). A hold that long costs nothing more: the wait runs inside it.
    floors_s: deque[float] = field(default_factory=lambda: deque(maxlen=OVERHEAD_SAMPLES))
    last_overhead_mono: float = -float("inf")

    def cut(self, key: tuple[str, int], deadline_mono: float) -> None:
        """Remember a window whose reply was cut off before its deadline."""
        now = time.monotonic()
        if len(self.cut_until) >= CUT_REMEMBERED:
            self.cut_until = {k: t for k, t in self.cut_until.items() if t > now}
        if len(self.cut_until) < CUT_REMEMBERED:
            self.cut_until[key] = deadline_mono

    def late_reply(self, key: tuple[str, int]) -> None:
        """Count a reply that came after its window stopped waiting for it."""
        self.replies_late += 1
        until = self.cut_until.pop(key, None)
        if until is not None and time.monotonic() <= until:
            self.replies_cut += 1

    def learn(self, key: str, rtt_s: float, rate_bps: float | None, fresh: bool = False
              ) -> None:
        """Fold one reply's round trip (and the link rate sensed then) into the estimates.

        Smoothing rides out one slow reply among frequent ones. A `fresh` reply (to a probe
        the guard's history had advised against) starts afresh: what made the old round trips
        slow, such as a cold session, may be long gone, and averaging with them would keep
        the guard shut for several more probes.
        """
        old = self.rtt_s.get(key)
        if old is None or fresh:
            self.rtt_s[key] = rtt_s
            self.rtt_rate.pop(key, None)
        else:
            self.rtt_s[key] = old + RTT_ALPHA * (rtt_s - old)
        if rate_bps is not None:
            r = self.rtt_rate.get(key)
            self.rtt_rate[key] = rate_bps if r is None else r + RTT_ALPHA * (rate_bps - r)

    def learn_overhead(self, rtt_s: float, tail_s: float, bits: float,
                       rate_bps: float | None, left_s: float = 0.0, hold_s: float = 0.0
                       ) -> None:
        """Keep one reply's overhead and floor; only with a sensed rate to take the bits off.

        `left_s`: the time from the frame's being ready to its leaving, of which `hold_s` was
        its planned radio hold; the rest, when over LATE_SLACK_S, was a wait a longer hold
        would have hidden. The first reply after a start or a gap is not kept: it pays for
        cold paths (e2e run 18, 10% CPU: 30 ms against 12-17 for the next ones), and as the
        only figure, it set the coordinator's plan of the server path until the next trial.
        """
        if rate_bps is None:
            return
        now = time.monotonic()
        cold = now - self.last_overhead_mono > OVERHEAD_GAP_S
        self.last_overhead_mono = now
        if cold:
            self.overheads_s.clear()
            self.floors_s.clear()
            return
        late = left_s - hold_s if left_s - hold_s > LATE_SLACK_S else 0.0
        self.overheads_s.append(max(rtt_s - tail_s - bits / rate_bps - late, 0.0))
        self.floors_s.append(left_s if late else 0.0)

    @property
    def overhead_s(self) -> float | None:
        """Median of the recent overheads (a slow CPU's throttling makes single ones spiky);
        None until there are MIN_OVERHEAD_SAMPLES."""
        return _median(self.overheads_s)

    @property
    def floor_s(self) -> float | None:
        """Median of the recent floors: the least time a frame takes to leave."""
        return _median(self.floors_s)

    def predict(self, key: str, bits: float, rate_bps: float | None) -> float | None:
        """Expected round trip of a frame of `bits` now; None with nothing to go on.

        The smoothed round trip of earlier replies, plus the extra time the frame needs when
        the sensed rate has fallen since (and less when it rose).
        """
        rtt = self.rtt_s.get(key)
        then = self.rtt_rate.get(key)
        if rtt is None:
            return None if rate_bps is None else bits / rate_bps
        if rate_bps is None or then is None:
            return rtt
        return max(rtt + bits / rate_bps - bits / then, bits / rate_bps)


def _median(samples: deque[float]) -> float | None:
    return statistics.median(samples) if len(samples) >= MIN_OVERHEAD_SAMPLES else None
