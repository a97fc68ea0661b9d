"""Prometheus metrics of the gateway, in a registry of its own, exported at GET /metrics."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from edgetok import __version__
from edgetok.gateway.models import Where

if TYPE_CHECKING:
    from edgetok.gateway.daemon import Gateway
    from edgetok.gateway.models import Result

STAGES = ("queue", "head", "uplink", "tail", "total")
# Stage latency buckets, in seconds: from a 1 ms head on a desktop to a 10 s deadline on a
# congested link. More buckets cost one series each per stage; these 14 resolve the deadline
# region (0.1-2.5 s) finely enough for a useful histogram_quantile().
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)
PRECISION_BITS = {"fp32": 32, "fp16": 16, "int8": 8}

Listener = Callable[["Result"], None]

# The *_created series double the output for a value Prometheus itself does not use; the
# switch is process-wide, which is right for a daemon that exports one registry.
disable_created_metrics()


class _StateCollector(Collector):
    """Reads the daemon's counters and state at scrape time (nothing to keep in sync)."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def _counters(self) -> Iterator[Metric]:
        gw = self.gw
        c = gw.counters
        up = gw.inferencer.uplink
        for name, value, doc in (
                ("edgetok_messages_received", c["messages"], "MQTT messages taken in."),
                ("edgetok_readings", c["readings"], "Readings journaled."),
                ("edgetok_windows", c["windows"], "Windows closed and handed to inference."),
                ("edgetok_duplicates", c["duplicates"], "Readings, windows or results "
                 "ignored as already seen."),
                ("edgetok_mqtt_connects", gw.session.connects, "Successful broker connects."),
                ("edgetok_uplink_frames_sent", up.frames_sent, "Feature frames published."),
                ("edgetok_uplink_sent_bytes", up.bytes_sent, "Feature frame bytes published."),
                ("edgetok_device_fallbacks", up.fallbacks, "Windows that fell back to the "
                 "on-device variant."),
                ("edgetok_link_guarded", up.guarded, "Windows run on the device because the "
                 "sensed uplink could not carry them by their deadline (included in "
                 "device_fallbacks)."),
                ("edgetok_late_replies", up.replies_late, "Server replies that came after "
                 "their window's deadline."),
                ("edgetok_server_probes", up.probes_sent, "Server probes published (tokens of "
                 "windows done on the device, sent for the round trip only)."),
                ("edgetok_server_probe_bytes", up.probe_bytes, "Server probe frame bytes "
                 "published (not in uplink_sent_bytes)."),
                ("edgetok_server_probes_lost", up.probes_lost, "Server probes with no reply "
                 "in time.")):
            yield CounterMetricFamily(name, doc, value=value)

    def _gauges(self) -> Iterator[Metric]:
        gw = self.gw
        checks = gw.health.checks()
        for name, value, doc in (
                ("edgetok_windows_inflight", len(gw.inflight), "Windows being inferred."),
                ("edgetok_windows_open", sum(len(b.open) for b in gw.buffers.values()),
                 "Windows still collecting readings."),
                ("edgetok_journal_backlog_readings", gw.store.journal_rows,
                 "Readings journaled and not yet pruned."),
                ("edgetok_journal_capacity_readings", gw.cfg.journal.max_rows,
                 "Journal size at which ingest stops acknowledging (backpressure)."),
                ("edgetok_mqtt_connected", gw.session.connected.is_set(),
                 "1 while connected to the broker."),
                ("edgetok_uplink_server_up", gw.inferencer.uplink.server_ok,
                 "0 after a missed deadline, until the edge server answers again."),
                ("edgetok_ready", all(checks.values()), "1 when /readyz answers 200."),
                ("edgetok_start_time_seconds", gw.started, "Start time, Unix seconds.")):
            yield GaugeMetricFamily(name, doc, value=float(value))
        ready = GaugeMetricFamily("edgetok_ready_check", "Readiness checks, 1 when passing.",
                                  labels=["check"])
        for check, ok in checks.items():
            ready.add_metric([check], float(ok))
        yield ready
        head = GaugeMetricFamily("edgetok_head_median_seconds", "Head compute time per "
                                 "variant: median of its last runs.", labels=["variant"])
        for variant, ms in sorted(gw.inferencer.head_ms.items()):
            head.add_metric([variant], ms / 1000)
        yield head

    def _decision(self) -> Iterator[Metric]:
        gw = self.gw
        dec = gw.inferencer.decision
        v = gw.manifest.variant(dec.variant)
        info = InfoMetricFamily("edgetok_decision", "The decision in force.")
        info.add_metric([], {"variant": dec.variant, "precision": dec.precision,
                             "source": dec.source})
        yield info
        extra = dec.extra
        for name, value, doc in (
                ("edgetok_decision_split_layers", v.split, "Layers run on the device."),
                ("edgetok_decision_pruning_ratio", v.pruning_ratio, "Pruning ratio."),
                ("edgetok_decision_feature_bits", PRECISION_BITS.get(dec.precision, 0),
                 "Bits per feature value on the uplink."),
                ("edgetok_decision_sequence", dec.seq, "Sequence number of the decision "
                 "(0: from the config)."),
                ("edgetok_decision_cpu_hertz", extra.get("cpu_hz"), "CPU clock chosen."),
                ("edgetok_decision_tx_power_watts", extra.get("tx_power_w"),
                 "Transmit power chosen."),
                ("edgetok_decision_predicted_latency_seconds",
                 _ms(extra.get("predicted_latency_ms")), "Coordinator's predicted latency.")):
            if isinstance(value, int | float):
                yield GaugeMetricFamily(name, doc, value=float(value))

    def collect(self) -> Iterator[Metric]:
        """Every state-derived family, read now."""
        gw = self.gw
        info = InfoMetricFamily("edgetok_gateway", "Gateway id, version and bundle.")
        info.add_metric([], {"gateway": gw.cfg.id, "version": __version__,
                             "bundle": gw.manifest.bundle_id})
        yield info
        yield from self._counters()
        yield from self._gauges()
        yield from self._decision()


