"""Hypothesis throws generated payloads at decode -> validate -> window -> tokenize -> model.

Every outcome must be a result or a dead letter (a typed error), never an unhandled
exception. The path is the daemon's own: Ingest.admit inside a journal transaction, then
the stream's WindowBuffer, then Inferencer.infer on the on-device variant.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from edgetok.gateway.config import GatewayConfig
from edgetok.gateway.daemon import Gateway
from edgetok.gateway.inference import InferenceError
from edgetok.gateway.windows import WindowBuffer
from edgetok.mqttlink import InMessage
from edgetok.replay import DEFAULT_CHANNELS
from edgetok.settings import parse_config
from edgetok.tokenizers import TokenizeError

RATE = 10.0
NOW = time.time()

numbers = (st.floats(allow_nan=True, allow_infinity=True)
           | st.integers(min_value=-(10**400), max_value=10**400)
           | st.sampled_from([0.0, -0.0, 1e308, 3.5e38, -1e-320, 2**53 + 1]))
anything = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)
# Timestamps around now, from far past to far future, on and off the 10 Hz grid.
stamps = st.one_of(st.floats(NOW - 400, NOW + 5).map(lambda t: round(t * RATE) / RATE),
                   st.floats(NOW - 1e6, NOW + 1e6), numbers, st.text(max_size=4))


sane = st.floats(-50, 50, allow_nan=False)
on_grid = st.floats(NOW - 400, NOW + 5).map(lambda t: round(t * RATE) / RATE)


@st.composite
def near_valid(draw: st.DrawFn) -> dict[str, Any]:
    """Documents shaped like readings or chunks: about half clean, the rest with something
    wrong anywhere (so the deep end of the path is reached, not only the parser)."""
    clean = draw(st.booleans())
    value = sane if clean else st.one_of(sane, numbers, anything)
    when = on_grid if clean else stamps
    n = draw(st.integers(1 if clean else 0, 40))
    doc: dict[str, Any] = {}
    channels = draw(st.lists(st.sampled_from(DEFAULT_CHANNELS), unique=True,
                             min_size=1 if clean else 0))
    if draw(st.booleans()):  # a chunk, mostly at the right rate, sometimes not
        t0 = draw(when)
        step = 0.1 if clean else draw(st.sampled_from([0.1, 0.1, 0.01, 0.2, 0.0, -0.1]))
        doc["ts"] = ([t0 + i * step for i in range(n)] if isinstance(t0, float)
                     else draw(st.lists(stamps, max_size=n)))
        for c in channels:
            doc[c] = draw(st.lists(value, min_size=n, max_size=n) if clean else
                          st.one_of(st.lists(value, min_size=n, max_size=n),
                                    st.lists(value, max_size=n + 2), anything))
    else:
        if clean or draw(st.booleans()):
            doc["ts"] = draw(when)
        for c in channels:
            doc[c] = draw(value)
    if not clean:
        doc.update(draw(st.dictionaries(st.text(max_size=4), anything, max_size=2)))
    return doc


def dumps(doc: Any) -> bytes:
    """JSON as a sloppy sensor writes it: NaN and Infinity literals allowed."""
    def default(o: Any) -> Any:
        return str(o)
    return json.dumps(doc, allow_nan=True, default=default).encode()


payloads = st.one_of(
    st.binary(max_size=300),
    anything.map(dumps),
    near_valid().map(dumps),
    near_valid().map(dumps).flatmap(  # corrupted: bytes cut off or flipped
        lambda b: st.integers(0, max(len(b) - 1, 0)).map(lambda i: b[:i] + b"\xff" + b[i + 1:])),
    st.integers(1, 3000).map(lambda d: b"[" * d + b"]" * d),
)


@pytest.fixture(scope="module")
def gateway(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One in-process gateway (no broker), its stream on the on-device variant."""
    state = tmp_path_factory.mktemp("fuzz")
    cfg = parse_config({
        "id": "gw-fuzz", "state_dir": str(state), "bundle": {"path": str(tiny_bundle)},
        "decision": {"variant": "r0.00-s2"},
        "streams": [{"name": "imu", "topics": ["sensors/imu"], "channels": DEFAULT_CHANNELS,
                     "rate_hz": RATE, "window": 100, "max_payload_bytes": 64 * 1024}]},
        GatewayConfig)
    gw = Gateway(cfg)
    yield gw
    gw.inferencer.close()
    gw.store.close()


def outcome(gw: Gateway, payload: bytes) -> str:
    """Run one payload through the path; the kind of outcome, or raise if unhandled."""
    gw.buffers["imu"] = WindowBuffer(gw.streams["imu"])  # each example starts afresh
    before = dict(gw.counters)
    msg = InMessage("sensors/imu", payload, qos=1, retain=False, mid=1, generation=0)
    with gw.store.tx():
        got = gw.ingest.admit(msg, time.time())
    if got is None:
        assert gw.counters["deadletters"] > before["deadletters"] or \
            gw.counters["duplicate_messages"] > before["duplicate_messages"]
        return "deadletter-or-duplicate"
    buf = gw.buffers["imu"]
    for r in got[1]:
        assert math.isfinite(r.ts) and all(math.isfinite(v) for v in r.values.values())
        buf.add(r.ts, r.values)
    kinds = []
    for k in sorted(buf.open):
        win = buf.close(k, time.monotonic())
        try:
            result = asyncio.run(gw.inferencer.infer(win, 1.0))
        except (TokenizeError, InferenceError):
            kinds.append("window-deadletter")
            continue
        assert result.where == "device" and result.window == k
        assert math.isclose(sum(result.scores.values()), 1.0, rel_tol=1e-4)
        kinds.append("result")
    gw.store.prune("imu", math.inf)
    return ",".join(kinds) or "admitted"


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(payload=payloads)
def test_any_payload_ends_as_a_result_or_a_dead_letter(gateway: Gateway, payload: bytes) -> None:
    event(outcome(gateway, payload))  # --hypothesis-show-statistics shows the mix


def test_the_fuzzed_path_reaches_results(gateway: Gateway) -> None:
    # The generators must reach the deep end too: a real chunk becomes a real result.
    t0 = math.floor(time.time() * RATE - 300) / RATE
    doc = {"ts": [round(t0 + i / RATE, 6) for i in range(50)],
           **{c: [0.1 * i for i in range(50)] for c in DEFAULT_CHANNELS}}
    assert "result" in outcome(gateway, dumps(doc))
    assert outcome(gateway, dumps(doc)) == "deadletter-or-duplicate"  # the same message again
