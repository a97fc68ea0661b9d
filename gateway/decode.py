"""Decode and validate one sensor payload into timestamped readings, or say exactly why not."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from paho.mqtt.client import topic_matches_sub

from edgetok.gateway.config import StreamConfig

# A chunked message may carry many readings; the cap keeps one message from flooding memory.
MAX_READINGS_PER_MESSAGE = 10_000
# A chunk whose median sample spacing is off the stream's period by more than this fraction
# comes from a sensor at another rate. Looser accepts clock drift and jitter; tighter
# catches smaller rate mistakes (e.g. 10 Hz against 12 Hz is 17 % off).
RATE_TOLERANCE = 0.15
# The model computes in float32: a value beyond its range would become inf in the tokenizer.
FLOAT32_MAX = 3.4028234663852886e38
# Topics remembered by a Router (a few per sensor in practice). A sensor that puts an id in
# every topic would grow the cache without end; at this size it starts over.
ROUTE_CACHE = 4096


class DecodeError(ValueError):
    """A payload was rejected; `reason` is a short stable code (metrics, dead letters)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True, slots=True)
class Reading:
    """One timestamp and the channels this message carries for it."""

    ts: float
    values: dict[str, float]


def _number(v: object, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise DecodeError("bad_type", f"{where} is {type(v).__name__}, expected a number")
    try:
        x = float(v)
    except OverflowError:  # an integer beyond float range, e.g. 10**400
        raise DecodeError("non_finite", f"{where} is out of float range") from None
    if not math.isfinite(x):
        raise DecodeError("non_finite", f"{where} is {x}")
    if abs(x) > FLOAT32_MAX:
        raise DecodeError("out_of_range", f"{where} is {x:.3g}, beyond float32")
    return x


def _fields(stream: StreamConfig) -> tuple[tuple[str, str], ...]:
    """(channel, JSON field) of every channel of a stream, in channel order."""
    return tuple((c, stream.field_of(c)) for c in stream.channels)


def decode_json(payload: bytes, stream: StreamConfig, now: float,
                fields: tuple[tuple[str, str], ...] | None = None) -> list[Reading]:
    """Parse a JSON reading (scalars) or chunk (equal-length arrays) for `stream`.

    `fields` is `_fields(stream)`, passed by callers that decode many messages.
    """
    if len(payload) > stream.max_payload_bytes:
        raise DecodeError("too_large", f"{len(payload)} bytes > limit "
                          f"{stream.max_payload_bytes}")
    if not payload:  # json would say "Expecting value", which sends an operator the wrong way
        raise DecodeError("empty", "empty payload (0 bytes)")
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError covers JSONDecodeError
        raise DecodeError("bad_json", str(exc)[:200]) from exc
    except RecursionError:  # [[[[...]]]] nested deeper than the parser's stack
        raise DecodeError("bad_json", "nested too deeply") from None
    if not isinstance(doc, dict):
        raise DecodeError("bad_type", f"payload is a JSON {type(doc).__name__}, expected object")
    tsf = stream.timestamp_field
    if tsf not in doc:
        raise DecodeError("missing_field", f"no timestamp field {tsf!r}")
    raw_ts = doc[tsf]
    pairs = [(c, f) for c, f in (fields or _fields(stream)) if f in doc]
    if not pairs:
        raise DecodeError("missing_field", f"none of the channels {stream.channels} present")
    if type(raw_ts) is float and now - stream.max_past_s <= raw_ts <= now + stream.max_future_s:
        # The common shape, one reading of finite floats, without the general checks; the
        # comparisons are False for NaN and infinities, which take the general path.
        values = {}
        for c, f in pairs:
            v = doc[f]
            values[c] = v if type(v) is float and -FLOAT32_MAX <= v <= FLOAT32_MAX \
                else _number(v, f)
        return [Reading(raw_ts, values)]
    present = [c for c, _ in pairs]
    chunked = isinstance(raw_ts, list)
    if chunked:
        n = len(raw_ts)
        if n == 0:
            raise DecodeError("empty", "empty chunk")
        if n > MAX_READINGS_PER_MESSAGE:
            raise DecodeError("too_large", f"{n} readings > {MAX_READINGS_PER_MESSAGE}")
        stamps = [_number(t, f"{tsf}[{i}]") for i, t in enumerate(raw_ts)]
    else:
        n, stamps = 1, [_number(raw_ts, tsf)]
    columns: dict[str, list[float]] = {}
    for c, f in pairs:
        v = doc[f]
        if chunked:
            if not isinstance(v, list) or len(v) != n:
                raise DecodeError("length_mismatch", f"{f!r} must be an array of {n} numbers")
            columns[c] = [_number(x, f"{f}[{i}]") for i, x in enumerate(v)]
        else:
            columns[c] = [_number(v, f)]
    if n > 1:
        _check_rate(stamps, stream)
    lo, hi = min(stamps), max(stamps)
    if lo < now - stream.max_past_s:
        raise DecodeError("stale", f"timestamp {lo:.3f} is more than {stream.max_past_s:.0f}s "
                          "in the past")
    if hi > now + stream.max_future_s:
        raise DecodeError("future", f"timestamp {hi:.3f} is more than "
                          f"{stream.max_future_s:.0f}s ahead of the gateway clock")
    return [Reading(stamps[i], {c: columns[c][i] for c in present}) for i in range(n)]


class Router:
    """Routes topics to streams (remembering each topic's stream) and decodes payloads."""

    def __init__(self, streams: Sequence[StreamConfig]) -> None:
        self.streams = list(streams)
        self._routes: dict[str, StreamConfig | None] = {}
        self._fields = {s.name: _fields(s) for s in self.streams}

    def route(self, topic: str) -> StreamConfig | None:
        """The first stream with a filter matching `topic`, or None."""
        try:
            return self._routes[topic]
        except KeyError:
            pass
        stream = next((s for s in self.streams
                       if any(topic_matches_sub(f, topic) for f in s.topics)), None)
        if len(self._routes) >= ROUTE_CACHE:
            self._routes.clear()
        self._routes[topic] = stream
        return stream

    def admit(self, topic: str, payload: bytes, accepts: Callable[[str, float], bool],
              now: float) -> tuple[StreamConfig, list[Reading], int]:
        """Route and decode one message: its stream, the readings still wanted, and how many
        came too late (their windows have closed). DecodeError if it is no input at all."""
        stream = self.route(topic)
        if stream is None:
            raise DecodeError("unknown_topic", "matches no stream")
        readings = decode_json(payload, stream, now, self._fields[stream.name])
        fresh = [r for r in readings if accepts(stream.name, r.ts)]
        return stream, fresh, len(readings) - len(fresh)


def _check_rate(stamps: list[float], stream: StreamConfig) -> None:
    """Reject a chunk sampled at another rate than the stream's (duplicates do not count)."""
    ordered = sorted(set(stamps))
    gaps = sorted(b - a for a, b in itertools.pairwise(ordered))
    if not gaps:
        return
    spacing = gaps[len(gaps) // 2]
    if abs(spacing * stream.rate_hz - 1.0) > RATE_TOLERANCE:
        raise DecodeError("bad_rate", f"samples {spacing:.6g}s apart; stream {stream.name!r} "
                          f"expects {1 / stream.rate_hz:.6g}s ({stream.rate_hz:g} Hz)")
