"""Each kind of bad payload is rejected with its own stable reason code; good ones pass."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetok.gateway import decode as decode_mod
from edgetok.gateway.config import StreamConfig
from edgetok.gateway.decode import DecodeError, Router, decode_json

NOW = time.time()
STREAM = StreamConfig(name="imu", topics=["sensors/imu", "sensors/imu/+"],
                      channels=["x", "y"], rate_hz=10.0, window=100, max_payload_bytes=2048)


def chunk(n: int, step: float = 0.1, t0: float = NOW - 60) -> bytes:
    return json.dumps({"ts": [t0 + i * step for i in range(n)], "x": [1.0] * n,
                       "y": [2.0] * n}).encode()


@pytest.mark.parametrize(("payload", "reason"), [
    (b"", "empty"),
    (b"\xff\x00garbage", "bad_json"),
    (b"[" * 2000, "bad_json"),  # deeper than the parser recurses, within the size limit
    (b'"a string"', "bad_type"),
    (b'{"ts": "now", "x": 1}', "bad_type"),
    (b'{"ts": true, "x": 1}', "bad_type"),
    (b'{"x": 1}', "missing_field"),
    (f'{{"ts": {NOW}}}'.encode(), "missing_field"),
    (f'{{"ts": {NOW}, "x": NaN}}'.encode(), "non_finite"),
    (f'{{"ts": {NOW}, "x": -Infinity}}'.encode(), "non_finite"),
    (f'{{"ts": {NOW}, "x": 1{"0" * 400}}}'.encode(), "non_finite"),
    (f'{{"ts": {NOW}, "x": 1e39}}'.encode(), "out_of_range"),
    (b'{"ts": [], "x": []}', "empty"),
    (f'{{"ts": [{NOW}, {NOW + 0.1}], "x": [1]}}'.encode(), "length_mismatch"),
    (b'{"ts": 1, "x": [' + b"0," * 1200 + b"0]}", "too_large"),
    (f'{{"ts": {NOW + 3600}, "x": 1}}'.encode(), "future"),
    (b'{"ts": 1000000000, "x": 1}', "stale"),
    (chunk(10, step=0.01), "bad_rate"),
    (chunk(10, step=0.2), "bad_rate"),
])
def test_bad_payloads_get_their_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_json(payload, STREAM, NOW)
    assert info.value.reason == reason
    assert info.value.detail


def test_good_readings_chunks_with_gaps_duplicates_and_disorder_pass() -> None:
    assert [r.values for r in decode_json(f'{{"ts": {NOW}, "y": 3}}'.encode(), STREAM, NOW)] \
        == [{"y": 3.0}]
    ts = [NOW - 5 + i * 0.1 for i in (3, 0, 1, 1, 2, 5, 6)]  # reordered, doubled, one gap
    doc = json.dumps({"ts": ts, "x": list(range(7)), "y": [0.5] * 7}).encode()
    assert [r.ts for r in decode_json(doc, STREAM, NOW)] == ts
    # Jitter within the tolerance is a real sensor, not another rate.
    assert len(decode_json(chunk(10, step=0.109), STREAM, NOW)) == 10


def test_admit_routes_and_splits_late_readings() -> None:
    other = StreamConfig(name="env", topics=["sensors/env"], channels=["t"], rate_hz=1.0,
                         window=60)
    streams = [other, STREAM]
    closed_before = NOW - 59.5
    stream, fresh, late = Router(streams).admit("sensors/imu/left", chunk(10),
                                                lambda s, ts: ts >= closed_before, NOW)
    assert stream.name == "imu" and len(fresh) == 5 and late == 5
    with pytest.raises(DecodeError) as info:
        Router(streams).admit("sensors/imu/left/extra", chunk(2), lambda s, ts: True, NOW)
    assert info.value.reason == "unknown_topic"


finite_or_not = st.one_of(st.floats(), st.integers(-(10**400), 10**400), st.booleans(),
                          st.sampled_from([3.4e38, 3.5e38, -3.5e38, 1e-320]))


@settings(max_examples=300, deadline=None)
@given(t=st.one_of(st.floats(NOW - 7200, NOW + 7200), st.floats()),
       x=finite_or_not, y=st.one_of(st.none(), finite_or_not))
def test_a_single_reading_decodes_as_its_one_sample_chunk_does(t: float, x: Any,
                                                              y: Any) -> None:
    # A single reading of floats takes a fast path; a chunk of one the general one. They
    # must agree on every value and on every reason for refusal.
    def outcome(doc: dict[str, Any]) -> Any:
        try:
            return [(r.ts, r.values) for r in
                    decode_json(json.dumps(doc).encode(), STREAM, NOW)]
        except DecodeError as exc:
            return exc.reason

    single = {"ts": t, "x": x} | ({} if y is None else {"y": y})
    chunk = {k: [v] for k, v in single.items()}
    assert outcome(single) == outcome(chunk)


def test_router_remembers_routes_within_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_mod, "ROUTE_CACHE", 4)
    other = StreamConfig(name="env", topics=["sensors/env/#"], channels=["t"], rate_hz=1.0,
                         window=60)
    router = Router([STREAM, other])
    topics = ["sensors/imu", "sensors/imu/a", "sensors/env/b/c", "sensors/x", "elsewhere"]
    for _ in range(3):
        assert [getattr(router.route(t), "name", None) for t in topics * 2] == \
            ["imu", "imu", "env", None, None] * 2
        assert len(router._routes) <= 4
