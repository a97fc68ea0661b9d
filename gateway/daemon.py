"""The gateway daemon: one TaskGroup wiring MQTT, journal, windows, inference and HTTP."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import time
from collections import deque
from pathlib import Path

from pydantic import TypeAdapter

from edgetok import __version__
from edgetok.aio import stop_on_signals, wait_event, within
from edgetok.frames import FrameError, TailReply
from edgetok.gateway.actuators import Actuators
from edgetok.gateway.config import GatewayConfig, StreamConfig
from edgetok.gateway.controlplane import ControlPlane
from edgetok.gateway.decode import DecodeError, Reading, Router
from edgetok.gateway.health import Health
from edgetok.gateway.inference import Decision, InferenceError, Inferencer
from edgetok.gateway.metrics import GatewayMetrics
from edgetok.gateway.store import Store
from edgetok.gateway.windows import ClosedWindow, WindowBuffer
from edgetok.models.runtime import Runtime
from edgetok.mqttlink import RECEIVE_MAXIMUM, InMessage, MqttSession, Outgoing
from edgetok.tokenizers import TokenizeError, Tokenizer, TokenizerConfig
from edgetok.topics import Topics

log = logging.getLogger(__name__)

# Messages journaled per transaction: group commit amortises the fsync over a burst. Half
# the Receive Maximum, so the broker can send the next batch while one is being committed.
INGEST_BATCH = RECEIVE_MAXIMUM // 2
# How long the first message of a batch waits for company while messages come in bursts
# (the last batch held more than one). Messages arrive a socket read at a time, and a fast
# stream would otherwise be committed a few at a time (one fsync each under
# synchronous=FULL). A trickle does not wait: its batches are single messages anyway, and
# the wait would be added to every window's latency. Longer: bigger batches under load.
INGEST_LINGER_S = 0.005
# How often open windows are checked against the idle rule.
CLOSE_TICK_S = 0.05
# Grace for in-flight windows and unpublished results on shutdown, beyond the deadlines.
DRAIN_GRACE_S = 5.0
# Results and dead letters read per publisher pass; each is published and marked in turn.
PUBLISH_BATCH = 200
# A journal smaller than this many windows' worth of readings per stream risks windows that
# can never complete before backpressure engages (they are then closed short); warn.
MIN_JOURNAL_WINDOWS = 4


class Gateway:
    """State and tasks of one gateway process."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.mqtt.prefix, cfg.id)
        self.store = Store(cfg.state_dir / "edgetok.db", cfg.journal.synchronous)
        self.runtime = Runtime(cfg.bundle.path, threads=cfg.bundle.threads,
                               max_sessions=cfg.bundle.max_sessions,
                               share_weights=cfg.bundle.share_weights,
                               preload=[cfg.decision.variant])
        self.manifest = self.runtime.manifest
        self.manifest.variant(cfg.decision.variant)  # fail early on a wrong variant id
        self.streams = {s.name: s for s in cfg.streams}
        self.tokenizers = {s.name: self._tokenizer(s) for s in cfg.streams}
        self.buffers = {s.name: WindowBuffer(s, *self.store.window_marks(s.name))
                        for s in cfg.streams}
        if cfg.journal.max_rows < MIN_JOURNAL_WINDOWS * sum(s.window for s in cfg.streams):
            log.warning("journal.max_rows=%d holds fewer than %d windows per stream; under "
                        "backpressure windows may close short", cfg.journal.max_rows,
                        MIN_JOURNAL_WINDOWS)
        self.router = Router(cfg.streams)
        # The broker sends at most Receive Maximum unacknowledged QoS 1 messages, so this
        # queue never fills from QoS 1 traffic and the MQTT pump never blocks on it.
        self.inbox: asyncio.Queue[InMessage] = asyncio.Queue(maxsize=2 * RECEIVE_MAXIMUM)
        self.pending: deque[InMessage] = deque()  # taken from the inbox, not yet journaled
        self.last_batch = 0  # messages in the last journal batch: >1 means a burst
        self.backpressure_since: float | None = None
        self.inflight: dict[tuple[str, int], float] = {}
        self.results_ready = asyncio.Event()
        self.room = asyncio.Event()
        self.no_inflight = asyncio.Event()
        self.no_inflight.set()
        self.stopping = asyncio.Event()
        self.counters: dict[str, int] = {"messages": 0, "readings": 0, "windows": 0,
                                         "results": 0, "deadletters": 0, "duplicates": 0,
                                         "duplicate_messages": 0, "late_readings": 0,
                                         "backpressure_events": 0, "windows_rerun": 0,
                                         "journal_peak_rows": 0}
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
            on_message=self._on_message)
        self.inferencer = Inferencer(cfg.id, self.runtime, self.tokenizers,
                                     self._publish_frame, decision)
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
            await self.control.on_control(msg.payload)
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

    def _accepts(self, stream: str, ts: float) -> bool:
        """Whether a reading at ts still belongs to an open-able window of the stream."""
        return self.buffers[stream].accepts(ts)

    def _admit(self, msg: InMessage, now: float) -> tuple[str, list[Reading]] | None:
        """Journal one message's readings (inside the caller's transaction), or say why not."""
        _, accepted = self._journal(deque([msg]), now, math.inf)
        return accepted[0] if accepted else None

    def _journal(self, queue: deque[InMessage], now: float, limit: float
                 ) -> tuple[list[InMessage], list[tuple[str, list[Reading]]]]:
        """Journal messages from the front of `queue` (inside the caller's transaction) until
        it is empty or the journal holds `limit` readings. Returns the messages taken and,
        per message accepted, its stream and readings. One query checks the batch for
        redeliveries and one statement journals its readings."""
        batch = list(itertools.islice(queue, INGEST_BATCH))
        digests = [self.store.digest(m.topic, m.payload) for m in batch]
        known = self.store.known(digests)
        taken: list[InMessage] = []
        accepted: list[tuple[str, list[Reading]]] = []
        new: list[bytes] = []
        rows: list[tuple[str, float, dict[str, float]]] = []
        base = self.store.journal_rows
        for msg, digest in zip(batch, digests, strict=True):
            if base + len(rows) >= limit:
                break  # the rest stay unacknowledged until there is room
            queue.popleft()
            taken.append(msg)
            self.counters["messages"] += 1
            if digest in known:
                # A QoS 1 redelivery (its PUBACK was lost) or a sensor's resend: expected,
                # so counted rather than dead-lettered, and never a second set of readings.
                self.counters["duplicate_messages"] += 1
                self.counters["duplicates"] += 1
                continue
            known.add(digest)  # the same message twice in one batch counts as a repeat too
            new.append(digest)
            try:
                stream, fresh, late = self.router.admit(msg.topic, msg.payload, self._accepts,
                                                        now)
            except DecodeError as exc:
                self._deadletter(msg.topic, exc.reason, exc.detail, msg.payload)
                continue
            if late:
                self.counters["late_readings"] += late
                self._deadletter(msg.topic, "late", f"{late} of {late + len(fresh)} "
                                 "reading(s) fall in windows already closed", msg.payload)
            rows.extend((stream.name, r.ts, r.values) for r in fresh)
            accepted.append((stream.name, fresh))
        self.store.remember(new)
        self.store.journal(rows)
        return taken, accepted

    async def _await_room(self) -> None:
        """Backpressure: while the journal is full, acknowledge nothing; drop nothing."""
        limit = self.cfg.journal.max_rows
        if self.store.journal_rows < limit or self.store.recount_journal() < limit:
            return
        self.backpressure_since = time.monotonic()
        self.counters["backpressure_events"] += 1
        log.warning("journal full (%d readings): not acknowledging until windows complete",
                    self.store.journal_rows)
        while self.store.journal_rows >= limit:
            self.room.clear()
            await self.room.wait()
        log.info("journal has room again after %.1fs", time.monotonic()
                 - self.backpressure_since)
        self.backpressure_since = None
        for buf in self.buffers.values():
            buf.hold_idle(time.monotonic())

    async def _gather_batch(self) -> None:
        """Top up the pending batch with what is queued, and in a burst with what arrives
        within INGEST_LINGER_S."""
        t_end = time.monotonic() + (INGEST_LINGER_S if self.last_batch > 1 else 0.0)
        while len(self.pending) < INGEST_BATCH:
            if not self.inbox.empty():
                self.pending.append(self.inbox.get_nowait())
                continue
            left = t_end - time.monotonic()
            if left <= 0:
                return
            try:
                self.pending.append(await within(self.inbox.get(), left))
            except TimeoutError:
                return

    async def _ingest(self) -> None:
        """Journal bursts of messages in one transaction, ack them, then buffer them."""
        limit = self.cfg.journal.max_rows
        while True:
            if not self.pending:
                self.pending.append(await self.inbox.get())
            await self._gather_batch()
            self.last_batch = len(self.pending)
            await self._await_room()
            with self.store.tx(durable=True):  # the PUBACKs below promise it is on disk
                done, accepted = self._journal(self.pending, time.time(), limit)
            for msg in done:  # only now is every message of the batch durable
                self.session.ack(msg)
            self.counters["journal_peak_rows"] = max(self.counters["journal_peak_rows"],
                                                     self.store.journal_rows)
            for name, readings in accepted:
                buf = self.buffers[name]
                for r in readings:
                    buf.add(r.ts, r.values)
                self.counters["readings"] += len(readings)
            self._close_due()

    # windows -----------------------------------------------------------------------------
    def _deaf(self) -> bool:
        """Whether readings cannot reach us now, so a silent stream is not idle."""
        if not self.session.connected.is_set():
            return True
        if self.backpressure_since is None:
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
        if self.store.journal_rows < self.cfg.journal.max_rows:
            self.room.set()

    # MQTT out ----------------------------------------------------------------------------
    async def _publish_frame(self, frame: bytes, wait_s: float) -> bool:
        """Send a feature frame; the whole send, PUBACK included, stays within `wait_s`."""
        t_end = time.monotonic() + wait_s
        if not await wait_event(self.session.connected, wait_s):
            return False
        return await self.session.publish(self.topics.uplink, frame, qos=1, wait_s=0,
                                          ack_s=t_end - time.monotonic())

    async def _publish_stored(self) -> bool:
        """Publish unpublished dead letters, then results, oldest first; True if more wait.

        A row is marked published only after its PUBACK, so a crash or a lost connection in
        between publishes it again (at least once; consumers key on id or stream/window).
        """
        letters = self.store.unpublished_deadletters(PUBLISH_BATCH)
        for dl_id, body in letters:
            if not await self.session.publish(self.topics.deadletter, body, wait_s=1.0):
                return False
            self.store.mark_deadletter_published(dl_id)
        results = self.store.unpublished(limit=PUBLISH_BATCH)
        for res in results:
            if not await self.session.publish(self.topics.results(res.stream),
                                              res.model_dump_json().encode(), wait_s=1.0):
                return False
            self.store.mark_published(res.id)
        return PUBLISH_BATCH in (len(letters), len(results))

    async def _publisher(self) -> None:
        """Publish stored results in order, at least once, whenever the broker is there."""
        while True:
            await wait_event(self.results_ready, 1.0)
            self.results_ready.clear()
            while await self._publish_stored():
                pass  # a full batch went out and more is waiting

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
            workers = [tg.create_task(c) for c in (self._ingest(), self._closer(),
                                                  self._publisher(), self.control.run())]
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
            workers[2].cancel()
            workers[3].cancel()
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
    from edgetok.gateway.http import preflight

    preflight(cfg)  # an exposed API without a token is refused before anything starts
    gw = Gateway(cfg)
    stop_on_signals(gw.stopping)
    await gw.run()
    return 0


def main(config: Path) -> int:
    """Entry point for `edgetok gateway`."""
    from edgetok.gateway.config import load

    return asyncio.run(run_gateway(load(config)))
