"""Our MQTT v5 client: the packet parser on its own, then sessions against a real mosquitto."""

from __future__ import annotations

import asyncio
import itertools
import signal
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from conftest import Broker
from harness import until
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetok import mqttconn, mqttlink
from edgetok.mqttconn import Connection
from edgetok.mqttlink import InMessage, MqttError, MqttSession, Outgoing
from edgetok.mqttwire import PUBLISH, packet, publish_packet, read_varint, varint
from edgetok.settings import MqttSettings

# Long enough for a loaded CI machine, short enough that a hang fails the test visibly.
LIMIT_S = 20.0


def utf8(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("!H", len(raw)) + raw


def publish_with_properties(topic: str, payload: bytes, qos: int, mid: int) -> bytes:
    """A PUBLISH carrying properties the gateway ignores: message expiry, a user property."""
    props = b"\x02" + struct.pack("!I", 60) + b"\x26" + utf8("sensor") + utf8("left")
    body = utf8(topic) + (struct.pack("!H", mid) if qos else b"") + varint(len(props)) \
        + props + payload
    return packet(PUBLISH | (qos << 1), body)


def test_varint_round_trips_at_every_width_and_reports_truncation() -> None:
    for n in (0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 268_435_455):
        raw = varint(n)
        assert read_varint(raw + b"\xff", 0) == (n, len(raw))
        assert read_varint(raw[:-1], 0) == (-1, 0)  # cut short: wait for more bytes
    with pytest.raises(MqttError, match="Malformed"):
        read_varint(b"\xff\xff\xff\xff\x01", 0)


messages = st.lists(st.tuples(
    st.text(st.characters(codec="utf-8", exclude_characters="+#\0"), min_size=1, max_size=40),
    st.binary(max_size=300), st.integers(0, 1), st.booleans(), st.booleans()),
    min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(msgs=messages, cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_packets_parse_the_same_however_the_stream_is_cut(
        msgs: list[tuple[str, bytes, int, bool, bool]], cuts: list[int]) -> None:
    stream = b""
    for i, (topic, payload, qos, retain, props) in enumerate(msgs):
        mid = i + 1
        stream += (publish_with_properties(topic, payload, qos, mid) if props and not retain
                   else publish_packet(topic, payload, qos, retain, mid))
        stream += b"\xd0\x00"  # a PINGRESP between messages
    expected = [InMessage(t, p, q, r, i + 1 if q else 0, 7)
                for i, (t, p, q, r, props) in enumerate(msgs)]

    async def parse() -> list[InMessage]:
        conn = Connection(generation=7, auto_ack=False)
        points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
        for a, b in itertools.pairwise(points):
            conn.data_received(stream[a:b])
        assert conn.lost is None
        return list(conn.inbox)

    assert asyncio.run(parse()) == expected


@pytest.mark.parametrize(("data", "reason"), [
    (packet(PUBLISH | 4, utf8("t") + b"\x00\x01\x00x"), "QoS not supported"),  # QoS 2
    (packet(PUBLISH, b"\x00\x00\x00x"), "Topic Alias invalid"),  # no topic: an alias
    (packet(PUBLISH | 2, utf8("t") + b"\x00"), "Malformed"),  # mid but no property length
    (packet(PUBLISH, utf8("t") + b"\x05\x01"), "Malformed"),  # properties overrun
    (packet(PUBLISH, b"\x00\x02\xff\xfe\x00x"), "Malformed"),  # topic not UTF-8
    (b"\xf0\x00", "Protocol Error"),  # AUTH: not something we negotiated
    (b"\xe0\x02\x8b\x00", "Server shutting down"),  # the broker's DISCONNECT
])
def test_bad_input_ends_the_connection_with_a_reason(data: bytes, reason: str) -> None:
    async def parse() -> Connection:
        conn = Connection(generation=1, auto_ack=False)
        conn.data_received(data + publish_packet("after", b"x", 0, False, 0))
        return conn

    conn = asyncio.run(parse())
    assert conn.lost is not None and reason in str(conn.lost)
    assert conn.ended.is_set() and not conn.inbox  # nothing after the fault is delivered


@pytest.mark.asyncio
async def test_connack_refusal_and_granted_limits() -> None:
    refused = Connection(generation=1, auto_ack=False)
    refused.data_received(b"\x20\x03\x00\x87\x00")
    with pytest.raises(MqttError, match=r"\[code:135\] Not authorized"):
        await refused.connack
    ok = Connection(generation=1, auto_ack=False)
    props = b"\x21\x00\x03\x13\x00\x14\x1f" + utf8("welcome")
    ok.data_received(b"\x20" + varint(3 + len(props)) + b"\x01\x00" + varint(len(props))
                     + props)
    ack = await ok.connack
    assert (ack.session_present, ack.receive_maximum, ack.keepalive_s) == (True, 3, 20)


# Against a real broker --------------------------------------------------------------------
def mqtt_settings(broker: Broker, **extra: Any) -> MqttSettings:
    return MqttSettings(host="127.0.0.1", port=broker.port, reconnect_min_s=0.1,
                        reconnect_max_s=0.5, **extra)


@asynccontextmanager
async def session(broker: Broker, client_id: str, *, manual_ack: bool = True,
                  subscriptions: tuple[str, ...] = (),
                  on_message: Callable[[InMessage], Awaitable[None]] | None = None,
                  **kw: Any) -> AsyncIterator[MqttSession]:
    """A running session, connected before the body runs, closed after."""
    final = kw.pop("final", None)
    s = MqttSession(mqtt_settings(broker, **kw.pop("mqtt", {})), client_id, password=None,
                    manual_ack=manual_ack, subscriptions=subscriptions, on_message=on_message,
                    **kw)
    task = asyncio.create_task(s.run())
    try:
        async with asyncio.timeout(LIMIT_S):
            await s.connected.wait()
        yield s
    finally:
        await s.close(final)
        await task


@pytest.mark.asyncio
async def test_only_unacknowledged_messages_come_back_after_a_reconnect(
        mosquitto: Broker) -> None:
    got: list[InMessage] = []

    async def collect(m: InMessage) -> None:
        got.append(m)

    async with session(mosquitto, "etk-t-pub", manual_ack=False) as pub:
        async with session(mosquitto, "etk-t-ack", subscriptions=("t/#",),
                           on_message=collect) as sub:
            for body in (b"ack-1", b"keep-1", b"ack-2", b"keep-2"):
                assert await pub.publish("t/x", body)
            await until(lambda: len(got) == 4)
            for m in got:
                if m.payload.startswith(b"ack"):
                    sub.ack(m)
        first = [m.payload for m in got]
        got.clear()
        async with session(mosquitto, "etk-t-ack", subscriptions=("t/#",),
                           on_message=collect) as sub:
            assert await pub.publish("t/x", b"end")
            await until(lambda: any(m.payload == b"end" for m in got))
            assert all(m.generation == sub.generation for m in got)
    assert first == [b"ack-1", b"keep-1", b"ack-2", b"keep-2"]
    # The broker resent exactly what was never acknowledged, before anything new.
    assert [m.payload for m in got] == [b"keep-1", b"keep-2", b"end"]


@pytest.mark.asyncio
async def test_the_broker_keeps_to_our_receive_maximum(mosquitto: Broker,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mqttlink, "RECEIVE_MAXIMUM", 5)
    got: list[InMessage] = []

    async def collect(m: InMessage) -> None:
        got.append(m)

    async with session(mosquitto, "etk-t-pub", manual_ack=False) as pub, \
            session(mosquitto, "etk-t-rm", subscriptions=("rm",), on_message=collect) as sub:
        for i in range(12):
            assert await pub.publish("rm", str(i).encode())
        await until(lambda: len(got) >= 5)
        await asyncio.sleep(0.3)  # room for the broker to overshoot, if it would
        # Only the first window is checked: after PUBACKs, mosquitto before 2.0.13 releases
        # a whole window per PUBACK (inflight quota bugs, eclipse-mosquitto/mosquitto#2301).
        assert len(got) == 5
        acked = 0
        while acked < 12:
            for m in got[acked:]:
                sub.ack(m)
            acked = len(got)
            await until(lambda: len(got) > acked or len(got) == 12)  # noqa: B023
    assert [m.payload for m in got] == [str(i).encode() for i in range(12)]


@pytest.mark.asyncio
async def test_a_slow_handler_stops_reading_the_socket(mosquitto: Broker,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # QoS 0 has no Receive Maximum (nor has a broker that overshoots it): TCP must hold it.
    monkeypatch.setattr(mqttconn, "READ_PAUSE_AT", 50)
    release = asyncio.Event()
    got: list[bytes] = []

    async def slow(m: InMessage) -> None:
        await release.wait()
        got.append(m.payload)

    bodies = [b"%05d" % i + b"." * 200 for i in range(3000)]
    async with session(mosquitto, "etk-t-pub", manual_ack=False) as pub, \
            session(mosquitto, "etk-t-slow", subscriptions=("flood",), on_message=slow) as sub:
        assert sub._conn is not None
        conn = sub._conn
        for body in bodies:
            assert await pub.publish("flood", body, qos=0)
        assert await pub.publish("flood", b"sync")  # QoS 1: the broker has them all
        await until(lambda: len(conn.inbox) >= 50)
        held = len(conn.inbox)
        await asyncio.sleep(0.3)  # the broker has more for us: room to read, if we would
        assert len(conn.inbox) == held < len(bodies)
        release.set()
        await until(lambda: got[-1:] == [b"sync"])
    assert got == [*bodies, b"sync"]


@pytest.mark.asyncio
async def test_a_lost_broker_fails_publishes_and_the_session_comes_back(
        mosquitto: Broker) -> None:
    got: list[bytes] = []

    async def collect(m: InMessage) -> None:
        got.append(m.payload)

    async with session(mosquitto, "etk-t-back", manual_ack=False, subscriptions=("back",),
                       on_message=collect) as s:
        mosquitto.stop()
        await until(lambda: not s.connected.is_set())
        assert not await s.publish("back", b"lost", wait_s=0)
        assert s.last_error
        mosquitto.start()
        async with asyncio.timeout(LIMIT_S):
            await s.connected.wait()
        assert s.connects == 2
        assert await s.publish("back", b"again")  # resubscribed: our own message comes back
        await until(lambda: got == [b"again"])


@pytest.mark.asyncio
async def test_will_on_a_lost_link_and_the_final_message_on_close(mosquitto: Broker) -> None:
    status: list[bytes] = []

    async def collect(m: InMessage) -> None:
        status.append(m.payload)

    def node(tag: str) -> dict[str, Any]:
        return {"will": Outgoing(f"st/{tag}", b"offline"),
                "on_connect": [Outgoing(f"st/{tag}", b"online")]}

    async with session(mosquitto, "etk-t-watch", manual_ack=False, subscriptions=("st/+",),
                       on_message=collect):
        async with session(mosquitto, "etk-t-a", **node("a")) as a:
            await until(lambda: status == [b"online"])
            assert a._conn is not None
            a._conn.abort(MqttError("injected: the link drops"))  # no DISCONNECT sent
            await until(lambda: status[-1:] == [b"offline"])
            await until(lambda: a.connects == 2 and status[-1:] == [b"online"])
        status.clear()
        async with session(mosquitto, "etk-t-b", final=Outgoing("st/b", b"stopped"),
                           **node("b")):
            await until(lambda: status == [b"online"])
        await until(lambda: status == [b"online", b"stopped"])
        async with session(mosquitto, "etk-t-probe", manual_ack=False):
            pass  # one more round trip through the broker: a Will would have arrived by now
    assert status == [b"online", b"stopped"]  # a clean close drops the Will


@pytest.mark.slow
@pytest.mark.asyncio
async def test_keepalive_gives_up_on_a_broker_that_stopped_answering(
        mosquitto: Broker) -> None:
    async with session(mosquitto, "etk-t-ka", mqtt={"keepalive_s": 5}) as s:
        assert mosquitto.proc is not None
        mosquitto.proc.send_signal(signal.SIGSTOP)  # the socket stays open; nothing answers
        try:
            await until(lambda: "keepalive" in (s.last_error or ""))
            assert not s.connected.is_set()
        finally:
            mosquitto.proc.send_signal(signal.SIGCONT)
        async with asyncio.timeout(LIMIT_S):
            await s.connected.wait()


@pytest.mark.asyncio
async def test_a_retry_loop_across_a_lost_broker_waits_instead_of_spinning(
        mosquitto: Broker) -> None:
    """A caller that retries publish() in a loop, as a sensor outbox does, must not starve
    the session while the link is gone but not yet noticed: it waits for the reconnect."""
    async with session(mosquitto, "etk-t-retry", manual_ack=False) as s:
        assert await s.publish("retry", b"first")
        mosquitto.stop()
        tries = 0

        async def outbox() -> None:
            nonlocal tries
            while not await s.publish("retry", b"again", wait_s=LIMIT_S, ack_s=2.0):
                tries += 1

        task = asyncio.ensure_future(outbox())
        await asyncio.sleep(0.5)  # the loop runs while the broker is down
        mosquitto.start()
        async with asyncio.timeout(LIMIT_S):
            await task
        assert s.connects == 2
        # Each failed try was a wait for a connection, not a spin on a stale flag.
        assert tries < 50, tries
