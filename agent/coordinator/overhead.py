"""What a frame costs beside its bits at r(p) and the server: per-frame overhead and floor.

A gateway that senses its link rate reports the part of a reply's round trip that is
neither airtime nor the server's tail (encoding, publishing, broker hops), and how long its
frames took to leave when that was longer than their radio hold (`Telemetry`).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable

import numpy as np

from edgetok.agent.coordinator.estimates import relaxed
from edgetok.agent.coordinator.model import Environment, OptionTable, rate_bps
from edgetok.agent.coordinator.state import GatewayState


def frame_overhead(st: GatewayState, fleet: Iterable[GatewayState], table: OptionTable,
                   env: Environment, now: float, stale_after_s: float) -> np.ndarray:
    """Per option, the per-frame overhead and the part of the floor its airtime does not
    cover (s).

    The gateway's own figures while fresh; before it has sent a frame, the fleet's
    (`fleet_overhead`); once stale, relaxed toward the fleet's, so a gateway that stopped
    sending after a slow spell tries the server again. A 10% gateway's frames wait ~9 ms
    for its CPU quota however small they are (e2e run 19), and that wait runs inside a
    longer frame's airtime: one overhead added to every frame planned the uplink at 35 ms
    where it took 18 (run 18's Pi trace at 0.5 Mbit/s), and kept the gateway on its device.
    The airtime is taken at full power: a lower one only hides more of the floor.
    """
    if st.overhead_in_rate:
        return np.zeros(len(table.options))
    overhead, floor = st.frame_overhead_s, st.frame_floor_s
    if now - st.last_overhead_ts > stale_after_s:
        fleet_overhead_s, fleet_floor_s = fleet_overhead(st, fleet, now, stale_after_s)
        args = (st.last_overhead_ts, now, stale_after_s)
        overhead = relaxed(overhead, fleet_overhead_s, *args)
        floor = relaxed(floor, fleet_floor_s, *args)
    airtime = table.bits / np.maximum(rate_bps(env.p_max_w, env), 1e-300)
    return np.asarray(overhead + np.maximum(floor - airtime, 0.0))


def fleet_overhead(st: GatewayState, fleet: Iterable[GatewayState], now: float,
                   stale_after_s: float) -> tuple[float, float]:
    """The median fresh per-frame overhead and floor of the other gateways (s); 0 when
    there is none.

    The broker's hops and the server's share of a reply are common to every gateway of this
    server, so a newcomer need not probe the server near a tie just to learn them (16
    gateways starting at once each did). With nothing to go on, optimism: an untried path
    must get tried, or it is never measured.
    """
    fresh = [o for o in fleet if o is not st and not o.overhead_in_rate
             and now - o.last_overhead_ts <= stale_after_s]
    if not fresh:
        return 0.0, 0.0
    return (statistics.median(o.frame_overhead_s for o in fresh),
            statistics.median(o.frame_floor_s for o in fresh))
