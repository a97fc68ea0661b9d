"""Garbage mixed into a real replay: every valid window still gets its (correct) result, and
every bad message is dead-lettered, in the database and on MQTT, with its reason."""

from __future__ import annotations

import collections
import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import Broker
from harness import (
    TOPIC,
    Collector,
    Replayer,
    assert_exactly_once,
    basicmotions_plan,
    db_query,
    fault_config,
    offline_predictions,
    plan_messages,
    report,
    spawn,
    status,
    wait_for,
)

from edgetok.replay import DEFAULT_CHANNELS, ReplayPlan

pytestmark = pytest.mark.slow

GW = "gw-test"
WINDOWS = 20
CHUNK = 10
MAX_PAYLOAD = 16 * 1024


def reading(ts: float, value: str = "0.5") -> bytes:
    """One reading for every channel, with a raw JSON token as each value."""
    return ("{" + f'"ts": {ts!r}, ' + ", ".join(f'"{c}": {value}' for c in DEFAULT_CHANNELS)
            + "}").encode()


def garbage(plan: ReplayPlan, rng: random.Random) -> list[tuple[str, bytes, str]]:
    """(topic, payload, expected reason) for each kind of bad input."""
    t = float(plan.timestamps(3)[5])  # inside a real window: only the value is wrong
    now = time.time()
    fast = [t + i * 0.01 for i in range(10)]  # 100 Hz on a 10 Hz stream
    big = 3000
    return [
        (TOPIC, b'{"ts": 1700000000.0, "acc_x": ', "bad_json"),
        (TOPIC, b"\x80\xfe" + rng.randbytes(62), "bad_json"),
        (TOPIC, b"[" * 5000, "bad_json"),  # deeper than the JSON parser's recursion
        (TOPIC, b"[1, 2, 3]", "bad_type"),
        (TOPIC, json.dumps({"ts": "yesterday", "acc_x": 1.0}).encode(), "bad_type"),
        (TOPIC, reading(t, '"high"'), "bad_type"),
        (TOPIC, json.dumps({"acc_x": 1.0}).encode(), "missing_field"),
        (TOPIC, json.dumps({"ts": t}).encode(), "missing_field"),
        (TOPIC, json.dumps({"ts": [t, t + 0.1], "acc_x": [1.0]}).encode(), "length_mismatch"),
        (TOPIC, reading(t, "NaN"), "non_finite"),
        (TOPIC, reading(t, "Infinity"), "non_finite"),
        (TOPIC, reading(t, "1e999"), "non_finite"),
        (TOPIC, reading(t, "1" + "0" * 400), "non_finite"),
        (TOPIC, json.dumps({"ts": [now - i * 0.1 for i in range(big)],
                            **{c: [0.0] * big for c in DEFAULT_CHANNELS}}).encode(),
         "too_large"),
        (TOPIC, reading(now + 3600.0), "future"),
        (TOPIC, reading(1.0e9), "stale"),
        (TOPIC, json.dumps({"ts": fast, **{c: [0.1] * 10 for c in DEFAULT_CHANNELS}}).encode(),
         "bad_rate"),
        ("sensors/imu/extra", reading(t), "unknown_topic"),
        ("sensors/temperature", b"21.5", "unknown_topic"),
    ]


def build(plan: ReplayPlan, rng: random.Random) -> tuple[list[tuple[str, bytes]],
                                                         collections.Counter[str], int]:
    """The replay with garbage, duplicates and reordering mixed in; expected reasons, dups."""
    out: list[tuple[str, bytes]] = []
    dups = 0
    for j in range(WINDOWS):
        msgs = plan_messages(plan, CHUNK, windows=range(j, j + 1))
        msgs[3], msgs[4] = msgs[4], msgs[3]  # reordered within the window
        if j % 4 == 0:
            msgs.insert(3, msgs[2])  # an exact duplicate right away ...
            msgs.append(msgs[0])  # ... and one of the window's first message, at its end
            dups += 2
        if j == 1:  # the same readings again, one message each: merged, not doubled
            ts = plan.timestamps(j)[50:60]
            for i, t in enumerate(ts):
                doc = {"ts": round(float(t), 6)}
                doc.update({c: float(plan.x[j, k, 50 + i]) for k, c in enumerate(DEFAULT_CHANNELS)})
                msgs.append((TOPIC, json.dumps(doc).encode()))
        out.extend(msgs)
    bad = garbage(plan, rng)
    for topic, body, _ in bad:
        out.insert(rng.randrange(len(out)), (topic, body))
    # A reading for a window closed long ago, with new values (so not a duplicate): late.
    out.append((TOPIC, reading(float(plan.timestamps(0)[7]), "0.25")))
    reasons = collections.Counter(r for _, _, r in bad)
    reasons["late"] += 1
    return out, reasons, dups


def test_garbage_is_dead_lettered_and_valid_windows_still_get_their_result(
        tmp_path: Path, mosquitto: Broker, tiny_bundle: Path) -> None:
    cfg = fault_config(tmp_path, tiny_bundle, mosquitto.port, variant="r0.00-s2",
                       stream_extra={"max_payload_bytes": MAX_PAYLOAD},
                       extra={"unclaimed_topics": ["sensors/#"]})
    gw = spawn("gateway", cfg, tmp_path, "gw")
    collector = Collector(mosquitto.port, [f"edgetok/{GW}/deadletter"])
    gw.start()
    collector.start()
    rng = random.Random(7)
    try:
        plan = basicmotions_plan(limit=WINDOWS)
        messages, reasons, dups = build(plan, rng)
        sent = Replayer(mosquitto.port, messages).start().join()
        rows = assert_exactly_once(gw, tmp_path, {plan.window_seq(j) for j in range(WINDOWS)})
        # The valid data went through untouched: labels match the unsplit model offline.
        logits = offline_predictions(tiny_bundle, plan)
        labels = json.loads((tiny_bundle / "manifest.json").read_text())["labels"]
        by_seq = {r["window"]: r["label"] for r in rows}
        assert [by_seq[plan.window_seq(j)] for j in range(WINDOWS)] == \
            [labels[int(np.argmax(logits[j]))] for j in range(WINDOWS)]
        n_bad = sum(reasons.values())
        wait_for(lambda: db_query(tmp_path, "SELECT count(*) FROM deadletters")[0][0] >= n_bad,
                 what="dead letters stored")
        stored = collections.Counter(r for (r,) in db_query(
            tmp_path, "SELECT reason FROM deadletters"))
        assert stored == reasons
        wait_for(lambda: len(collector.on(f"edgetok/{GW}/deadletter")) >= n_bad,
                 what="dead letters on MQTT")
        letters = [json.loads(p) for p in collector.on(f"edgetok/{GW}/deadletter")]
        assert collections.Counter(d["reason"] for d in letters) == reasons
        sent_by_head = {body[:128].hex(): (topic, len(body)) for topic, body in messages}
        for d in letters:
            assert sent_by_head[d["payload_head"]] == (d["topic"], d["payload_bytes"])
            assert abs(d["ts"] - time.time()) < 600 and d["detail"]
        assert sorted(d["id"] for d in letters) == [d["id"] for d in letters]
        counters = status(gw)["counters"]
        assert counters["duplicate_messages"] == dups
        assert counters["deadletters"] == n_bad
        report("garbage", messages_sent=sent, results=len(rows), dead_letters=n_bad,
               reasons=dict(sorted(reasons.items())),
               duplicates_suppressed=counters["duplicates"],
               duplicate_messages=counters["duplicate_messages"])
    finally:
        collector.stop()
        assert gw.stop() == 0
