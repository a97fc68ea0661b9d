"""The gateway's on-device fallback as the coordinator plans it: which variant, and its reserve."""

from __future__ import annotations

import numpy as np

from edgetok.agent.coordinator.model import Environment, OptionTable
from edgetok.agent.coordinator.solver import TIE_ATOL
from edgetok.control import FALLBACK_MARGIN, FALLBACK_SLACK_S


def fallback_option(table: OptionTable, env: Environment) -> int:
    """The on-device option a gateway runs when the server cannot answer in time.

    The least distortion among those that finish within the deadline at f_max (the gateway
    raises its clock for a fallback run), the fewest cycles breaking ties; when none does,
    simply the fastest. One per gateway, whatever the transmitting option.
    """
    dev = np.flatnonzero(~table.transmits)
    c = table.c_head[dev]
    run_s = c * env.compute_scale / env.f_max_hz + env.local_wait_s
    ok = dev[run_s <= env.deadline_s]
    if ok.size == 0:
        return int(dev[np.argmin(c)])
    order = np.lexsort((table.c_head[ok], np.round(table.distortion[ok] / TIE_ATOL)))
    return int(ok[order[0]])


def fallback_reserve(table: OptionTable, env: Environment, fallback: int | None = None,
                     margin: float = FALLBACK_MARGIN, run_s: float | None = None,
                     deadline_s: float | None = None) -> np.ndarray:
    """Per option, the time the gateway keeps back for its fallback (s): `margin` x its run
    plus FALLBACK_SLACK_S.

    A reply after deadline - reserve is abandoned, so planning with it folded into the
    server-side latency never chooses a transmission the gateway would give up on. The
    run is `run_s`, the gateway's own measure, when given, else the model's at f_max. A
    reserve as long as the deadline is no reserve: the gateway keeps nothing back then,
    and neither does the plan. The gateway holds it against the real deadline, which
    `deadline_s` gives (default: the plan's, env.deadline_s): held against the plan's
    share, a reserve between the two was planned as none while the gateway kept it, cut
    the server's reply off, and ran the fallback every window.
    """
    if run_s is None:
        fb = fallback_option(table, env) if fallback is None else fallback
        run_s = float(table.c_head[fb]) * env.compute_scale / env.f_max_hz
    reserve = margin * run_s + FALLBACK_SLACK_S
    limit = env.deadline_s if deadline_s is None else deadline_s
    useful = table.transmits & (reserve < limit)
    return np.asarray(np.where(useful, reserve, 0.0))
