"""MQTT v5 packet encoding and decoding: what edgetok exchanges with a broker.

Only what edgetok uses (MQTT 5.0, OASIS standard, 2019): QoS 0 and 1 in both directions,
subscribing and unsubscribing, a Will, keepalive and a clean DISCONNECT; no QoS 2, topic
aliases or AUTH.
edgetok.mqttconn runs these packets over an asyncio connection.
"""

from __future__ import annotations

from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK = 0x10, 0x20, 0x30, 0x40
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 0x82, 0x90, 0xC0, 0xD0, 0xE0
UNSUBSCRIBE, UNSUBACK = 0xA2, 0xB0
PING = bytes((PINGREQ, 0))
# DISCONNECT with reason 0 (normal): the broker discards the Will.
BYE = bytes((DISCONNECT, 0))

# Property identifiers we read or write (MQTT 5.0, section 2.2.2.2).
P_SESSION_EXPIRY, P_SERVER_KEEPALIVE, P_REASON_STRING = 0x11, 0x13, 0x1F
P_RECEIVE_MAXIMUM, P_MAXIMUM_PACKET_SIZE = 0x21, 0x27
P_MAXIMUM_QOS, P_RETAIN_AVAILABLE = 0x24, 0x25
_BYTE, _U16, _U32, _VARINT, _STR, _BIN, _PAIR = range(7)
PROPERTY_TYPES = {
    0x01: _BYTE, 0x02: _U32, 0x03: _STR, 0x08: _STR, 0x09: _BIN, 0x0B: _VARINT, 0x11: _U32,
    0x12: _STR, 0x13: _U16, 0x15: _STR, 0x16: _BIN, 0x17: _BYTE, 0x18: _U32, 0x19: _BYTE,
    0x1A: _STR, 0x1C: _STR, 0x1F: _STR, 0x21: _U16, 0x22: _U16, 0x23: _U16, 0x24: _BYTE,
    0x25: _BYTE, 0x26: _PAIR, 0x27: _U32, 0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE}

# Reason codes (section 2.4) as brokers report them; the text is what users will search for.
REASONS = {
    0x00: "Success", 0x04: "Disconnect with Will Message", 0x10: "No matching subscribers",
    0x11: "No subscription existed",
    0x80: "Unspecified error", 0x81: "Malformed Packet", 0x82: "Protocol Error",
    0x83: "Implementation specific error", 0x84: "Unsupported Protocol Version",
    0x85: "Client Identifier not valid", 0x86: "Bad User Name or Password",
    0x87: "Not authorized", 0x88: "Server unavailable", 0x89: "Server busy", 0x8A: "Banned",
    0x8B: "Server shutting down", 0x8C: "Bad authentication method",
    0x8D: "Keep Alive timeout", 0x8E: "Session taken over", 0x8F: "Topic Filter invalid",
    0x90: "Topic Name invalid", 0x91: "Packet Identifier in use",
    0x93: "Receive Maximum exceeded", 0x94: "Topic Alias invalid", 0x95: "Packet too large",
    0x96: "Message rate too high", 0x97: "Quota exceeded", 0x98: "Administrative action",
    0x99: "Payload format invalid", 0x9A: "Retain not supported", 0x9B: "QoS not supported",
    0x9C: "Use another server", 0x9D: "Server moved",
    0x9E: "Shared Subscriptions not supported", 0x9F: "Connection rate exceeded",
    0xA0: "Maximum connect time", 0xA1: "Subscription Identifiers not supported",
    0xA2: "Wildcard Subscriptions not supported"}
# A server that sends no Receive Maximum allows this many unacknowledged QoS 1 publishes.
DEFAULT_SERVER_RECEIVE_MAXIMUM = 65535


class MqttError(Exception):
    """A connection failed, was refused or was lost; the text says why."""


def reason(code: int) -> str:
    """A reason code as text, e.g. '[code:135] Not authorized'."""
    return f"[code:{code}] {REASONS.get(code, 'Unknown reason')}"


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
class ConnAck:
    """What the broker granted in CONNACK."""

    session_present: bool
    receive_maximum: int
    keepalive_s: int | None
    maximum_packet_size: int | None
    maximum_qos: int = 1  # of what we use: QoS 2 would be 2
    retain_available: bool = True


def varint(n: int) -> bytes:
    """A Variable Byte Integer."""
    out = bytearray()
    while True:
        n, b = n >> 7, n & 0x7F
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def read_varint(buf: bytes | bytearray, pos: int) -> tuple[int, int]:
    """Decode a Variable Byte Integer at pos: (value, position after it), or (-1, pos) if
    the buffer ends inside it."""
    value = shift = 0
    for i in range(pos, pos + 4):
        if i >= len(buf):
            return -1, pos
        b = buf[i]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i + 1
        shift += 7
    raise MqttError(reason(0x81) + ": variable byte integer longer than 4 bytes")