def _ms(value: object) -> float | None:
    return value / 1000 if isinstance(value, int | float) else None


class GatewayMetrics:
    """Receives events from the daemon; exported at GET /metrics."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        # One registry per gateway, never the global one: two gateways in one process (tests)
        # must not share or collide on series.
        self.registry = CollectorRegistry()
        self.results = Counter("edgetok_results", "Results stored, by where they were "
                               "computed.", ["where"], registry=self.registry)
        self.deadletters = Counter("edgetok_deadletters", "Rejected inputs and failed "
                                   "windows, by reason.", ["reason"], registry=self.registry)
        self.refused = Counter("edgetok_publish_refused", "Results and dead letters the "
                               "broker (or the client, for size) refused; each is parked "
                               "unpublished and not sent again.", ["kind", "reason"],
                               registry=self.registry)
        self.latency = Histogram("edgetok_stage_latency_seconds", "Time per pipeline stage "
                                 "of each result.", ["stage"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        for where in get_args(Where):  # zero series exist from the start, so rate() works
            self.results.labels(where)
        for stage in STAGES:
            self.latency.labels(stage)
        self.registry.register(_StateCollector(gw))
        ProcessCollector(registry=self.registry)
        self.listeners: list[Listener] = []
        self.last_result_mono: float | None = None

    def on_result(self, result: Result) -> None:
        """A result was stored."""
        self.results.labels(result.where).inc()
        lat = result.latency_ms
        stages = {"queue": lat.queue, "head": lat.head, "total": lat.total}
        if result.where in ("split", "server"):  # only these crossed the link
            stages.update(uplink=lat.uplink, tail=lat.tail)
        for stage, ms in stages.items():
            self.latency.labels(stage).observe(ms / 1000)
        self.last_result_mono = time.monotonic()
        for listener in self.listeners:
            listener(result)

    def on_refused(self, kind: str, reason: str) -> None:
        """A stored result or dead letter was refused by the broker, and parked."""
        self.refused.labels(kind, reason).inc()

    def on_deadletter(self, reason: str) -> None:
        """An input was rejected."""
        self.deadletters.labels(reason).inc()
