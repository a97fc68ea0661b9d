"""The coordinator benchmark's model of the gateway's device fallback (gateway/inference.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from coordinator import GatewaySide

from edgetok.gateway.inference import FALLBACK_MARGIN, PROBE_INTERVAL_S

DEADLINE = 1.0
HEAD = 0.1
TX = 0.3
P = 0.05


def _side() -> GatewaySide:
    """A gateway whose reserve is a fixed fraction of the deadline (no slack)."""
    return GatewaySide(slack_s=0.0)


def test_reply_before_cutoff_is_not_a_fallback() -> None:
    """A reply in time keeps the split result and its full transmit energy."""
    side = _side()
    reserve = side.reserve_s("dev", 200.0)
    assert reserve == pytest.approx(0.2 * FALLBACK_MARGIN)
    lat = DEADLINE - reserve - 0.01
    end, radio_j, fell, _ = side.window(0.0, HEAD, lat, TX, P, reserve, DEADLINE, 0.0)
    assert (end, fell, side.server_ok) == (lat, False, True)
    assert radio_j == pytest.approx(P * TX)


def test_late_reply_gives_up_at_cutoff_and_skips_server_until_probe() -> None:
    """Past the cutoff: give up there, pay the radio until then, then skip the server."""
    side = _side()
    reserve = 0.5
    cutoff = DEADLINE - reserve
    end, radio_j, fell, _ = side.window(0.0, HEAD, DEADLINE * 2, TX, P, reserve, DEADLINE,
                                        0.0)
    assert fell and end == pytest.approx(cutoff) and not side.server_ok
    assert radio_j == pytest.approx(P * min(TX, cutoff - HEAD))
    # Within the probe interval the next window sends nothing, even on a good link, and
    # does not spend its head either: it goes straight to the fallback.
    end, radio_j, fell, ran = side.window(PROBE_INTERVAL_S / 2, HEAD, 0.2, TX, P, reserve,
                                          DEADLINE, 0.0)
    assert fell and not ran and end == 0.0 and radio_j == 0.0
    # After it (counted from the send, after the head), the gateway probes the server again
    # and recovers on a timely reply.
    end, radio_j, fell, _ = side.window((HEAD + PROBE_INTERVAL_S) * 1.01, HEAD, 0.2, TX, P,
                                        reserve, DEADLINE, 0.0)
    assert not fell and side.server_ok and radio_j == pytest.approx(P * TX)


def test_reserve_beyond_deadline_gives_the_server_the_whole_deadline() -> None:
    """When a fallback could not make the deadline, nothing is kept back from the server."""
    side = GatewaySide(slack_s=DEADLINE)
    reserve = side.reserve_s("dev", 1.0)
    assert reserve >= DEADLINE
    end, radio_j, fell, _ = side.window(0.0, HEAD, 0.2, TX, P, reserve, DEADLINE, 0.0)
    assert not fell and end == pytest.approx(0.2) and radio_j == pytest.approx(P * TX)
    # A reply later than the deadline is given up at the deadline itself.
    end, radio_j, fell, _ = side.window(0.0, HEAD, DEADLINE * 2, TX, P, reserve, DEADLINE,
                                        0.0)
    assert fell and end == pytest.approx(DEADLINE)


def test_reserve_follows_measured_run_time() -> None:
    """The reserve uses the smoothed measured run time once the fallback has run."""
    side = _side()
    side.ran("dev", 100.0)
    side.ran("dev", 200.0)
    smoothed = 0.8 * 100.0 + 0.2 * 200.0
    assert side.reserve_s("dev", 1.0) == pytest.approx(smoothed / 1000 * FALLBACK_MARGIN)


def test_sensed_slow_link_skips_the_server_before_the_head() -> None:
    """A window whose sensed path overruns the cutoff goes to the device at once."""
    side = _side()
    reserve = 0.2
    cutoff = DEADLINE - reserve
    end, radio_j, fell, ran = side.window(0.0, HEAD, 0.3, TX, P, reserve, DEADLINE,
                                          guess_s=cutoff * 1.01)
    assert (end, radio_j, fell, ran) == (0.0, 0.0, True, False)
    # Skipping for the link does not mark the server down: a good link sends again at once.
    assert side.server_ok
    end, radio_j, fell, ran = side.window(0.05, HEAD, 0.3, TX, P, reserve, DEADLINE,
                                          guess_s=0.3)
    assert not fell and ran and end == pytest.approx(0.3)


def test_guard_margin_applies_near_the_cutoff() -> None:
    """A guess just under the cutoff, within GUARD_MARGIN, is already skipped."""
    from edgetok.control import GUARD_MARGIN

    side = _side()
    cutoff = DEADLINE - 0.2
    near = cutoff / (1 + GUARD_MARGIN / 2)
    assert near < cutoff
    _, _, fell, ran = side.window(0.0, HEAD, near, TX, P, 0.2, DEADLINE, guess_s=near)
    assert fell and not ran
