"""Our MQTT client where links end, brokers set limits, and configs change: the session must
neither lose nor stall, nor storm the broker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import Broker, free_port
from harness import until

from edgetok import mqttconn, mqttlink
from edgetok.mqttlink import InMessage, MqttError, MqttSession, Outgoing
from edgetok.mqttwire import SUBACK, packet, publish_packet, read_varint
from edgetok.settings import MqttSettings

LIMIT_S = 20.0


# A scripted broker, for what a real one will not produce on cue -------------------------
async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One control packet from the client: (first byte, body)."""
    head = await reader.readexactly(2)
    raw = bytearray(head)
    while raw[-1] & 0x80:
        raw += await reader.readexactly(1)
    length, _ = read_varint(raw, 1)
    return raw[0], await reader.readexactly(length)


Script = Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def scripted_broker(script: Script) -> AsyncIterator[list[int]]:
    """A listener running `script(n, reader, writer)` for its n-th connection (from 1);
    yields the port in a one-element list."""
    count = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        try:
            await script(count, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield [server.sockets[0].getsockname()[1]]
    finally:
        server.close()


async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """CONNECT → CONNACK, SUBSCRIBE → SUBACK granting QoS 1."""
    await read_packet(reader)
    writer.write(b"\x20\x03\x00\x00\x00")
    first, body = await read_packet(reader)
    assert first == 0x82
    writer.write(packet(SUBACK, body[:2] + b"\x00\x01"))
    await writer.drain()


def fast(port: int, **extra: Any) -> MqttSettings:
    return MqttSettings(host="127.0.0.1", port=port, reconnect_min_s=0.05,
                        reconnect_max_s=0.05, **extra)


@pytest.mark.asyncio
async def test_messages_received_before_the_link_ends_are_all_handled() -> None:
    sent = [publish_packet("s/x", b"%d" % i, 0, False, 0) for i in range(200)] \
        + [publish_packet("s/x", b"q1-%d" % i, 1, False, i + 1) for i in range(3)]

    async def script(n: int, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await accept(reader, writer)
        if n == 1:  # a burst, then the broker goes away (as on a restart)
            writer.write(b"".join(sent) + b"\xe0\x02\x8b\x00")
            await writer.drain()
        await reader.read()  # hold the link until the client drops it

    got: list[bytes] = []
    cancelled = 0

    async def handler(m: InMessage) -> None:
        nonlocal cancelled
        try:
            await asyncio.sleep(0)  # a handler that yields, as a queue put or commit does
        except asyncio.CancelledError:
            cancelled += 1
            raise
        got.append(m.payload)
        s.ack(m)  # for a link that is gone: must be a harmless no-op

    async with scripted_broker(script) as (port,):
        s = MqttSession(fast(port), "etk-drain", password=None, subscriptions=["s/#"],
                        on_message=handler)
        task = asyncio.create_task(s.run())
        try:
            await until(lambda: s.connects == 2 and s.connected.is_set())
        finally:
            await s.close()
            await task
    # Everything read before the DISCONNECT was handled, once each, in order.
    assert got == [b"%d" % i for i in range(200)] + [b"q1-%d" % i for i in range(3)]
    assert cancelled == 0
    assert s.last_error is not None and "Server shutting down" in s.last_error


def mqtt_settings(broker: Broker, **extra: Any) -> MqttSettings:
    return MqttSettings(host="127.0.0.1", port=broker.port, reconnect_min_s=0.1,
                        reconnect_max_s=0.5, **extra)


@asynccontextmanager
async def running(s: MqttSession) -> AsyncIterator[MqttSession]:
    """Run a session for the body, connected or not, and close it after."""
    task = asyncio.create_task(s.run())
    try:
        yield s
    finally:
        await s.close()
        await task


@pytest.mark.asyncio
async def test_setup_completes_behind_more_retained_messages_than_the_read_pause(
        mosquitto: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mqttconn, "READ_PAUSE_AT", 50)
    async with running(MqttSession(mqtt_settings(mosquitto), "etk-fill", password=None,
                                   manual_ack=False)) as pub:
        for i in range(300):
            assert await pub.publish(f"r/{i}", b"v", qos=0, retain=True, wait_s=LIMIT_S)
        assert await pub.publish("r/last", b"sync", retain=True)
    got: list[str] = []

    async def handler(m: InMessage) -> None:
        # A handler that needs the session up, as one that publishes a reply does.
        await s.connected.wait()
        got.append(m.topic)

    s = MqttSession(mqtt_settings(mosquitto), "etk-retained", password=None,
                    subscriptions=["r/#"], on_connect=[Outgoing("st/gw", b"online")],
                    on_message=handler, manual_ack=False)
    async with running(s):
        await until(s.connected.is_set)
        await until(lambda: len(got) == 301)
        assert s.connects == 1 and s.last_error is None
    assert sorted(got) == sorted([f"r/{i}" for i in range(300)] + ["r/last"])


@pytest.mark.asyncio
async def test_close_interrupts_a_setup_the_broker_never_answers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mqttlink, "PUBLISH_TIMEOUT_S", 3600.0)
    subscribed = asyncio.Event()

    async def script(n: int, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await read_packet(reader)
        writer.write(b"\x20\x03\x00\x00\x00")
        await read_packet(reader)  # SUBSCRIBE, never answered
        subscribed.set()
        await reader.read()

    async with scripted_broker(script) as (port,):
        s = MqttSession(fast(port), "etk-mute", password=None, subscriptions=["s/#"])
        task = asyncio.create_task(s.run())
        async with asyncio.timeout(LIMIT_S):
            await subscribed.wait()
            await s.close(timeout_s=LIMIT_S)  # returns once run() has ended
            await task
    assert task.done() and not s.connected.is_set()


@pytest.mark.asyncio
async def test_a_handler_stalled_past_the_keepalive_keeps_the_link(
        mosquitto: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mqttconn, "READ_PAUSE_AT", 50)
    keepalive = 1  # below what config allows, so the stall need not be long
    release = asyncio.Event()
    got: list[bytes] = []

    async def stalled(m: InMessage) -> None:
        await release.wait()
        got.append(m.payload)

    bodies = [b"%05d" % i + b"." * 200 for i in range(3000)]
    sub = MqttSession(mqtt_settings(mosquitto).model_copy(update={"keepalive_s": keepalive}),
                      "etk-stalled", password=None, subscriptions=["flood"],
                      on_message=stalled, manual_ack=False)
    async with running(MqttSession(mqtt_settings(mosquitto), "etk-pub", password=None,
                                   manual_ack=False)) as pub, running(sub):
        await until(lambda: sub.connected.is_set() and pub.connected.is_set())
        conn = sub._conn
        assert conn is not None
        for body in bodies:
            assert await pub.publish("flood", body, qos=0)
        await until(lambda: conn.reading_paused)
        # Wait until we have kept the link alive for well past 1.5 keepalives of silence
        # from a broker we are not reading, or until it was (wrongly) given up.
        await until(lambda: conn.lost is not None
                    or conn.last_tx - conn.last_rx > 2 * keepalive)
        assert conn.lost is None and conn.reading_paused
        release.set()
        await until(lambda: len(got) == len(bodies))
        assert sub.connects == 1 and sub.last_error is None
    assert got == bodies


@pytest.mark.asyncio
async def test_a_link_that_fails_right_after_connecting_backs_off(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite ok/#\n")  # the birth below is not allowed
    broker = Broker(free_port(), tmp_path / "broker", extra_conf=f"acl_file {acl}\n")
    broker.start()
    try:
        s = MqttSession(MqttSettings(host="127.0.0.1", port=broker.port, reconnect_min_s=0.01,
                                     reconnect_max_s=0.08), "etk-storm", password=None,
                        on_connect=[Outgoing("st/gw", b"online")], manual_ack=False)

        def delays() -> list[float]:
            return [r.args[-1] for r in caplog.records
                    if r.name == "edgetok.mqttlink" and "retrying" in r.getMessage()
                    and isinstance(r.args, tuple)]

        async with running(s):
            await until(lambda: len(delays()) >= 5)
        assert s.connects >= 5  # each try got a CONNACK, then the birth was refused
        assert delays()[:5] == [0.01, 0.02, 0.04, 0.08, 0.08]
        assert s.last_error is not None and "Not authorized" in s.last_error
    finally:
        broker.stop()


@pytest.mark.parametrize("limits", ["retain_available false", "max_qos 0",
                                    "retain_available false\nmax_qos 0"])
@pytest.mark.asyncio
async def test_a_broker_without_retain_or_qos_1_gets_what_it_supports(
        tmp_path: Path, limits: str, caplog: pytest.LogCaptureFixture) -> None:
    broker = Broker(free_port(), tmp_path / "broker", extra_conf=limits + "\n")
    broker.start()
    got: list[InMessage] = []

    async def collect(m: InMessage) -> None:
        got.append(m)

    status = {"will": Outgoing("st/gw", b"offline"),
              "on_connect": [Outgoing("st/gw", b"online")]}  # retained, QoS 1
    try:
        async with running(MqttSession(mqtt_settings(broker), "etk-watch", password=None,
                                       subscriptions=["st/#", "d/#"], on_message=collect,
                                       manual_ack=False)) as watch, \
                running(MqttSession(mqtt_settings(broker), "etk-gw", password=None,
                                    manual_ack=False, **status)) as gw:
            await until(lambda: watch.connected.is_set() and gw.connected.is_set())
            assert await gw.publish("d/x", b"decision", qos=1, retain=True)
            await until(lambda: [m.payload for m in got] == [b"online", b"decision"])
            assert gw.connected.is_set() and gw.connects == 1  # not dropped for them
            assert gw._conn is not None
            gw._conn.abort(MqttError("injected: the link drops"))
            await until(lambda: [m.payload for m in got][-1:] == [b"offline"])
        lowered = [r.getMessage() for r in caplog.records if "does not support" in r.getMessage()]
        assert len(lowered) == limits.count("\n") + 1  # once each, not once a message
    finally:
        broker.stop()


@pytest.mark.asyncio
async def test_a_filter_dropped_from_the_config_is_unsubscribed_from_the_session(
        mosquitto: Broker, tmp_path: Path) -> None:
    held = tmp_path / "subscriptions.json"
    got: list[bytes] = []

    async def collect(m: InMessage) -> None:
        got.append(m.payload)

    def gateway(*filters: str) -> MqttSession:
        return MqttSession(mqtt_settings(mosquitto), "etk-reconf", password=None,
                           subscriptions=filters, on_message=collect, manual_ack=False,
                           subscriptions_file=held)

    async with running(MqttSession(mqtt_settings(mosquitto), "etk-pub", password=None,
                                   manual_ack=False)) as pub:
        async with running(gateway("old/#", "keep/#")) as s:
            await until(s.connected.is_set)
        assert await pub.publish("keep/x", b"queued while away", wait_s=LIMIT_S)
        async with running(gateway("keep/#", "new/+")) as s:  # the config changed
            await until(s.connected.is_set)
            for topic in ("old/x", "keep/x", "new/x"):
                assert await pub.publish(topic, topic.encode())
            await until(lambda: got[-1:] == [b"new/x"])
    # The kept filter's queue survived; the dropped filter delivers nothing.
    assert got == [b"queued while away", b"keep/x", b"new/x"]
    assert json.loads(held.read_text()) == ["keep/#", "new/+"]


@pytest.mark.asyncio
async def test_the_maximum_packet_size_counts_bytes_and_bounds_subscribe_too(
        tmp_path: Path) -> None:
    broker = Broker(free_port(), tmp_path / "broker", extra_conf="max_packet_size 100\n")
    broker.start()
    got: list[str] = []

    async def collect(m: InMessage) -> None:
        got.append(m.topic)

    # Together one SUBSCRIBE over 100 bytes; each fits on its own but the last.
    filters = [f"sub/{i}/" + "f" * 20 for i in range(5)]
    try:
        async with running(MqttSession(
                mqtt_settings(broker), "etk-small", password=None, manual_ack=False,
                subscriptions=[*filters, "big/" + "b" * 120], on_message=collect)) as s:
            await until(s.connected.is_set)
            assert s.refused_filters == {"big/" + "b" * 120: "[code:149] Packet too large"}
            # 30 characters but 60 bytes: with the headers over 100 bytes.
            big = await s.publish("ü" * 30, b"y" * 40)
            assert big.refused and big.code == 0x95
            bad = await s.publish("t/\udcff", b"x")  # a lone surrogate: no UTF-8 for it
            assert bad.refused and bad.code == 0x90
            assert (await s.publish("t/+", b"x")).code == 0x90  # wildcards are for filters
            for f in filters:
                assert await s.publish(f, b"x")
            await until(lambda: len(got) == len(filters))
            assert s.connects == 1 and s.connected.is_set()
    finally:
        broker.stop()
    assert got == filters


@pytest.mark.asyncio
async def test_refused_subscriptions_are_reported_and_the_rest_work() -> None:
    # Scripted: mosquitto 2.0.11's acl_file grants every SUBSCRIBE (it filters on delivery).
    sent: list[bytes] = []

    async def script(n: int, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await read_packet(reader)
        writer.write(b"\x20\x03\x00\x00\x00")
        _, body = await read_packet(reader)
        sent.append(body)
        writer.write(packet(SUBACK, body[:2] + b"\x00\x01\x87"))  # the second: refused
        writer.write(publish_packet("ok/x", b"works", 0, False, 0))
        await reader.read()

    got: list[bytes] = []

    async def collect(m: InMessage) -> None:
        got.append(m.payload)

    # The operator's typo would make mosquitto drop the connection: refused here instead.
    filters = ["ok/#", "sensors/#/bad", "secret/#"]
    async with scripted_broker(script) as (port,), running(MqttSession(
            fast(port), "etk-refused", password=None, manual_ack=False,
            subscriptions=filters, on_message=collect)) as s:
        await until(lambda: s.connected.is_set() and got == [b"works"])
        assert s.refused_filters == {"secret/#": "[code:135] Not authorized",
                                     "sensors/#/bad": "[code:143] Topic Filter invalid"}
        assert s.last_error is not None and "secret/#" in s.last_error \
            and "sensors/#/bad" in s.last_error
        assert s.connects == 1
    assert len(sent) == 1 and b"ok/#" in sent[0] and b"secret/#" in sent[0]
    assert b"bad" not in sent[0]  # never sent to the broker


def test_the_health_summary_names_refused_subscriptions() -> None:
    from types import SimpleNamespace

    from edgetok.gateway.health import Health

    session = SimpleNamespace(connected=asyncio.Event(), last_error=None,
                              refused_filters={"secret/#": "[code:135] Not authorized"})
    session.connected.set()
    gw = SimpleNamespace(
        cfg=SimpleNamespace(streams=[SimpleNamespace(deadline_ms=100.0)]), session=session,
        inferencer=SimpleNamespace(decision=SimpleNamespace(variant="v", precision="fp32")),
        counters={"results": 0}, inflight={}, store=SimpleNamespace(journal_rows=0))
    assert Health(gw).summary().endswith("; subscriptions refused: secret/#")  # type: ignore[arg-type]
