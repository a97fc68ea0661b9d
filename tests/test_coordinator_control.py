"""Wire schemas of the control plane: telemetry and the retained decision."""

from __future__ import annotations

import json

import pytest

from edgetok import control
from edgetok.agent.coordinator.synthetic import synthetic_manifest
from edgetok.control import (
    ControlError,
    Decision,
    Telemetry,
    decode_decision,
    decode_telemetry,
    encode_decision,
    encode_telemetry,
    variant_id,
)


def _decision(**kw: object) -> Decision:
    base: dict[str, object] = dict(
        gateway="gw1", epoch=1_700_000_000_000, seq=3, ts=1.7e9, bundle="b", variant="r0.25-s2",
        pruning_ratio=0.25, split=2, precision="int8", cpu_hz=1.2e9, tx_power_w=0.05,
        latency_ms=41.0, energy_mj=3.5, distortion=0.12, accuracy=0.88, feasible=True,
        policy="joint", reason="initial")
    base.update(kw)
    return Decision.model_validate(base)


def test_decision_round_trips() -> None:
    d = _decision()
    assert decode_decision(encode_decision(d)) == d
    assert decode_decision(encode_decision(d).decode()) == d


def test_telemetry_round_trips_with_optional_fields_absent() -> None:
    t = Telemetry(gateway="gw1", ts=5.0, head_ms={"r0.00-s1": 3.5}, cpu_hz=1e9)
    back = decode_telemetry(encode_telemetry(t))
    assert back == t
    assert back.uplink_bps is None and back.queue_depth == 0


@pytest.mark.parametrize("payload, match", [
    (b"not json", "not JSON"),
    (b'{"gateway": "g", "ts": 1, "bogus": 2, "uplink_bps": "fast"}', "uplink_bps"),
    (b'{"gateway": "g", "ts": 1, "uplink_bps": -5}', "uplink_bps"),
    (b'{"gateway": "g", "ts": 1, "version": 99}', "version 99"),
    (b'{"ts": 1}', "gateway"),
])
def test_bad_telemetry_is_a_control_error(payload: bytes, match: str) -> None:
    with pytest.raises(ControlError, match=match):
        decode_telemetry(payload)


def test_fields_from_a_newer_sender_are_ignored_with_one_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    """A fleet upgraded one side at a time keeps its control loop: a newer gateway's
    telemetry, or a newer coordinator's decision, is read for the fields this side knows."""
    raw = json.loads(encode_decision(_decision()))
    control._warned_unknown.clear()  # (once per process: another run of this test warned)
    with caplog.at_level("WARNING", logger="edgetok.control"):
        for _ in range(3):
            assert decode_decision(json.dumps({**raw, "zz_future": [1, 2]})) == _decision()
            t = decode_telemetry(b'{"gateway": "gw9", "ts": 1, "cpu_hz": 1e9, "zz_new": {}}')
            assert t.gateway == "gw9" and t.cpu_hz == 1e9
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2, "once per payload type, sender and keys"
    assert "zz_future" in warned[0] and "gw1" in warned[0]
    assert "zz_new" in warned[1] and "gw9" in warned[1]
    with pytest.raises(ControlError, match="version 2"):
        decode_decision(json.dumps({**raw, "version": 2, "zz_future": 1}))


def test_bad_decision_is_a_control_error() -> None:
    raw = json.loads(encode_decision(_decision()))
    raw["precision"] = "int4"
    with pytest.raises(ControlError, match="precision"):
        decode_decision(json.dumps(raw).encode())
    with pytest.raises(ControlError, match="limit"):
        decode_decision(b" " * (512 * 1024))


def test_supersedes_orders_by_epoch_then_seq() -> None:
    old = _decision(seq=7)
    assert _decision(seq=8).supersedes(old)
    assert not _decision(seq=7).supersedes(old)
    assert not _decision(seq=6).supersedes(old)
    # A restarted coordinator starts its seq again but has a later epoch.
    assert _decision(epoch=old.epoch + 1, seq=1).supersedes(old)
    assert _decision(seq=0).supersedes(None)


def test_variant_ids_match_the_bundle_convention() -> None:
    m = synthetic_manifest(num_layers=3, ratios=(0.0, 0.5))
    assert {v.id for v in m.variants} == {variant_id(v.pruning_ratio, v.split)
                                         for v in m.variants}
    assert variant_id(0.5, 3) == "r0.50-s3"
    assert variant_id(0.125, 0) == "r0.12-s0"
