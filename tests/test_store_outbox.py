"""The gateway database: message digests, window marks, the dead-letter outbox, migration."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from edgetok.gateway import store as store_mod
from edgetok.gateway.store import PAYLOAD_HEAD_BYTES, Store


def seen(s: Store, topic: str, payload: bytes) -> bool:
    """Remember one message as ingest does; True if it was taken in before."""
    digest = s.digest(topic, payload)
    if s.known([digest]):
        return True
    s.remember([digest])
    return False


def test_seen_recognises_repeats_and_stays_bounded(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "SEEN_KEEP", 50)
    monkeypatch.setattr(store_mod, "SEEN_SLACK", 10)
    s = Store(tmp_path / "db.sqlite")
    with s.tx():
        assert [seen(s, "t", bytes([i])) for i in range(3)] == [False] * 3
        assert seen(s, "t", b"\x01") and not seen(s, "u", b"\x01")  # topic is part of it
        for i in range(200):
            seen(s, "bulk", i.to_bytes(2, "big"))
    n = s.db.execute("SELECT count(*) FROM seen").fetchone()[0]
    assert 50 <= n <= 60
    assert seen(s, "bulk", (199).to_bytes(2, "big"))  # the newest are kept
    s.close()
    # The count survives a restart, so the bound does too.
    s = Store(tmp_path / "db.sqlite")
    assert s._seen_rows == n


def test_window_marks_bring_back_windows_cut_off_below_the_highest(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    assert s.window_marks("imu") == (None, set())
    with s.tx():
        s.close_window("imu", 7)
        s.close_window("imu", 9)
        s.close_window("env", 3)
    assert s.window_marks("imu") == (9, {7, 9})
    s.drop_window("imu", 9)
    assert s.window_marks("imu") == (7, {7})


def test_deadletters_wait_for_publication_in_order(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    big = bytes(range(256)) * 4
    ids = [s.add_deadletter("a/b", "bad_json", "detail", big),
           s.add_deadletter("a/c", "stale", "old", b"{}")]
    out = s.unpublished_deadletters(10)
    assert [i for i, _ in out] == ids
    first = json.loads(out[0][1])
    assert bytes.fromhex(first["payload_head"]) == big[:PAYLOAD_HEAD_BYTES]
    assert first["payload_bytes"] == len(big) and first["topic"] == "a/b"
    s.mark_deadletter_published(ids[0])
    assert [i for i, _ in s.unpublished_deadletters(10)] == ids[1:]


def test_old_databases_get_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE deadletters (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT "
               "NULL, topic TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL, "
               "payload_head BLOB NOT NULL)")
    db.execute("INSERT INTO deadletters (ts, topic, reason, detail, payload_head) VALUES "
               "(1, 't', 'r', 'd', x'00')")
    db.commit()
    db.close()
    s = Store(path)
    assert [json.loads(b)["reason"] for _, b in s.unpublished_deadletters()] == ["r"]


def test_deadletters_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "DEADLETTER_KEEP", 30)
    monkeypatch.setattr(store_mod, "DEADLETTER_PRUNE_EVERY", 10)
    s = Store(tmp_path / "db.sqlite")
    with s.tx():
        ids = [s.add_deadletter("t", "bad_json", str(i), b"x") for i in range(100)]
    kept = [i for (i,) in s.db.execute("SELECT id FROM deadletters ORDER BY id")]
    assert 30 <= len(kept) <= 40 and kept[-1] == ids[-1]
    assert s.deadletters_pruned == 100 - len(kept)


def test_batch_lookup_and_journal_keep_order_and_span_statements(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "SQL_PARAMS", 3)  # several IN (...) queries per lookup
    s = Store(tmp_path / "db.sqlite")
    digests = [Store.digest("t", bytes([i])) for i in range(10)]
    with s.tx():
        s.remember(digests[::2])
        s.remember(digests[:1])  # already known: not counted twice
        # Rows in message order: a later reading at the same time merges over an earlier one.
        s.journal([("imu", 1.0, {"x": 1.0}), ("env", 1.0, {"t": 20.0}),
                   ("imu", 1.0, {"x": 2.0, "y": 3.0}), ("imu", 2.0, {"x": 4.0})])
    assert s.known(digests) == set(digests[::2])
    assert s.known([]) == set()
    assert s._seen_rows == 5
    assert s.readings("imu", 0, 3) == [(1.0, {"x": 2.0, "y": 3.0}), (2.0, {"x": 4.0})]
    assert s.all_readings("env") == [(1.0, {"t": 20.0})]
    assert s.journal_rows == 4  # an upper bound: the merged reading counts as new
    assert s.recount_journal() == 3


def _level(store: Store) -> int:
    return int(store.db.execute("PRAGMA synchronous").fetchone()[0])


def test_only_durable_transactions_pay_for_the_configured_sync(tmp_path: Path) -> None:
    # SQLite's synchronous levels: 1 NORMAL (no fsync per WAL commit), 2 FULL.
    store = Store(tmp_path / "db.sqlite", synchronous="FULL")
    assert _level(store) == 1
    with store.tx(durable=True):
        assert _level(store) == 2  # the journal commit the PUBACKs wait on
    assert _level(store) == 1  # autocommit statements (published marks) after it
    with store.tx():
        assert _level(store) == 1
    with pytest.raises(RuntimeError), store.tx(durable=True):
        raise RuntimeError("rolled back")
    assert _level(store) == 1
    relaxed = Store(tmp_path / "db2.sqlite", synchronous="NORMAL")
    with relaxed.tx(durable=True):
        assert _level(relaxed) == 1
