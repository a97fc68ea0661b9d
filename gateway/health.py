"""Readiness checks, stall detection and the systemd conversation (READY, STATUS, WATCHDOG)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from edgetok import sdnotify

if TYPE_CHECKING:
    from edgetok.gateway.daemon import Gateway

log = logging.getLogger(__name__)

# Pending work (in-flight windows, queued messages) with no progress for this long counts as
# a stalled pipeline: readiness fails and watchdog pings stop, so systemd restarts us. Every
# window ends within its deadline plus one on-device run, so a few deadlines is already
# abnormal; the floor keeps a slow first ONNX session load from looking like a hang.
STALL_FLOOR_S = 30.0
STALL_DEADLINES = 3.0


class Health:
    """What /readyz, /v1/status and the systemd watchdog agree 'healthy' means."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.stall_s = max(STALL_FLOOR_S, STALL_DEADLINES * max(
            s.deadline_ms for s in gw.cfg.streams) / 1000)
        self._mark: tuple[int, int, int] | None = None
        self._progress_mono = time.monotonic()
        self.watchdog = sdnotify.Watchdog(self.healthy)
        self.ready_sent = False

    def _pending(self) -> bool:
        gw = self.gw
        return bool(gw.inflight) or not gw.inbox.empty() or bool(gw.pending)

    def stalled_for(self) -> float:
        """Seconds pending work has gone without progress; 0 when idle or progressing."""
        c = self.gw.counters
        mark = (c["messages"], c["results"], c["deadletters"])
        now = time.monotonic()
        if mark != self._mark or not self._pending():
            self._mark, self._progress_mono = mark, now
            return 0.0
        return now - self._progress_mono

    def healthy(self) -> bool:
        """False once pending work has made no progress for `stall_s`."""
        return self.stalled_for() < self.stall_s

    def checks(self) -> dict[str, bool]:
        """Readiness checks by name; all True means ready to take traffic."""
        gw = self.gw
        return {**gw.ready,
                "journal_has_room": gw.store.journal_rows < gw.cfg.journal.max_rows,
                "pipeline_progressing": self.healthy()}

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        gw = self.gw
        dec = gw.inferencer.decision
        if not gw.session.connected.is_set():
            return f"waiting for broker {gw.cfg.mqtt.host}:{gw.cfg.mqtt.port}" + (
                f" ({gw.session.last_error})" if gw.session.last_error else "")
        refused = gw.session.refused_filters
        return (f"running {dec.variant} {dec.precision}; {gw.counters['results']} results, "
                f"{len(gw.inflight)} in flight, {gw.store.journal_rows} journaled" + (
                    f"; subscriptions refused: {', '.join(refused)}" if refused else ""))

    async def run(self) -> None:
        """READY=1 once the broker is connected (the bundle loaded at start), then STATUS=
        refreshes and health-driven WATCHDOG=1 pings until cancelled."""
        gw = self.gw

        def ready() -> str:
            return (f"broker connected; bundle {gw.manifest.bundle_id} loaded; "
                    f"HTTP on port {gw.http_port}")

        def sent() -> None:
            self.ready_sent = True
            log.info("ready: broker connected, bundle %s loaded", gw.manifest.bundle_id)

        await sdnotify.lifecycle(gw.session.connected, ready, self.summary, self.watchdog,
                                 on_ready=sent)

    def stopping(self) -> None:
        """Tell systemd the stop has begun (the drain may take a while)."""
        sdnotify.notify(sdnotify.STOPPING, sdnotify.status(
            f"stopping: draining {len(self.gw.inflight)} in-flight window(s)"))
