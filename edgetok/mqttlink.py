"""Our small MQTT interface: one session that survives reconnects, with manual QoS 1 acks.

aiomqtt 2.x acknowledges a QoS 1 PUBLISH before the application sees it, so we switch the
underlying paho client to manual acknowledgement (`manual_ack_set(True)`) and call
`ack(mid, qos)` ourselves once a message is durably journaled. paho's socket callbacks run
on the asyncio loop thread under aiomqtt, so acking from a coroutine is thread-safe.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgetok.aio import wait_event
from edgetok.settings import MqttSettings

log = logging.getLogger(__name__)

# The broker may send at most this many unacknowledged QoS 1 messages. Because we ack only
# after journaling, this is the bound on messages held in memory between socket and journal.
RECEIVE_MAXIMUM = 256
# Longest wait for a PUBACK when the caller gives no limit. A lost connection ends the wait
# at once (see publish), so this only bounds a broker that is connected but not answering.
PUBLISH_TIMEOUT_S = 10.0
# paho leaves Nagle on; with delayed ACKs that costs ~40 ms per small frame or reply.
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


@dataclass(frozen=True, slots=True)
class InMessage:
    """A received message, with what is needed to acknowledge it later."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    generation: int


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish on every (re)connect, e.g. the retained birth."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


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


