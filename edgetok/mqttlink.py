"""Our small MQTT interface: one session that survives reconnects, with manual QoS 1 acks.

A QoS 1 message is acknowledged only when the application calls `ack` (the gateway does so
once the message is durably journaled), unless the session was made with manual_ack=False.
The protocol lives in edgetok.mqttwire (packets) and edgetok.mqttconn (the connection).
aiomqtt over paho cost the gateway about half its CPU per message (packet parsing, MQTT v5
property objects, a task per message) and acknowledged before the application saw a
message unless paho's private switch was flipped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetok.aio import wait_event, within
from edgetok.mqttconn import Connection
from edgetok.mqttwire import PING, InMessage, MqttError, connect_packet, reason
from edgetok.settings import ConfigError, MqttSettings, require_readable

__all__ = ["NODELAY", "InMessage", "MqttError", "MqttSession", "Outgoing", "Published",
           "covers", "minimal_filters", "tls_context"]

log = logging.getLogger(__name__)

# The broker may send at most this many unacknowledged QoS 1 messages. Because we ack only
# after journaling, this is the bound on messages held in memory between socket and journal
# (times the largest payload a stream accepts). More lets the broker keep sending while a
# batch is being committed; fewer bounds memory tighter.
RECEIVE_MAXIMUM = 512
# Longest wait for a PUBACK when the caller gives no limit. A lost connection ends the wait
# at once (see publish), so this only bounds a broker that is connected but not answering.
PUBLISH_TIMEOUT_S = 10.0
# Longest wait for the TCP (and TLS) connection and CONNACK.
CONNECT_TIMEOUT_S = 10.0
# Nagle with delayed ACKs costs ~40 ms per small frame or reply; other clients use this too.
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
# Keepalive checks per keepalive interval: a PINGREQ goes out when either direction has been
# quiet for half the interval, and a broker silent for 1.5 intervals is taken as gone.
KEEPALIVE_CHECKS = 4
# A link up this long after its setup counts as healthy: the next outage backs off afresh.
HEALTHY_AFTER_S = 10.0


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish on every (re)connect, e.g. the retained birth."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class Published:
    """What became of a publish; truthy once the broker has it.

    `code` is the PUBACK's reason code (0 at QoS 0), or the client's own refusal (0x95:
    larger than the broker takes); None when no answer came (no link, link lost, timeout).
    A refusal is an answer about this message, so resending it will not help; a missing
    answer is about the link, so resending later will.
    """

    code: int | None

    def __bool__(self) -> bool:
        return self.code is not None and self.code < 0x80

    @property
    def refused(self) -> bool:
        return self.code is not None and self.code >= 0x80

    @property
    def reason(self) -> str:
        return reason(self.code) if self.code is not None else "no answer"


def covers(wide: str, narrow: str) -> bool:
    """Whether every topic matching filter `narrow` also matches filter `wide`."""
    a, b = wide.split("/"), narrow.split("/")
    for i, level in enumerate(a):
        if level == "#":
            return True
        if i >= len(b) or b[i] == "#" or (level != "+" and level != b[i]):
            return False
    return len(a) == len(b)


def minimal_filters(filters: Sequence[str]) -> list[str]:
    """Drop filters another one covers, keeping order.

    A broker may deliver a message once per matching subscription (mosquitto does), so
    overlapping filters would double every message. Shared subscriptions are kept as given.
    """
    out: list[str] = []
    for i, f in enumerate(filters):
        if f in out:
            continue
        if not f.startswith("$share/") and any(
                covers(g, f) and not (g == f or (covers(f, g) and j > i))
                for j, g in enumerate(filters) if not g.startswith("$share/")):
            continue
        out.append(f)
    return out


def tls_context(settings: MqttSettings) -> ssl.SSLContext | None:
    """An SSL context for the broker, or None for plain TCP."""
    if settings.tls is None:
        return None
    ctx = ssl.create_default_context(cafile=str(settings.tls.ca_file) if settings.tls.ca_file
                                     else None)
    if settings.tls.cert_file:
        ctx.load_cert_chain(str(settings.tls.cert_file),
                            str(settings.tls.key_file) if settings.tls.key_file else None)
    if settings.tls.insecure:
        ctx.check_hostname = False
    return ctx


def check_tls(settings: MqttSettings, source: str) -> None:
    """Raise ConfigError if the broker's TLS files cannot be read: at start-up, not as a
    connection that fails and is retried for ever."""
    if settings.tls is None:
        return
    t = settings.tls
    require_readable(source, {"mqtt.tls.ca_file": t.ca_file, "mqtt.tls.cert_file": t.cert_file,
                              "mqtt.tls.key_file": t.key_file})
    try:
        tls_context(settings)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(source, [f"mqtt.tls: {exc}"]) from exc


class MqttSession:
    """A persistent MQTT v5 session: reconnects with backoff, resubscribes, re-announces."""

    def __init__(self, settings: MqttSettings, client_id: str, *, password: str | None,
                 subscriptions: Sequence[str] = (), will: Outgoing | None = None,
                 on_connect: Sequence[Outgoing] = (), manual_ack: bool = True,
                 on_message: Callable[[InMessage], Awaitable[None]] | None = None,
                 subscriptions_file: Path | None = None) -> None:
        self.settings = settings
        self.client_id = client_id
        self._password = password
        self.subscriptions = minimal_filters(subscriptions)
        self._will = will
        self._announce = list(on_connect)
        self._manual_ack = manual_ack
        self._on_message = on_message
        # Where the subscribed filters are kept between runs, so that a filter dropped from
        # the config is unsubscribed from the persistent session (see _unsubscribe_stale).
        self._subscriptions_file = subscriptions_file
        self._held = list(self.subscriptions)  # what the broker's session may hold
        self._conn: Connection | None = None
        self.generation = 0
        self.connected = asyncio.Event()
        self._closing = asyncio.Event()
        self._closed = asyncio.Event()
        self._final: Outgoing | None = None
        self.connects = 0
        self.last_error: str | None = None
        # Filters the broker (or this client: invalid, too large) refused at the last
        # connect, with the reason.
        self.refused_filters: dict[str, str] = {}
        self._up_since: float | None = None  # when the current link finished its setup
        # What the server supports, as its last CONNACK said; each lowering is logged once.
        self._maximum_qos = 1
        self._retain_available = True
        self._lowered: set[str] = set()

    async def run(self) -> None:
        """Connect, pump messages, and reconnect with backoff until close() is called."""
        delay = self.settings.reconnect_min_s
        while not self._closing.is_set():
            self._up_since = None
            try:
                await self._connected_session()
                delay = self.settings.reconnect_min_s
            except MqttError as exc:
                if self._up_since is not None and \
                        time.monotonic() - self._up_since >= HEALTHY_AFTER_S:
                    # The link was up and well: start the backoff afresh, not where the last
                    # outage left it, or a second broker restart would wait reconnect_max_s.
                    # Not after a link that failed in or soon after setup (a refused birth,
                    # a session taken over): that would reconnect every reconnect_min_s.
                    delay = self.settings.reconnect_min_s
                self.last_error = str(exc)
                log.warning("MQTT connection to %s:%d lost or refused: %s; retrying in %.1fs",
                            self.settings.host, self.settings.port, exc, delay)
            finally:
                self.connected.clear()
            if self._closing.is_set():
                break
            await wait_event(self._closing, delay)
            delay = min(delay * 2, self.settings.reconnect_max_s)
        self._closed.set()

    async def _open(self) -> tuple[Connection, int]:
        """TCP (and TLS), CONNECT and CONNACK; the connection and the keepalive to use."""
        s = self.settings
        self.generation += 1
        generation, transport = self.generation, None
        will = None
        if self._will is not None:
            qos, retain = self._allowed(self._will.qos, self._will.retain, "the Will")
            will = (self._will.topic, self._will.payload, qos, retain)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                transport, conn = await asyncio.get_running_loop().create_connection(
                    lambda: Connection(generation, auto_ack=not self._manual_ack),
                    s.host, s.port, ssl=tls_context(s))
                # Not until setup is done: its acks may queue behind many retained messages.
                conn.set_pausable(False)
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    for opt in NODELAY:
                        sock.setsockopt(*opt)
                conn.write(connect_packet(
                    self.client_id, keepalive_s=s.keepalive_s,
                    clean_start=s.session_expiry_s == 0, session_expiry_s=s.session_expiry_s,
                    receive_maximum=RECEIVE_MAXIMUM, username=s.username,
                    password=self._password, will=will))
                try:
                    ack = await conn.connack
                finally:
                    # Remembered for the Will of the next connect: a server refuses a Will
                    # beyond what it supports ([MQTT-3.2.2-12], [MQTT-3.2.2-13]).
                    self._maximum_qos = conn.maximum_qos
                    self._retain_available = conn.retain_available
        except TimeoutError:
            if transport is not None:
                transport.abort()
            raise MqttError(f"timed out connecting to {s.host}:{s.port}") from None
        except OSError as exc:  # refused, unreachable, TLS verification (ssl.SSLError)
            raise MqttError(str(exc) or type(exc).__name__) from exc
        except asyncio.CancelledError:  # close() while connecting
            if transport is not None:
                transport.abort()
            raise
        return conn, ack.keepalive_s if ack.keepalive_s is not None else s.keepalive_s

    async def _connected_session(self) -> None:
        """Connect, then run the connection until it ends or we close."""
        closing = asyncio.ensure_future(self._closing.wait())
        opening = asyncio.ensure_future(self._open())
        try:
            await asyncio.wait({opening, closing}, return_when=asyncio.FIRST_COMPLETED)
            if opening.done():  # else close() came first: _open aborts its transport
                await self._run_connection(*opening.result(), closing)
        finally:
            for t in (opening, closing):
                t.cancel()
            await asyncio.gather(opening, closing, return_exceptions=True)

    async def _run_connection(self, conn: Connection, keepalive: int,
                              closing: asyncio.Future[Any]) -> None:
        """Subscribe, announce, and pump messages until the connection ends or we close."""
        self._conn = conn
        self.connects += 1
        # The pump runs during setup too: a broker sends retained messages (and a resumed
        # session's backlog) ahead of the SUBACK and PUBACK that setup waits for.
        pump = asyncio.ensure_future(self._pump(conn))
        setup = asyncio.ensure_future(self._setup(conn))
        tasks: set[asyncio.Future[Any]] = {
            pump, setup, asyncio.ensure_future(self._keepalive(conn, keepalive))}
        try:
            await asyncio.wait(tasks | {closing}, return_when=asyncio.FIRST_COMPLETED)
            if setup.done() and not self._closing.is_set() and conn.lost is None:
                setup.result()  # setup failed: raise why
                conn.set_pausable(True)
                log.info("MQTT connected to %s:%d as %s (connect #%d)", self.settings.host,
                         self.settings.port, self.client_id, self.connects)
                self.connected.set()
                self._up_since = time.monotonic()
                await asyncio.wait(tasks - {setup} | {closing},
                                   return_when=asyncio.FIRST_COMPLETED)
            if self._closing.is_set():
                pump.cancel()  # a handler mid-message at close: QoS 1 comes back unacked
                if self.connected.is_set():
                    self.connected.clear()
                    if self._final is not None:
                        await self._send(conn, self._final, PUBLISH_TIMEOUT_S, True)
                return
            raise conn.lost or MqttError("connection ended")
        except MqttError:
            self.connected.clear()
            conn.close()  # a failed setup leaves the link up: end it before draining
            if not pump.done() and not self._closing.is_set():
                # The link ended, but what it delivered is ours: QoS 0 is never sent
                # again, nor is QoS 1 once the session has expired. The pump finishes the
                # message in hand and drains the inbox; their acks are no-ops now, so the
                # broker resends the QoS 1 ones, which at-least-once allows.
                await asyncio.wait({pump, closing}, return_when=asyncio.FIRST_COMPLETED)
            raise
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._conn = None
            conn.close()

    def _load_held(self) -> list[str]:
        """The filters the broker's session may still hold from an earlier run."""
        path = self._subscriptions_file
        if path is None:
            return self._held
        try:
            held = json.loads(path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("cannot read the last MQTT subscriptions from %s: %s", path, exc)
            return []
        return [f for f in held if isinstance(f, str)] if isinstance(held, list) else []

    def _save_held(self, filters: list[str]) -> None:
        """Record what the broker's session holds now, for the next run."""
        self._held = filters
        path = self._subscriptions_file
        if path is None:
            return
        try:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(filters))
            tmp.replace(path)  # never a half-written file
        except OSError as exc:
            log.warning("cannot record the MQTT subscriptions in %s: %s", path, exc)

    async def _unsubscribe_stale(self, conn: Connection) -> None:
        """Drop what a resumed session still holds that the subscriptions no longer name."""
        # A persistent session keeps its subscriptions across connects, so a filter dropped
        # from the config would go on delivering. Unsubscribing what the last run subscribed
        # (recorded in subscriptions_file) and is not wanted now fixes that and keeps the
        # messages queued for the filters that stay, which a one-off Clean Start would lose.
        # What the broker queued for a dropped filter before this still arrives, once.
        if not conn.connack.result().session_present:
            return
        stale = [f for f in self._load_held() if f not in self.subscriptions]
        if not stale:
            return
        try:
            codes = await within(conn.unsubscribe(stale), PUBLISH_TIMEOUT_S)
        except TimeoutError:
            raise MqttError("timed out waiting for UNSUBACK") from None
        log.info("unsubscribed from filters no longer configured: %s",
                 ", ".join(f"{f} ({reason(c)})" for f, c in zip(stale, codes, strict=False)))

    async def _setup(self, conn: Connection) -> None:
        """Subscribe (a refused filter is logged, not fatal) and publish the announcements."""
        await self._unsubscribe_stale(conn)
        if self.subscriptions:
            try:
                codes = await within(conn.subscribe(self.subscriptions, 1), PUBLISH_TIMEOUT_S)
            except TimeoutError:
                raise MqttError("timed out waiting for SUBACK") from None
            refused = {f: reason(c) for f, c in zip(self.subscriptions, codes, strict=False)
                       if c >= 0x80}
            for filt, why in refused.items():
                log.warning("subscription %s refused: %s", filt, why)
            # Not fatal (the other filters work), but a stream that gets nothing: health and
            # /v1/status show it.
            self.refused_filters = refused
            if refused:
                self.last_error = "subscriptions refused: " + "; ".join(
                    f"{f} {why}" for f, why in refused.items())
        self._save_held(list(self.subscriptions))
        for msg in self._announce:
            sent = await self._send(conn, msg, PUBLISH_TIMEOUT_S, True)
            if not sent:
                raise conn.lost or MqttError(
                    f"announcement on {msg.topic} " + (f"refused: {sent.reason}" if sent.refused
                                                       else "not acknowledged"))

    def _allowed(self, qos: int, retain: bool, what: str) -> tuple[int, bool]:
        """QoS and retain flag lowered to what the server supports, warning once of each."""
        for lowered, feature, how in (
                (qos > self._maximum_qos, f"QoS {qos}", f"at QoS {self._maximum_qos}"),
                (retain and not self._retain_available, "retained messages", "not retained")):
            if lowered and feature not in self._lowered:
                self._lowered.add(feature)
                log.warning("the broker does not support %s: %s and later messages are sent "
                            "%s", feature, what, how)
        return min(qos, self._maximum_qos), retain and self._retain_available

    async def _send(self, conn: Connection, msg: Outgoing, limit_s: float,
                    warn: bool) -> Published:
        """Publish on this connection; truthy once the broker has it."""
        self._allowed(msg.qos, msg.retain, f"the message on {msg.topic}")  # conn lowers it
        try:
            code = await within(conn.publish(msg.topic, msg.payload, msg.qos, msg.retain),
                                limit_s)
        except (MqttError, TimeoutError) as exc:
            log.debug("publish to %s failed: %s", msg.topic, exc or "timeout")
            return Published(None)
        if code >= 0x80:
            log.log(logging.WARNING if warn else logging.DEBUG,
                    "publish to %r refused: %s", msg.topic, reason(code))
        return Published(code)

    async def _pump(self, conn: Connection) -> None:
        """Hand received messages to on_message, in order, until the connection ends."""
        inbox = conn.inbox
        while True:
            while inbox:
                msg = inbox.popleft()
                conn.taken()
                if self._on_message is None:
                    continue
                try:
                    await self._on_message(msg)
                except Exception:  # one bad message must not end the connection
                    log.exception("handler failed on a message from %s; acknowledged and "
                                  "dropped", msg.topic)
                    self.ack(msg)
            if conn.lost is not None:
                return
            conn.arrived.clear()
            await conn.arrived.wait()

    @staticmethod
    async def _keepalive(conn: Connection, keepalive_s: int) -> None:
        """PINGREQ when the link is quiet; abort it when the broker has gone silent."""
        if keepalive_s <= 0:
            await conn.ended.wait()
            return
        while not await wait_event(conn.ended, keepalive_s / KEEPALIVE_CHECKS):
            now = time.monotonic()
            if conn.reading_paused:
                # Nothing from the broker is our doing while we do not read (a handler slow
                # on a full inbox): judge it once reading resumes, and keep our side alive.
                if now - conn.last_tx >= keepalive_s / 2:
                    conn.write(PING)
                continue
            if now - conn.last_rx > 1.5 * keepalive_s:
                conn.abort(MqttError(f"keepalive: nothing from the broker for "
                                     f"{now - conn.last_rx:.0f}s"))
                return
            if max(now - conn.last_tx, now - conn.last_rx) >= keepalive_s / 2:
                conn.write(PING)

    def ack(self, msg: InMessage) -> None:
        """Acknowledge a QoS 1 message; a no-op if its connection is gone (it will be resent)."""
        if msg.qos == 0 or not self._manual_ack:
            return
        conn = self._conn
        if conn is not None and msg.generation == conn.generation:
            conn.ack(msg.mid)

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                      wait_s: float | None = None, ack_s: float | None = None,
                      warn: bool = True) -> Published:
        """Publish once connected; truthy once the broker has it (PUBACK for QoS 1).

        Falsy if no connection came within `wait_s`, no PUBACK within `ack_s` (default
        PUBLISH_TIMEOUT_S), or the connection ended first (a caller retries on the next
        connection rather than stall for the whole timeout); falsy and `refused` if the
        broker, or this client, refused the message (logged as a warning unless `warn` is
        off, for a caller that reports refusals itself).
        """
        if not await wait_event(self.connected, wait_s):
            return Published(None)
        conn = self._conn
        if conn is None or conn.lost is not None:
            # The link is gone but run() has not noticed yet. Say so now: a caller that
            # retries must wait for the reconnect, not spin on a stale flag (a loop that never
            # awaits a pending future starves run() itself, and nothing would ever reconnect).
            self.connected.clear()
            return Published(None)
        return await self._send(conn, Outgoing(topic, payload, qos, retain),
                                PUBLISH_TIMEOUT_S if ack_s is None else max(ack_s, 0.0), warn)

    async def close(self, final: Outgoing | None = None, timeout_s: float = 5.0) -> None:
        """Publish `final` (e.g. the retained `stopped`), disconnect cleanly, and stop run()."""
        self._final = final if self.connected.is_set() else None
        self._closing.set()
        if not await wait_event(self._closed, timeout_s):
            log.warning("MQTT session did not close within %.1fs", timeout_s)
