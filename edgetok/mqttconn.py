"""One MQTT v5 connection as an asyncio protocol: packets in, packets out, acks coalesced.

The gateway's ingest is bound by per-message work in the MQTT layer, so this protocol
parses every complete packet of a socket read in one pass, skips PUBLISH properties without
building objects for them, and sends the PUBACKs of one loop turn in one write.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from edgetok.mqttwire import (
    BYE,
    CONNACK,
    DEFAULT_SERVER_RECEIVE_MAXIMUM,
    DISCONNECT,
    P_MAXIMUM_PACKET_SIZE,
    P_MAXIMUM_QOS,
    P_RECEIVE_MAXIMUM,
    P_RETAIN_AVAILABLE,
    P_SERVER_KEEPALIVE,
    PINGRESP,
    PUBACK,
    PUBLISH,
    SUBACK,
    UNSUBACK,
    ConnAck,
    InMessage,
    MqttError,
    int_property,
    publish_packet,
    read_properties,
    read_varint,
    reason,
    reason_string,
    subscribe_packet,
    unsubscribe_packet,
    varint,
)
from edgetok.topics import filter_problem

# Above this many parsed messages not yet taken by the session, stop reading the socket:
# QoS 0 traffic has no Receive Maximum, so TCP is its only backpressure.
READ_PAUSE_AT = 4096


class Connection(asyncio.Protocol):
    """One MQTT connection: parses packets as they arrive, tracks packet ids and acks."""

    def __init__(self, generation: int, auto_ack: bool) -> None:
        self.generation = generation
        self.auto_ack = auto_ack
        self.inbox: deque[InMessage] = deque()
        self.arrived = asyncio.Event()  # set when inbox gains messages or the link ends
        self.ended = asyncio.Event()
        self.connack: asyncio.Future[ConnAck] = asyncio.get_running_loop().create_future()
        self.lost: MqttError | None = None
        self.last_rx = self.last_tx = time.monotonic()
        self.maximum_packet_size: int | None = None
        # What the server supports (CONNACK, MQTT 5 section 3.2.2.3.4 and .5); a PUBLISH
        # beyond either makes it drop the connection. Also read from a refusing CONNACK.
        self.maximum_qos = 1
        self.retain_available = True
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._acks = bytearray()
        self._flush_scheduled = False
        self._waiting: dict[int, asyncio.Future[int | list[int]]] = {}
        self._next_mid = 0
        self._publishes = 0  # QoS 1 publishes not yet acknowledged by the broker
        self._send_maximum = DEFAULT_SERVER_RECEIVE_MAXIMUM
        self._room = asyncio.Event()  # set when a publish slot or the writer frees up
        self._writable = True
        self._reading_paused = False
        self._pausable = True

    # asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport: every write goes through it."""
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        """The socket closed: fail everything still waiting on this connection."""
        self._transport = None
        # Before CONNACK this is how a broker refuses a TLS client certificate, depending on
        # timing with an alert or a bare reset: say at least when it happened.
        what = "connection lost" if self.connack.done() else "connection closed before CONNACK"
        self._fail_all(MqttError(f"{what}: {exc}" if exc else what))

    def pause_writing(self) -> None:
        """The transport's buffer is full: publishes wait until it drains."""
        self._writable = False

    def resume_writing(self) -> None:
        """The transport's buffer drained: waiting publishes may go on."""
        self._writable = True
        self._room.set()

    def data_received(self, data: bytes) -> None:
        """Parse every complete packet in the bytes so far; keep the incomplete rest."""
        self.last_rx = time.monotonic()
        buf: bytes | bytearray = data
        if self._buf:
            self._buf += data
            buf = self._buf
        n, pos, got = len(buf), 0, False
        try:
            while n - pos >= 2:
                first = buf[pos]
                length, start = read_varint(buf, pos + 1)
                end = start + length
                if length < 0 or end > n:
                    break  # the rest of this packet is still on its way
                if first & 0xF0 == PUBLISH:
                    self._on_publish(first, buf, start, end)
                    got = True
                else:
                    self._on_control(first, bytes(buf[start:end]))
                    if self.lost is not None:
                        return  # refused or disconnected: the rest is of no use
                pos = end
        except (MqttError, UnicodeDecodeError, IndexError) as exc:
            self.abort(exc if isinstance(exc, MqttError)
                       else MqttError(reason(0x81) + f": {exc}"))
            return
        if buf is self._buf:
            del self._buf[:pos]
        elif pos < n:
            self._buf += buf[pos:]
        if got:
            self.arrived.set()
            self._maybe_pause()

    def _maybe_pause(self) -> None:
        """Stop reading the socket while READ_PAUSE_AT messages wait, if allowed."""
        if self._pausable and not self._reading_paused and len(self.inbox) >= READ_PAUSE_AT \
                and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    @property
    def reading_paused(self) -> bool:
        """Whether we stopped reading the socket (the inbox is full)."""
        return self._reading_paused

    def set_pausable(self, pausable: bool) -> None:
        """Whether reading may stop while READ_PAUSE_AT messages wait."""
        # Not while the session awaits its SUBACK and PUBACKs: they may be queued behind
        # thousands of retained messages, and a handler may be waiting for setup to finish.
        self._pausable = pausable
        self._maybe_pause()

    # incoming ---------------------------------------------------------------------------
    def _on_publish(self, first: int, buf: bytes | bytearray, pos: int, end: int) -> None:
        """A PUBLISH in buf[pos:end] (after the fixed header) into the inbox."""
        qos = (first >> 1) & 3
        tlen = (buf[pos] << 8) | buf[pos + 1]
        if tlen == 0:
            raise MqttError(reason(0x94) + ": topic alias sent though none was allowed")
        if qos > 1:
            raise MqttError(reason(0x9B) + f": QoS {qos} PUBLISH on a QoS 1 subscription")
        props = pos + 2 + tlen + 2 * qos
        if props >= end:  # every read below stays inside this packet
            raise MqttError(reason(0x81) + ": PUBLISH shorter than its headers")
        topic = buf[pos + 2:pos + 2 + tlen].decode()
        mid = (buf[props - 2] << 8) | buf[props - 1] if qos else 0
        pos = props + 1 if buf[props] == 0 else read_properties(buf, props)[1]
        if pos > end:
            raise MqttError(reason(0x81) + ": PUBLISH properties overrun the packet")
        self.inbox.append(InMessage(topic, bytes(buf[pos:end]), qos, bool(first & 1), mid,
                                    self.generation))
        if qos and self.auto_ack:
            self.ack(mid)

    def _on_control(self, first: int, body: bytes) -> None:
        """Any packet but PUBLISH: acks resolve their waiters, DISCONNECT ends the link."""
        kind = first & 0xF0
        if kind == PUBACK:
            fut = self._waiting.pop(int.from_bytes(body[:2], "big"), None)
            if fut is not None:
                self._publishes -= 1
                self._room.set()
                if not fut.done():  # a publish that stopped waiting still held a slot
                    fut.set_result(body[2] if len(body) > 2 else 0)
        elif kind in (SUBACK, UNSUBACK):
            fut = self._waiting.pop(int.from_bytes(body[:2], "big"), None)
            pos = read_properties(body, 2)[1]
            if fut is not None and not fut.done():
                fut.set_result(list(body[pos:]))
        elif kind == CONNACK:
            self._on_connack(body)
        elif kind == DISCONNECT:
            code = body[0] if body else 0
            props = read_properties(body, 1)[0] if len(body) > 1 else {}
            self.abort(MqttError(f"broker disconnected: {reason(code)}{reason_string(props)}"))
        elif kind != PINGRESP:  # a PINGRESP only proves the link is alive: last_rx did that
            raise MqttError(reason(0x82) + f": unexpected packet type {kind >> 4}")

    def _on_connack(self, body: bytes) -> None:
        """Refused: end the connection with the reason. Accepted: note the limits."""
        code = body[1]
        props = read_properties(body, 2)[0] if len(body) > 2 else {}
        qos = int_property(props, P_MAXIMUM_QOS)
        self.maximum_qos = 1 if qos is None else min(qos, 1)
        self.retain_available = int_property(props, P_RETAIN_AVAILABLE) != 0
        if code == 0x9A:  # our Will was retained
            self.retain_available = False
        elif code == 0x9B:  # our Will's QoS was too high
            self.maximum_qos = min(self.maximum_qos, qos or 0)
        if code >= 0x80:
            self.abort(MqttError(reason(code) + reason_string(props)))
            return
        self._send_maximum = (int_property(props, P_RECEIVE_MAXIMUM)
                              or DEFAULT_SERVER_RECEIVE_MAXIMUM)
        self.maximum_packet_size = int_property(props, P_MAXIMUM_PACKET_SIZE)
        if not self.connack.done():
            self.connack.set_result(ConnAck(bool(body[0] & 1), self._send_maximum,
                                            int_property(props, P_SERVER_KEEPALIVE),
                                            self.maximum_packet_size, self.maximum_qos,
                                            self.retain_available))

    # outgoing ---------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Send bytes now; a no-op once the connection is gone."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)
            self.last_tx = time.monotonic()

    def ack(self, mid: int) -> None:
        """Queue a PUBACK; the PUBACKs of one loop turn go out in one write."""
        self._acks += bytes((PUBACK, 2, mid >> 8, mid & 0xFF))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        """Write the PUBACKs queued during this loop turn."""
        self._flush_scheduled = False
        if self._acks:
            data, self._acks = bytes(self._acks), bytearray()
            self.write(data)

    def taken(self) -> None:
        """The session took messages from the inbox: resume reading if it had stopped."""
        if self._reading_paused and len(self.inbox) < READ_PAUSE_AT // 2:
            self._reading_paused = False
            # The broker's silence while we did not read proves nothing: liveness counts
            # from now on.
            self.last_rx = time.monotonic()
            if self._transport is not None:
                self._transport.resume_reading()

    def _new_mid(self) -> int:
        """The next packet identifier not in use."""
        for _ in range(65535):
            self._next_mid = self._next_mid % 65535 + 1
            if self._next_mid not in self._waiting:
                return self._next_mid
        raise MqttError("no free packet identifier")

    def allowed(self, qos: int, retain: bool) -> tuple[int, bool]:
        """QoS and retain flag lowered to what the server supports."""
        return min(qos, self.maximum_qos), retain and self.retain_available

    async def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> int:
        """Send a PUBLISH; for QoS 1 wait for its PUBACK. Returns the reason code.

        QoS and retain are lowered to what the server supports (see `allowed`). A topic no
        broker takes is refused here with 0x90, a packet over the broker's Maximum Packet
        Size with 0x95: the broker would drop the whole connection for either.
        """
        qos, retain = self.allowed(qos, retain)
        try:
            name = topic.encode()
        except UnicodeEncodeError:  # a lone surrogate, e.g. from os.fsdecode
            return 0x90
        if not name or len(name) > 65535 or any(c in topic for c in "+#\0"):
            return 0x90
        if self.maximum_packet_size is not None:
            body = 2 + len(name) + 2 * qos + 1 + len(payload)  # no properties
            if 1 + len(varint(body)) + body > self.maximum_packet_size:
                return 0x95
        # Wait for the writer's buffer to drain and, at QoS 1, for the broker's quota.
        while not self._writable or (qos and self._publishes >= self._send_maximum):
            self._check()
            self._room.clear()
            await self._room.wait()
        self._check()
        if not qos:
            self.write(publish_packet(name, payload, 0, retain, 0))
            return 0
        mid = self._new_mid()
        fut: asyncio.Future[int | list[int]] = asyncio.get_running_loop().create_future()
        self._waiting[mid] = fut
        self._publishes += 1
        self.write(publish_packet(name, payload, 1, retain, mid))
        code = await fut
        assert isinstance(code, int)
        return code

    async def subscribe(self, filters: list[str], qos: int) -> list[int]:
        """SUBSCRIBE and wait for SUBACK; one reason code per filter."""
        return await self._filter_request(filters, lambda mid, fs: subscribe_packet(mid, fs, qos))

    async def unsubscribe(self, filters: list[str]) -> list[int]:
        """UNSUBSCRIBE and wait for UNSUBACK; one reason code per filter."""
        return await self._filter_request(filters, unsubscribe_packet)

    async def _filter_request(self, filters: list[str],
                              make: Callable[[int, list[str]], bytes]) -> list[int]:
        """Send the filters in as few packets as the broker's Maximum Packet Size allows, and
        wait for each ack; one reason code per filter."""
        # An invalid filter, or one too large on its own, is refused here (0x8F, 0x95): the
        # broker would drop the connection for it, and again after every reconnect.
        codes: list[int | None] = [None] * len(filters)
        batches: list[list[int]] = []
        limit = self.maximum_packet_size
        for i, f in enumerate(filters):
            if filter_problem(f) is not None:
                codes[i] = 0x8F
            elif limit is not None and len(make(0, [f])) > limit:
                codes[i] = 0x95
            elif batches and (limit is None or len(
                    make(0, [filters[j] for j in batches[-1]] + [f])) <= limit):
                batches[-1].append(i)
            else:
                batches.append([i])
        for batch in batches:
            self._check()
            mid = self._new_mid()
            fut: asyncio.Future[int | list[int]] = asyncio.get_running_loop().create_future()
            self._waiting[mid] = fut
            self.write(make(mid, [filters[j] for j in batch]))
            got = await fut
            assert isinstance(got, list)
            for j, code in zip(batch, got, strict=False):
                codes[j] = code
        return [0x80 if c is None else c for c in codes]  # an ack short of codes: refused

    def _check(self) -> None:
        """Raise why the connection ended, if it has."""
        if self.lost is not None:
            raise self.lost

    def abort(self, err: MqttError) -> None:
        """End the connection at once with `err` as the reason."""
        self._fail_all(err)
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        """Send DISCONNECT (the broker discards the Will) and close."""
        self._flush_acks()
        self.write(BYE)
        self._fail_all(MqttError("closed by us"))
        if self._transport is not None:
            self._transport.close()

    def _fail_all(self, err: MqttError) -> None:
        """Record why the connection ended, once, and release everyone waiting on it."""
        if self.lost is None:
            self.lost = err
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(self.lost)
                fut.exception()  # retrieved: nobody may be awaiting a publish any more
        if not self.connack.done():
            self.connack.set_exception(self.lost)
            self.connack.exception()
        self._room.set()
        self.arrived.set()
        self.ended.set()