class MqttSession:
    """A persistent MQTT v5 session: reconnects with backoff, resubscribes, re-announces."""

    def __init__(self, settings: MqttSettings, client_id: str, *, password: str | None,
                 subscriptions: Sequence[str] = (), will: Outgoing | None = None,
                 on_connect: Sequence[Outgoing] = (), manual_ack: bool = True,
                 on_message: Callable[[InMessage], Awaitable[None]] | None = None) -> None:
        self.settings = settings
        self.client_id = client_id
        self._password = password
        self.subscriptions = minimal_filters(subscriptions)
        self._will = will
        self._announce = list(on_connect)
        self._manual_ack = manual_ack
        self._on_message = on_message
        self._client: aiomqtt.Client | None = None
        self.generation = 0
        self.connected = asyncio.Event()
        # Set when the current connection ends; publishes waiting on it give up at once.
        self._gone = asyncio.Event()
        self._closing = asyncio.Event()
        self._closed = asyncio.Event()
        self._final: Outgoing | None = None
        self.connects = 0
        self.last_error: str | None = None

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.session_expiry_s
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        return props

    def _make_client(self) -> aiomqtt.Client:
        s = self.settings
        will = (aiomqtt.Will(self._will.topic, self._will.payload, self._will.qos,
                             self._will.retain) if self._will else None)
        persistent = s.session_expiry_s > 0
        client = aiomqtt.Client(
            s.host, s.port, identifier=self.client_id, username=s.username,
            password=self._password, protocol=aiomqtt.ProtocolVersion.V5, will=will,
            keepalive=s.keepalive_s, tls_context=tls_context(s),
            clean_start=not persistent,
            properties=self._connect_properties(), timeout=PUBLISH_TIMEOUT_S,
            socket_options=NODELAY)
        if self._manual_ack:
            # aiomqtt exposes no switch for this; paho's client is its documented engine.
            client._client.manual_ack_set(True)
        return client

    async def run(self) -> None:
        """Connect, pump messages, and reconnect with backoff until close() is called."""
        delay = self.settings.reconnect_min_s
        while not self._closing.is_set():
            connects = self.connects
            try:
                await self._one_connection()
                delay = self.settings.reconnect_min_s
            except aiomqtt.MqttError as exc:
                if self.connects != connects:
                    # The link was up: start the backoff afresh, not where the last outage
                    # left it, or a second broker restart would wait reconnect_max_s.
                    delay = self.settings.reconnect_min_s
                self.last_error = str(exc)
                log.warning("MQTT connection to %s:%d lost or refused: %s; retrying in %.1fs",
                            self.settings.host, self.settings.port, exc, delay)
            finally:
                self.connected.clear()
                self._client = None
            if self._closing.is_set():
                break
            await wait_event(self._closing, delay)
            delay = min(delay * 2, self.settings.reconnect_max_s)
        self._closed.set()

    async def _one_connection(self) -> None:
        """One connection's lifetime; its end releases publishes still waiting on it."""
        gone = self._gone = asyncio.Event()
        try:
            await self._connected_session()
        finally:
            gone.set()

    async def _connected_session(self) -> None:
        """Subscribe, announce, and pump messages until the connection ends or we close."""
        async with self._make_client() as client:
            self._client = client
            self.generation += 1
            self.connects += 1
            for filt in self.subscriptions:
                await client.subscribe(filt, qos=1)
            for msg in self._announce:
                await client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
            log.info("MQTT connected to %s:%d as %s (connect #%d)", self.settings.host,
                     self.settings.port, self.client_id, self.connects)
            self.connected.set()
            pump = asyncio.ensure_future(self._pump(client, self.generation))
            closing = asyncio.ensure_future(self._closing.wait())
            try:
                await asyncio.wait({pump, closing}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closing.cancel()
                if not pump.done():
                    pump.cancel()
                    await asyncio.gather(pump, return_exceptions=True)
            if self._closing.is_set():
                self.connected.clear()
                if self._final is not None:
                    await client.publish(self._final.topic, self._final.payload,
                                         qos=self._final.qos, retain=self._final.retain)
                return
            pump.result()  # re-raises the MqttError that ended the connection

    async def _pump(self, client: aiomqtt.Client, generation: int) -> None:
        async for m in client.messages:
            msg = InMessage(topic=m.topic.value, payload=bytes(m.payload)
                            if not isinstance(m.payload, bytes) else m.payload,
                            qos=m.qos, retain=m.retain, mid=m.mid, generation=generation)
            if self._on_message is None:
                continue
            try:
                await self._on_message(msg)
            except Exception:  # one bad message must not end the connection
                log.exception("handler failed on a message from %s; acknowledged and dropped",
                              msg.topic)
                self.ack(msg)

    def ack(self, msg: InMessage) -> None:
        """Acknowledge a QoS 1 message; a no-op if its connection is gone (it will be resent)."""
        if msg.qos == 0 or not self._manual_ack:
            return
        client = self._client
        if client is not None and msg.generation == self.generation:
            client._client.ack(msg.mid, msg.qos)

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                      wait_s: float | None = None, ack_s: float | None = None) -> bool:
        """Publish once connected; True once the broker has it (PUBACK for QoS 1).

        False if no connection came within `wait_s`, no PUBACK within `ack_s` (default
        PUBLISH_TIMEOUT_S), or the connection ended first. aiomqtt leaves a publish waiting
        for its PUBACK after the connection is gone; we stop waiting at once, so a caller can
        retry on the next connection instead of stalling for the whole timeout.
        """
        if not await wait_event(self.connected, wait_s):
            return False
        client, gone = self._client, self._gone
        if client is None or gone.is_set():
            return False
        send = asyncio.ensure_future(client.publish(
            topic, payload, qos=qos, retain=retain,
            timeout=PUBLISH_TIMEOUT_S if ack_s is None else max(ack_s, 0.0)))
        lost = asyncio.ensure_future(gone.wait())
        try:
            await asyncio.wait({send, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not send.done():
                send.cancel()
            await asyncio.gather(send, lost, return_exceptions=True)
        if send.cancelled():
            log.debug("publish to %s abandoned: connection lost", topic)
            return False
        exc = send.exception()
        if exc is not None:
            if not isinstance(exc, aiomqtt.MqttError):
                raise exc
            log.debug("publish to %s failed: %s", topic, exc)
            return False
        return True

    async def close(self, final: Outgoing | None = None, timeout_s: float = 5.0) -> None:
        """Publish `final` (e.g. the retained `stopped`), disconnect cleanly, and stop run()."""
        self._final = final if self.connected.is_set() else None
        self._closing.set()
        if not await wait_event(self._closed, timeout_s):
            log.warning("MQTT session did not close within %.1fs", timeout_s)