def _str(s: str | bytes) -> bytes:
    """A UTF-8 string or binary data with its two-byte length."""
    raw = s.encode() if isinstance(s, str) else s
    return len(raw).to_bytes(2, "big") + raw


def packet(first: int, body: bytes) -> bytes:
    """A control packet: fixed header (type and flags, remaining length) and body."""
    return bytes((first,)) + varint(len(body)) + body


Props = dict[int, int | str | bytes]


def read_properties(buf: bytes | bytearray, pos: int) -> tuple[Props, int]:
    """Properties at pos as {id: value} (user properties dropped); and the end position."""
    length, pos = read_varint(buf, pos)
    if length < 0:
        raise MqttError(reason(0x81) + ": truncated properties")
    end, props = pos + length, {}
    while pos < end:
        pid, kind = buf[pos], PROPERTY_TYPES.get(buf[pos])
        pos += 1
        value: int | str | bytes
        if kind == _BYTE:
            value, pos = buf[pos], pos + 1
        elif kind in (_U16, _U32):
            width = 2 if kind == _U16 else 4
            value, pos = int.from_bytes(buf[pos:pos + width], "big"), pos + width
        elif kind == _VARINT:
            value, pos = read_varint(buf, pos)
        elif kind is not None:
            raw = b""
            for _ in range(2 if kind == _PAIR else 1):  # a user property is a string pair
                n = int.from_bytes(buf[pos:pos + 2], "big")
                raw, pos = bytes(buf[pos + 2:pos + 2 + n]), pos + 2 + n
            value = raw.decode(errors="replace") if kind == _STR else raw
        else:
            raise MqttError(reason(0x81) + f": unknown property 0x{pid:02x}")
        if kind != _PAIR:
            props[pid] = value
    if pos != end:
        raise MqttError(reason(0x81) + ": property length mismatch")
    return props, end


def reason_string(props: Props) -> str:
    """The broker's Reason String, if it sent one, for an error message."""
    text = props.get(P_REASON_STRING)
    return f" ({text})" if isinstance(text, str) and text else ""


def int_property(props: Props, pid: int) -> int | None:
    """An integer property, or None if absent."""
    value = props.get(pid)
    return value if isinstance(value, int) else None


def connect_packet(client_id: str, *, keepalive_s: int, clean_start: bool,
                   session_expiry_s: int, receive_maximum: int, username: str | None,
                   password: str | None, will: tuple[str, bytes, int, bool] | None) -> bytes:
    """CONNECT; `will` is (topic, payload, qos, retain)."""
    flags = 0x02 if clean_start else 0
    tail = b""
    if will is not None:
        topic, payload, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        tail += b"\x00" + _str(topic) + _str(payload)  # no Will properties
    if username is not None:
        flags |= 0x80
        tail += _str(username)
    if password is not None:
        flags |= 0x40
        tail += _str(password)
    props = (bytes((P_SESSION_EXPIRY,)) + session_expiry_s.to_bytes(4, "big")
             + bytes((P_RECEIVE_MAXIMUM,)) + receive_maximum.to_bytes(2, "big"))
    body = (_str("MQTT") + bytes((5, flags)) + keepalive_s.to_bytes(2, "big")
            + varint(len(props)) + props + _str(client_id) + tail)
    return packet(CONNECT, body)


def publish_packet(topic: str | bytes, payload: bytes, qos: int, retain: bool,
                   mid: int) -> bytes:
    """PUBLISH without properties; the topic as text or as UTF-8."""
    body = _str(topic) + (mid.to_bytes(2, "big") if qos else b"") + b"\x00" + payload
    return packet(PUBLISH | (qos << 1) | (1 if retain else 0), body)


def subscribe_packet(mid: int, filters: list[str], qos: int) -> bytes:
    """SUBSCRIBE to every filter at `qos` (no local-echo or retain options changed)."""
    body = mid.to_bytes(2, "big") + b"\x00" + b"".join(_str(f) + bytes((qos,))
                                                      for f in filters)
    return packet(SUBSCRIBE, body)


def unsubscribe_packet(mid: int, filters: list[str]) -> bytes:
    """UNSUBSCRIBE from every filter."""
    return packet(UNSUBSCRIBE, mid.to_bytes(2, "big") + b"\x00" + b"".join(map(_str, filters)))
