"""Prometheus metrics and health of the edge server: /metrics, /readyz and systemd's watchdog."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from edgetok import __version__, sdnotify

if TYPE_CHECKING:
    from edgetok.agent.server import TailServer

log = logging.getLogger(__name__)

# Tail compute buckets, in seconds: a pruned tail on a server CPU takes about a millisecond,
# an unpruned one under load can take a good part of a second; past that the gateway's
# deadline has long passed anyway.
TAIL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Queued frames with no frame finished for this long count as a stalled server: readiness
# fails and watchdog pings stop. A tail is milliseconds; the floor covers a first session load.
STALL_S = 30.0


class _StateCollector(Collector):
    """Reads the server's counters and state at scrape time."""

    def __init__(self, srv: TailServer) -> None:
        self.srv = srv

    def collect(self) -> Iterator[Metric]:
        """Every state-derived family, read now."""
        srv = self.srv
        c = srv.counters
        info = InfoMetricFamily("edgetok_server", "Server id, version and group.")
        info.add_metric([], {"server": srv.cfg.id, "version": __version__,
                             "group": srv.cfg.group})
        yield info
        for name, value, doc in (
                ("edgetok_server_frames_received", c["frames"], "Feature frames taken in."),
                ("edgetok_server_replies", c["replies"], "Tail replies published."),
                ("edgetok_server_frames_expired", c["expired"], "Frames dropped because the "
                 "time their gateway had left when it sent them passed while they waited here."),
                ("edgetok_server_errors", c["errors"], "Frames that failed to decode or run."),
                ("edgetok_server_tail_busy_seconds", srv.busy_s, "Time spent computing tails."),
                ("edgetok_mqtt_connects", srv.session.connects, "Successful broker connects."),
                ("edgetok_coordinator_decisions", srv.decisions, "Decisions published."),
                ("edgetok_coordinator_telemetry_rejected", srv.telemetry_rejected,
                 "Telemetry reports that failed validation."),
                ("edgetok_coordinator_solve_errors",
                 srv.controller.solve_errors if srv.controller else 0, "Solves that failed; "
                 "the gateway's estimates were dropped.")):
            yield CounterMetricFamily(name, doc, value=float(value))
        wait = srv.queue_wait_ms
        checks = srv.health.checks()
        for name, gauge, doc in (
                ("edgetok_server_queue_depth", srv.queue.qsize(), "Frames waiting for a "
                 "tail worker."),
                ("edgetok_server_queue_capacity", srv.queue.maxsize, "Queue size at which the "
                 "MQTT pump waits (the broker holds the backlog)."),
                ("edgetok_server_queue_wait_seconds", None if wait is None else wait / 1000,
                 "Smoothed time a frame waits for a worker."),
                ("edgetok_server_bundles", len(srv.runtimes), "Bundles loaded."),
                ("edgetok_mqtt_connected", srv.session.connected.is_set(),
                 "1 while connected to the broker."),
                ("edgetok_ready", all(checks.values()), "1 when /readyz answers 200."),
                ("edgetok_start_time_seconds", srv.started, "Start time, Unix seconds.")):
            if gauge is not None:
                yield GaugeMetricFamily(name, doc, value=float(gauge))


class ServerMetrics:
    """The server's own registry (never the global one), exported at GET /metrics."""

    def __init__(self, srv: TailServer) -> None:
        self.registry = CollectorRegistry()
        self.tail = Histogram("edgetok_server_tail_latency_seconds", "Tail compute time per "
                              "frame.", buckets=TAIL_BUCKETS, registry=self.registry)
        self.registry.register(_StateCollector(srv))
        ProcessCollector(registry=self.registry)

    def on_tail(self, seconds: float) -> None:
        """A tail was computed."""
        self.tail.observe(seconds)


class ServerHealth:
    """Readiness, stall detection and the systemd conversation of the edge server."""

    def __init__(self, srv: TailServer) -> None:
        self.srv = srv
        self._mark: int | None = None
        self._progress_mono = time.monotonic()
        self.watchdog = sdnotify.Watchdog(self.healthy)

    def healthy(self) -> bool:
        """False once queued frames have waited `STALL_S` with no frame finished."""
        done = self.srv.counters["frames"]
        now = time.monotonic()
        if done != self._mark or self.srv.queue.empty():
            self._mark, self._progress_mono = done, now
        return now - self._progress_mono < STALL_S

    def checks(self) -> dict[str, bool]:
        """Readiness checks by name."""
        srv = self.srv
        return {"broker_connected": srv.session.connected.is_set(),
                "bundles_loaded": bool(srv.runtimes),
                "queue_has_room": not srv.queue.full(),
                "workers_progressing": self.healthy()}

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        srv = self.srv
        if not srv.session.connected.is_set():
            return f"waiting for broker {srv.cfg.mqtt.host}:{srv.cfg.mqtt.port}"
        c = srv.counters
        return (f"{c['frames']} frames, {c['replies']} replies, {c['expired']} expired, "
                f"queue {srv.queue.qsize()}")

    async def run(self) -> None:
        """READY=1 once the broker is connected (bundles load at start), then STATUS= and
        health-driven WATCHDOG=1 until cancelled."""
        srv = self.srv

        def ready() -> str:
            return f"broker connected; bundles {', '.join(sorted(srv.runtimes))} loaded"

        def sent() -> None:
            log.info("ready: broker connected, %d bundle(s) loaded", len(srv.runtimes))

        await sdnotify.lifecycle(srv.session.connected, ready, self.summary, self.watchdog,
                                 on_ready=sent)

    def stopping(self) -> None:
        """Tell systemd the stop has begun."""
        sdnotify.notify(sdnotify.STOPPING, sdnotify.status("stopping"))
