"""The gateway daemon: one TaskGroup wiring MQTT, journal, windows, inference and HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from pathlib import Path

from pydantic import TypeAdapter

from edgetok import __version__
from edgetok.aio import stop_on_signals, wait_event
from edgetok.frames import FrameError, TailReply
from edgetok.gateway.actuators import Actuators
from edgetok.gateway.config import GatewayConfig, StreamConfig
from edgetok.gateway.controlplane import ControlPlane
from edgetok.gateway.decode import Router
from edgetok.gateway.health import Health
from edgetok.gateway.inference import Decision, InferenceError, Inferencer
from edgetok.gateway.ingest import Ingest
from edgetok.gateway.metrics import GatewayMetrics
from edgetok.gateway.store import Store
from edgetok.gateway.windows import ClosedWindow, WindowBuffer
from edgetok.models.runtime import Runtime
from edgetok.mqttlink import InMessage, MqttSession, Outgoing
from edgetok.tokenizers import TokenizeError, Tokenizer, TokenizerConfig
from edgetok.topics import Topics

log = logging.getLogger(__name__)

# How often open windows are checked against the idle rule.
CLOSE_TICK_S = 0.05
# Grace for in-flight windows and unpublished results on shutdown, beyond the deadlines.
DRAIN_GRACE_S = 5.0
# Results and dead letters read per publisher pass; each is published and marked in turn.
PUBLISH_BATCH = 200
# Results deleted per retention step (one transaction), and the pause between steps, so
# that deleting a backlog of old results never holds the event loop for long.
RETENTION_BATCH = 500
RETENTION_PAUSE_S = 0.05
# How often retention looks for old results when there was nothing to delete.
RETENTION_TICK_S = 10.0
# A journal smaller than this many windows' worth of readings per stream risks windows that
# can never complete before backpressure engages (they are then closed short); warn.
MIN_JOURNAL_WINDOWS = 4


class Gateway:
    """State and tasks of one gateway process."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.mqtt.prefix, cfg.id)
        self.store = Store(cfg.state_dir / "edgetok.db", cfg.journal.synchronous)
        requeued = self.store.requeue_refused()
        if requeued:
            log.info("%d result(s) and dead letter(s) the broker refused get another try",
                     requeued)
        self.runtime = Runtime(cfg.bundle.path, threads=cfg.bundle.threads,
                               max_sessions=cfg.bundle.max_sessions,
                               share_weights=cfg.bundle.share_weights,
                               preload=[cfg.decision.variant])
        self.manifest = self.runtime.manifest
        self.manifest.variant(cfg.decision.variant)  # fail early on a wrong variant id
        self.streams = {s.name: s for s in cfg.streams}
        self.tokenizers = {s.name: self._tokenizer(s) for s in cfg.streams}
        for s in cfg.streams:
            old = self.store.use_grid(s.name, s.grid)
            if old is not None:
                log.warning("stream %s: window grid changed from %s to %s; its windows start "
                            "afresh (earlier results stay readable)", s.name, old, s.grid)
        self.buffers = {s.name: WindowBuffer(s, *self.store.window_marks(s.name))
                        for s in cfg.streams}
        if cfg.journal.max_rows < MIN_JOURNAL_WINDOWS * sum(s.window for s in cfg.streams):
            log.warning("journal.max_rows=%d holds fewer than %d windows per stream; under "
                        "backpressure windows may close short", cfg.journal.max_rows,
                        MIN_JOURNAL_WINDOWS)
        self.inflight: dict[tuple[str, int], float] = {}
        self.results_ready = asyncio.Event()
        self.no_inflight = asyncio.Event()
        self.no_inflight.set()
        self.stopping = asyncio.Event()
        self.counters: dict[str, int] = {"messages": 0, "readings": 0, "windows": 0,
                                         "results": 0, "deadletters": 0, "duplicates": 0,
                                         "duplicate_messages": 0, "late_readings": 0,
                                         "backpressure_events": 0, "windows_rerun": 0,
                                         "journal_peak_rows": 0, "results_refused": 0,
                                         "deadletters_refused": 0, "results_pruned": 0}
        self.started = time.time()
        decision = Decision(cfg.decision.variant, cfg.decision.precision)
        self.session = MqttSession(
            cfg.mqtt, cfg.mqtt.client_id or f"edgetok-gw-{cfg.id}",
            password=cfg.mqtt_password(),
            subscriptions=[t for s in cfg.streams for t in s.topics] + [self.topics.downlink]
            + ([self.topics.control] if cfg.decision.follow_coordinator else [])
            + list(cfg.unclaimed_topics),
            will=Outgoing(self.topics.status, self._status_payload("offline")),
            on_connect=[Outgoing(self.topics.status, self._status_payload("online"))],
            on_message=self._on_message,
            # A filter dropped from the config is unsubscribed from the broker's session,
            # which would otherwise keep delivering it.
            subscriptions_file=cfg.state_dir / "mqtt-subscriptions.json")
        self.ingest = Ingest(self.store, self.session, Router(cfg.streams), self.buffers,
                             self.counters, cfg.journal, self._deadletter, self._close_due)
        self.inferencer = Inferencer(cfg.id, self.runtime, self.tokenizers,
                                     self._publish_frame, decision,
                                     cfg.state_dir / "probe-calibration.json")
        if cfg.decision.follow_coordinator:
            self.inferencer.server_probe_every_s = cfg.server_probe_interval_s
        self.control = ControlPlane(self, Actuators(cfg.actuators))
        self.metrics = GatewayMetrics(self)
        self.health = Health(self)
        self.tg: asyncio.TaskGroup | None = None
        self.http_port = cfg.http.port
        self._own = self.topics.prefix + "/"  # every edgetok topic, ours or a peer's

    def _tokenizer(self, s: StreamConfig) -> Tokenizer:
        conf = s.tokenizer or TypeAdapter(TokenizerConfig).validate_python(
            self.manifest.input.tokenizer)
        return conf.build()

    def _status_payload(self, state: str) -> bytes:
        return json.dumps({"state": state, "gateway": self.cfg.id, "version": __version__,
                           "bundle": self.manifest.bundle_id, "ts": time.time(),
                           "streams": sorted(self.streams),
                           "capabilities": ["split", "device-fallback", "int8", "fp16"]}
                          ).encode()

    @property
    def inbox(self) -> asyncio.Queue[InMessage]:
        """Sensor messages from MQTT, waiting for ingest."""
        return self.ingest.inbox

    @property
    def pending(self) -> deque[InMessage]:
        """Messages ingest took from the inbox but has not journaled yet."""
        return self.ingest.pending

    # MQTT in ----------------------------------------------------------------------------
    async def _on_message(self, msg: InMessage) -> None:
        if not msg.topic.startswith(self._own):  # sensor input: the bulk of all messages
            await self.inbox.put(msg)
            return
        if msg.topic == self.topics.downlink:
            self.session.ack(msg)
            try:
                self.inferencer.on_reply(TailReply.decode(msg.payload))
            except FrameError as exc:
                log.warning("bad downlink message: %s", exc)
            return
        if msg.topic == self.topics.control:
            self.session.ack(msg)
            self.control.on_control(msg.payload)  # applied in its own task, newest first
            return
        # Our own and our peers' output, caught by a broad unclaimed_topics filter:
        # dead-lettering it would publish a dead letter that is caught again, forever.
        self.session.ack(msg)

    def _deadletter(self, topic: str, reason: str, detail: str, payload: bytes) -> None:
        """Record a rejected input in the database; the publisher sends it on MQTT."""
        self.store.add_deadletter(topic, reason, detail, payload)
        self.counters["deadletters"] += 1
        self.metrics.on_deadletter(reason)
        self.results_ready.set()
        log.info("dead letter from %s: %s (%s)", topic, reason, detail)

    # windows -----------------------------------------------------------------------------
    def _deaf(self) -> bool:
        """Whether readings cannot reach us now, so a silent stream is not idle."""
        if not self.session.connected.is_set():
            return True
        if self.ingest.backpressure_since is None:
            return False
        # Backpressured with nothing in flight: no window will free room, so let the idle
        # rule close windows (short) rather than wait forever.
        return bool(self.inflight) or self.store.journal_rows < self.cfg.journal.max_rows

    def _close_due(self) -> None:
        """Close the windows that are due, as far as inference slots allow."""
        now = time.monotonic()
        deaf = self._deaf()
        due: list[ClosedWindow] = []
        room = self.cfg.max_inflight_windows - len(self.inflight)
        for buf in self.buffers.values():
            if deaf:
                buf.hold_idle(now)
            for k in buf.due(now):
                if len(due) >= room:
                    break  # the rest stay open (and journaled) until a slot frees
                due.append(buf.close(k, now))
        if due:
            # One commit for all their records: one each (an fsync under FULL) would stall
            # the loop, and ingest with it, once per window.
            with self.store.tx():
                for win in due:
                    self._dispatch(win)

    def _dispatch(self, win: ClosedWindow) -> None:
        if self.store.has_result(win.stream, win.seq):
            self.counters["duplicates"] += 1
            return
        self.store.close_window(win.stream, win.seq)
        self.inflight[(win.stream, win.seq)] = win.start_ts
        self.no_inflight.clear()
        self.counters["windows"] += 1
        assert self.tg is not None
        self.tg.create_task(self._process(win))

    async def _closer(self) -> None:
        while True:
            await asyncio.sleep(CLOSE_TICK_S)
            self._close_due()

    async def _process(self, win: ClosedWindow) -> None:
        """Infer one window and store its result; failures become dead letters, not crashes."""
        stream = self.streams[win.stream]
        try:
            result = await self.inferencer.infer(win, stream.deadline_ms / 1000)
        except Exception as exc:  # one bad window must never take the daemon down
            if isinstance(exc, TokenizeError | InferenceError):
                reason, detail = exc.reason, exc.detail
            else:
                reason, detail = "inference_error", f"{type(exc).__name__}: {exc}"
                log.exception("window %s/%d failed", win.stream, win.seq)
            with self.store.tx():
                self._deadletter(stream.topics[0], reason, f"window {win.seq}: {detail}", b"")
                self.store.drop_window(win.stream, win.seq)
            self._retire(win)
            return
        with self.store.tx():
            if self.store.add_result(result) is None:
                self.counters["duplicates"] += 1
            else:
                self.counters["results"] += 1
                self.control.on_result(result)
                self.metrics.on_result(result)
            self._retire(win)
        self.results_ready.set()

    def _retire(self, win: ClosedWindow) -> None:
        """Forget an in-flight window and prune journal readings nobody needs."""
        self.inflight.pop((win.stream, win.seq), None)
        if not self.inflight:
            self.no_inflight.set()
        keep = self.buffers[win.stream].keep_from()
        keep = min([keep] + [t for (s, _), t in self.inflight.items() if s == win.stream])
        self.store.prune(win.stream, keep)
        self.ingest.on_pruned()

    # MQTT out ----------------------------------------------------------------------------
    async def _publish_frame(self, frame: bytes, wait_s: float) -> bool:
        """Send a feature frame; the whole send, PUBACK included, stays within `wait_s`."""
        t_end = time.monotonic() + wait_s
        if not await wait_event(self.session.connected, wait_s):
            return False
        return bool(await self.session.publish(self.topics.uplink, frame, qos=1, wait_s=0,
                                               ack_s=t_end - time.monotonic()))

    async def _publish_stored(self) -> bool:
        """Publish unpublished results, then dead letters, oldest first; True if more wait.

        A row is marked published only after its PUBACK, so a crash or a lost connection in
        between publishes it again (at least once; consumers key on id or stream/window).
        A row the broker refuses (an ACL, a size limit) is parked instead, so that it does
        not hold up every row behind it, in both lanes, for good.
        """
        results = self.store.unpublished(limit=PUBLISH_BATCH)
        if not await self._drain("result", [
                (r.id, self.topics.results(r.stream), r.model_dump_json().encode())
                for r in results]):
            return False
        letters = self.store.unpublished_deadletters(PUBLISH_BATCH)
        if not await self._drain("deadletter", [(i, self.topics.deadletter, body)
                                                for i, body in letters]):
            return False
        return PUBLISH_BATCH in (len(letters), len(results))

    async def _drain(self, kind: str, rows: list[tuple[int, str, bytes]]) -> bool:
        """Publish (id, topic, body) rows in order; False once the link fails (retry later)."""
        for row_id, topic, body in rows:
            sent = await self.session.publish(topic, body, wait_s=1.0, warn=False)
            if sent:
                (self.store.mark_published if kind == "result"
                 else self.store.mark_deadletter_published)(row_id)
            elif sent.refused:
                (self.store.mark_refused if kind == "result"
                 else self.store.mark_deadletter_refused)(row_id, sent.reason)
                self.counters[f"{kind}s_refused"] += 1
                self.metrics.on_refused(kind, sent.reason)
                log.warning("%s %d refused on %s: %s; parked until the next start", kind,
                            row_id, topic, sent.reason)
            else:
                return False
        return True

    async def _publisher(self) -> None:
        """Publish stored results in order, at least once, whenever the broker is there."""
        while True:
            await wait_event(self.results_ready, 1.0)
            self.results_ready.clear()
            while await self._publish_stored():
                pass  # a full batch went out and more is waiting

    def _prune_results(self) -> int:
        """One retention step: delete a batch of old published results; how many went."""
        j = self.cfg.journal
        before = time.time() - j.keep_results_days * 86400 if j.keep_results_days else None
        gone = self.store.prune_results(before, j.max_results, RETENTION_BATCH)
        self.counters["results_pruned"] += gone
        return gone

    async def _retention(self) -> None:
        """Keep the results table bounded, a small batch at a time between other work."""
        while True:
            full = self._prune_results() == RETENTION_BATCH  # more wait: soon, not at once
            await asyncio.sleep(RETENTION_PAUSE_S if full else RETENTION_TICK_S)

    # recovery and lifecycle --------------------------------------------------------------
    def recover(self) -> int:
        """Rebuild open windows from the journal and re-run windows cut off by a crash."""
        rerun = 0
        for name, buf in self.buffers.items():
            for ts, vals in self.store.all_readings(name):
                buf.add(ts, vals)
        now = time.monotonic()
        for stream, seq in self.store.closed_windows():
            buf = self.buffers.get(stream)
            if buf is None or seq not in buf.open:
                # Its readings are gone (or the stream was removed from the config): say so
                # once, rather than carry the window forever.
                with self.store.tx():
                    self._deadletter(stream, "lost", f"window {seq} was in flight at the last "
                                     "stop but none of its readings are journaled", b"")
                    self.store.drop_window(stream, seq)
                if buf is not None:
                    buf.rerun.discard(seq)
                continue
            self._dispatch(buf.close(seq, now))
            rerun += 1
        self.counters["windows_rerun"] += rerun
        if rerun:
            log.info("recovered %d window(s) interrupted by the last stop", rerun)
        return rerun

    @property
    def ready(self) -> dict[str, bool]:
        return {"broker_connected": self.session.connected.is_set(), "bundle_loaded": True}

    async def run(self) -> None:
        """Run until `stopping` is set, then drain and exit."""
        from edgetok.gateway.http import serve

        # Bind first: a taken port is a plain start-up error, before any task exists.
        runner = await serve(self)
        async with asyncio.TaskGroup() as tg:
            self.tg = tg
            mqtt_task = tg.create_task(self.session.run())
            workers = [tg.create_task(c) for c in (self.ingest.run(), self._closer(),
                                                  self._publisher(), self.control.run(),
                                                  self._retention())]
            self.recover()
            health = tg.create_task(self.health.run())  # READY=1, STATUS=, WATCHDOG=1
            await self.stopping.wait()
            self.health.stopping()
            log.info("stopping: draining %d in-flight window(s)", len(self.inflight))
            workers[0].cancel()
            workers[1].cancel()
            limit = time.monotonic() + max(s.deadline_ms for s in self.cfg.streams) / 1000 \
                + DRAIN_GRACE_S
            await wait_event(self.no_inflight, max(limit - time.monotonic(), 0))
            self.results_ready.set()
            # The publisher marks rows in SQLite; polling it briefly is simpler than an event.
            while self.store.unpublished(1) and time.monotonic() < limit \
                    and self.session.connected.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            for w in workers[2:]:
                w.cancel()
            health.cancel()
            log.debug("stopping: HTTP")
            await runner.cleanup()
            log.debug("stopping: MQTT")
            await self.session.close(Outgoing(self.topics.status,
                                              self._status_payload("stopped")))
            await mqtt_task
        self.inferencer.close()
        self.store.close()


async def run_gateway(cfg: GatewayConfig) -> int:
    """Run a gateway until SIGTERM or SIGINT; 0 after a graceful drain."""
    from edgetok.gateway.compat import stream_problems
    from edgetok.gateway.http import preflight
    from edgetok.models.bundle import read_manifest
    from edgetok.settings import ConfigError

    preflight(cfg)  # an exposed API without a token is refused before anything starts
    problems = stream_problems(cfg.streams, read_manifest(cfg.bundle.path))
    if problems:  # else every window would fail at inference, with the daemon "ready"
        raise ConfigError("gateway config", problems)
    gw = Gateway(cfg)
    stop_on_signals(gw.stopping)
    await gw.run()
    return 0


def main(config: Path) -> int:
    """Entry point for `edgetok gateway`."""
    from edgetok.gateway.config import load

    return asyncio.run(run_gateway(load(config)))
