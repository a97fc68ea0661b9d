"""The ingest path: sensor messages journaled in batches, acknowledged once durable, buffered."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable

from edgetok.aio import within
from edgetok.gateway.config import JournalSettings
from edgetok.gateway.decode import DecodeError, Reading, Router
from edgetok.gateway.store import Store
from edgetok.gateway.windows import WindowBuffer
from edgetok.mqttlink import RECEIVE_MAXIMUM, InMessage, MqttSession

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

# Records a rejected input: topic, reason, detail, payload.
DeadLetter = Callable[[str, str, str, bytes], None]


class Ingest:
    """Sensor input from the inbox to the journal, the PUBACKs and the window buffers."""

    def __init__(self, store: Store, session: MqttSession, router: Router,
                 buffers: dict[str, WindowBuffer], counters: dict[str, int],
                 journal: JournalSettings, deadletter: DeadLetter,
                 after_batch: Callable[[], None]) -> None:
        self.store = store
        self.session = session
        self.router = router
        self.buffers = buffers  # shared with the gateway, which closes their windows
        self.counters = counters  # the gateway's, served over HTTP and metrics
        self.journal = journal
        self.deadletter = deadletter
        self.after_batch = after_batch  # closes the windows a batch completed
        # The broker sends at most Receive Maximum unacknowledged QoS 1 messages, so this
        # queue never fills from QoS 1 traffic and the MQTT pump never blocks on it.
        self.inbox: asyncio.Queue[InMessage] = asyncio.Queue(maxsize=2 * RECEIVE_MAXIMUM)
        self.pending: deque[InMessage] = deque()  # taken from the inbox, not yet journaled
        self.last_batch = 0  # messages in the last journal batch: >1 means a burst
        self.backpressure_since: float | None = None
        self.room = asyncio.Event()

    def _accepts(self, stream: str, ts: float) -> bool:
        """Whether a reading at ts still belongs to an open-able window of the stream."""
        return self.buffers[stream].accepts(ts)

    def admit(self, msg: InMessage, now: float) -> tuple[str, list[Reading]] | None:
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
                self.deadletter(msg.topic, exc.reason, exc.detail, msg.payload)
                continue
            if late:
                self.counters["late_readings"] += late
                self.deadletter(msg.topic, "late", f"{late} of {late + len(fresh)} "
                                "reading(s) fall in windows already closed", msg.payload)
            rows.extend((stream.name, r.ts, r.values) for r in fresh)
            accepted.append((stream.name, fresh))
        self.store.remember(new)
        self.store.journal(rows)
        return taken, accepted

    def on_pruned(self) -> None:
        """Wake a backpressured ingest once pruning has left the journal room."""
        if self.store.journal_rows < self.journal.max_rows:
            self.room.set()

    async def _await_room(self) -> None:
        """Backpressure: while the journal is full, acknowledge nothing; drop nothing."""
        limit = self.journal.max_rows
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

    async def run(self) -> None:
        """Journal bursts of messages in one transaction, ack them, then buffer them."""
        limit = self.journal.max_rows
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
            self.after_batch()
