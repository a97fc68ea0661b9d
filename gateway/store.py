"""The gateway's SQLite database (WAL): reading journal, window states, results, dead letters."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from edgetok.gateway.models import Result

SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
    stream TEXT NOT NULL, ts REAL NOT NULL, vals TEXT NOT NULL,
    PRIMARY KEY (stream, ts)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS windows (
    stream TEXT NOT NULL, window INTEGER NOT NULL, closed_ts REAL NOT NULL,
    PRIMARY KEY (stream, window)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS grids (stream TEXT PRIMARY KEY, grid TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deadletters (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, topic TEXT NOT NULL,
    reason TEXT NOT NULL, detail TEXT NOT NULL, payload_head BLOB NOT NULL,
    payload_bytes INTEGER NOT NULL DEFAULT 0, published INTEGER NOT NULL DEFAULT 0,
    refused TEXT);
CREATE TABLE IF NOT EXISTS seen (
    id INTEGER PRIMARY KEY AUTOINCREMENT, digest BLOB NOT NULL UNIQUE);
"""
# A window number means something only on its stream's grid (rate_hz, hop, window), so the
# grid is part of a result's key: after a config change the new grid's windows neither
# collide with the old results nor sit below their marks.
RESULTS = """
CREATE TABLE IF NOT EXISTS {name} (
    id INTEGER PRIMARY KEY AUTOINCREMENT, stream TEXT NOT NULL, grid TEXT NOT NULL DEFAULT '',
    window INTEGER NOT NULL, end_ts REAL NOT NULL, body TEXT NOT NULL,
    published INTEGER NOT NULL DEFAULT 0, refused TEXT, UNIQUE (stream, grid, window));
"""
# After any migration (rebuilding `results` drops its indexes and triggers). Per-stream
# counts, newest id and newest end are kept by triggers, so /v1/streams and
# /v1/results/latest read a row per stream instead of scanning every result.
INDEXES = """
CREATE INDEX IF NOT EXISTS results_unpublished ON results (published, id);
CREATE INDEX IF NOT EXISTS results_stream ON results (stream, id);
CREATE INDEX IF NOT EXISTS deadletters_unpublished ON deadletters (published, id);
CREATE TABLE IF NOT EXISTS result_stats (
    stream TEXT PRIMARY KEY, n INTEGER NOT NULL, last_id INTEGER NOT NULL, last_end_ts REAL);
CREATE TRIGGER IF NOT EXISTS results_counted AFTER INSERT ON results BEGIN
    INSERT INTO result_stats VALUES (new.stream, 1, new.id, new.end_ts)
    ON CONFLICT (stream) DO UPDATE SET n = n + 1, last_id = max(last_id, new.id),
        last_end_ts = max(last_end_ts, new.end_ts);
END;
CREATE TRIGGER IF NOT EXISTS results_uncounted AFTER DELETE ON results BEGIN
    UPDATE result_stats SET n = n - 1, last_id = CASE WHEN last_id = old.id THEN
        coalesce((SELECT max(id) FROM results WHERE stream = old.stream), 0) ELSE last_id END
    WHERE stream = old.stream;
    DELETE FROM result_stats WHERE stream = old.stream AND n <= 0;
END;
"""

# Dead letters keep only the first bytes: enough to diagnose, never a copy of a huge payload.
PAYLOAD_HEAD_BYTES = 128
# Digests of the last messages taken in, to recognise redeliveries. A journaled message is
# redelivered only if its PUBACK was lost (crash or disconnect right after the commit), and
# the broker holds at most Receive Maximum unacknowledged messages, so a few thousand would
# do; the margin also catches sensors that resend after a broker restart. 16 bytes plus
# index per digest: about 3 MB.
SEEN_KEEP = 50_000
# Prune the digest table once it is this far over SEEN_KEEP (amortises the DELETE).
SEEN_SLACK = 5_000
# Parameters per statement: SQLite builds before 3.32 allow at most 999.
SQL_PARAMS = 999
# Dead letters kept (published or not): a sensor spewing garbage must not fill the disk.
# At most ~250 bytes each, so about 25 MB; the oldest go first, and a metric counts them.
DEADLETTER_KEEP = 100_000
# Check that bound every this many dead letters (amortises the DELETE).
DEADLETTER_PRUNE_EVERY = 1_000
# `published` of a row the broker (or our client) refused: parked with its reason in
# `refused`, not sent again until the next start (requeue_refused), so it cannot hold up the
# rows behind it.
REFUSED = 2


class Store:
    """One connection, used from the event loop thread only."""

    def __init__(self, path: Path, synchronous: str = "NORMAL") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.synchronous = synchronous  # for durable transactions; the rest run NORMAL
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self._level = ""
        self._sync("NORMAL")
        self.db.executescript(SCHEMA + RESULTS.format(name="results"))
        self._migrate()
        counted = self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'results_counted'"
                                  ).fetchone() is not None
        self.db.executescript(INDEXES)
        if not counted:  # triggers new (or dropped by a rebuild): count what is there, once
            with self.tx():
                self.db.execute("DELETE FROM result_stats")
                self.db.execute("INSERT INTO result_stats SELECT stream, count(*), max(id), "
                                "max(end_ts) FROM results GROUP BY stream")
        self.grids: dict[str, str] = {}  # stream -> its grid in force (see use_grid)
        self._journal_rows = self.db.execute("SELECT count(*) FROM readings").fetchone()[0]
        self._seen_rows = self.db.execute("SELECT count(*) FROM seen").fetchone()[0]
        self.deadletters_pruned = 0

    def _migrate(self) -> None:
        """Add columns that databases written by older versions lack."""
        have = {row[1] for row in self.db.execute("PRAGMA table_info(results)")}
        if "grid" not in have:  # the key changes: SQLite can only rebuild the table
            cols = ", ".join(sorted(have))
            seq = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'results'"
                                  ).fetchone()
            with self.tx():
                self.db.execute(RESULTS.format(name="results_new"))
                self.db.execute(f"INSERT INTO results_new ({cols}) SELECT {cols} FROM results")
                self.db.execute("DROP TABLE results")
                self.db.execute("ALTER TABLE results_new RENAME TO results")
                if seq is not None:  # ids of deleted rows are never handed out again
                    self.db.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) "
                                    "WHERE name = 'results'", (seq[0],))
        have = {row[1] for row in self.db.execute("PRAGMA table_info(deadletters)")}
        for col in ("payload_bytes", "published"):
            if col not in have:
                self.db.execute(f"ALTER TABLE deadletters ADD COLUMN {col} INTEGER NOT NULL "
                                "DEFAULT 0")
        for table in ("results", "deadletters"):
            if "refused" not in {row[1] for row in self.db.execute(
                    f"PRAGMA table_info({table})")}:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN refused TEXT")

    def close(self) -> None:
        self.db.close()

    def _sync(self, level: str) -> None:
        if level != self._level:  # a pragma per commit would be cheap, but none is cheaper
            self.db.execute(f"PRAGMA synchronous={level}")
            self._level = level

    @contextmanager
    def tx(self, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One atomic transaction; a `durable` one is on disk, under the configured
        synchronous mode, when it returns.

        Only commits that something outside waits on need that: the journal commit before
        the PUBACKs. The others (window states, results, published marks) run NORMAL, with
        no fsync of their own. WAL keeps commits in order, so a power cut can only lose a
        tail of them, and each is redone from what stays: a window re-closed, a result
        recomputed from its journaled readings or published again (at least once).
        """
        self._sync(self.synchronous if durable else "NORMAL")
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        finally:
            self._sync("NORMAL")  # statements outside a transaction commit on their own

    # journal -----------------------------------------------------------------------------
    def journal(self, rows: Sequence[tuple[str, float, dict[str, float]]]) -> None:
        """Journal (stream, ts, values) rows in order, in one statement (group commit); a
        reading at an existing timestamp merges its channels in."""
        self.db.executemany(
            "INSERT INTO readings (stream, ts, vals) VALUES (?, ?, ?) "
            "ON CONFLICT (stream, ts) DO UPDATE SET vals = json_patch(vals, excluded.vals)",
            [(stream, ts, json.dumps(vals)) for stream, ts, vals in rows])
        self._journal_rows += len(rows)  # upper bound; refreshed on prune

    @staticmethod
    def digest(topic: str, payload: bytes) -> bytes:
        """The key a message is remembered by: topic and payload, hashed."""
        return hashlib.blake2b(topic.encode() + b"\0" + payload, digest_size=16).digest()

    def known(self, digests: Sequence[bytes]) -> set[bytes]:
        """Which of these message digests were remembered before, in one query."""
        out: set[bytes] = set()
        for i in range(0, len(digests), SQL_PARAMS):
            part = digests[i:i + SQL_PARAMS]
            marks = ",".join("?" * len(part))  # only placeholders go into the SQL text
            out.update(bytes(d) for (d,) in self.db.execute(
                f"SELECT digest FROM seen WHERE digest IN ({marks})", part))
        return out

    def remember(self, digests: Sequence[bytes]) -> None:
        """Remember message digests (new ones), keeping the newest SEEN_KEEP."""
        cur = self.db.executemany("INSERT OR IGNORE INTO seen (digest) VALUES (?)",
                                  [(d,) for d in digests])
        self._seen_rows += max(cur.rowcount, 0)
        if self._seen_rows > SEEN_KEEP + SEEN_SLACK:
            cur = self.db.execute("DELETE FROM seen WHERE id <= (SELECT max(id) FROM seen) - ?",
                                  (SEEN_KEEP,))
            self._seen_rows -= cur.rowcount

    def close_window(self, stream: str, window: int) -> None:
        """Record that a window was handed to inference (so a crash re-runs it)."""
        self.db.execute("INSERT OR IGNORE INTO windows VALUES (?, ?, ?)",
                        (stream, window, time.time()))

    def drop_window(self, stream: str, window: int) -> None:
        """Forget a handed-over window that will get no result (it was dead-lettered)."""
        self.db.execute("DELETE FROM windows WHERE stream = ? AND window = ?", (stream, window))

    def readings(self, stream: str, start: float, end: float) -> list[tuple[float, dict]]:
        """Journaled readings of a stream in [start, end)."""
        cur = self.db.execute("SELECT ts, vals FROM readings WHERE stream = ? AND ts >= ? "
                              "AND ts < ? ORDER BY ts", (stream, start, end))
        return [(ts, json.loads(v)) for ts, v in cur]

    def all_readings(self, stream: str) -> list[tuple[float, dict]]:
        """Every journaled reading of a stream, for crash recovery."""
        cur = self.db.execute("SELECT ts, vals FROM readings WHERE stream = ? ORDER BY ts",
                              (stream,))
        return [(ts, json.loads(v)) for ts, v in cur]

    def closed_windows(self) -> list[tuple[str, int]]:
        """Windows handed to inference that have no result yet."""
        return list(self.db.execute("SELECT stream, window FROM windows ORDER BY closed_ts"))

    def use_grid(self, stream: str, grid: str) -> str | None:
        """Set the grid a stream's windows are numbered on; the previous one if it changed.

        On a change the stream's windows start afresh: the marks of the old grid are set
        aside (its results stay, under their grid) and its windows cut off by the last stop
        are forgotten, since their numbers mean nothing now; their readings stay journaled
        and are windowed again on the new grid. Results from before grids were recorded
        are taken to be on the grid of the first start that records one.
        """
        self.grids[stream] = grid
        row = self.db.execute("SELECT grid FROM grids WHERE stream = ?", (stream,)).fetchone()
        if row is not None and row[0] == grid:
            return None
        with self.tx():
            if row is None:
                self.db.execute("UPDATE results SET grid = ? WHERE stream = ? AND grid = ''",
                                (grid, stream))
            else:
                self.db.execute("DELETE FROM windows WHERE stream = ?", (stream,))
            self.db.execute("INSERT OR REPLACE INTO grids VALUES (?, ?)", (stream, grid))
        return None if row is None else str(row[0])

    def window_marks(self, stream: str) -> tuple[int | None, set[int]]:
        """The highest window closed so far, and the closed ones still without a result.

        Windows may finish out of order, so the highest closed window alone would lose the
        earlier ones a crash cut off; those come back as the set, to be re-run.
        """
        pending = {int(k) for (k,) in self.db.execute(
            "SELECT window FROM windows WHERE stream = ?", (stream,))}
        row = self.db.execute("SELECT max(window) FROM results WHERE stream = ? AND grid = ?",
                              (stream, self.grids.get(stream, ""))).fetchone()
        marks = ([int(row[0])] if row[0] is not None else []) + list(pending)
        return (max(marks) if marks else None), pending

    def prune(self, stream: str, before_ts: float) -> None:
        """Forget readings no open window needs any more."""
        cur = self.db.execute("DELETE FROM readings WHERE stream = ? AND ts < ?",
                              (stream, before_ts))
        # Exact deletions keep the count an upper bound without a scan on every result;
        # recount_journal() makes it exact when the bound is near.
        self._journal_rows = max(self._journal_rows - cur.rowcount, 0)

    @property
    def journal_rows(self) -> int:
        """Readings journaled, an upper bound (a merged reading counts as new)."""
        return int(self._journal_rows)

    def recount_journal(self) -> int:
        """The exact number of journaled readings (a full scan: only near the bound)."""
        self._journal_rows = self.db.execute("SELECT count(*) FROM readings").fetchone()[0]
        return self.journal_rows

    # results -----------------------------------------------------------------------------
    def has_result(self, stream: str, window: int) -> bool:
        return self.db.execute(
            "SELECT 1 FROM results WHERE stream = ? AND grid = ? AND window = ?",
            (stream, self.grids.get(stream, ""), window)).fetchone() is not None

    def add_result(self, result: Result) -> int | None:
        """Store a result and retire its window; None if the window already has one."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO results (stream, grid, window, end_ts, body) "
            "VALUES (?, ?, ?, ?, ?)", (result.stream, self.grids.get(result.stream, ""),
                                       result.window, result.end_ts, result.model_dump_json()))
        self.db.execute("DELETE FROM windows WHERE stream = ? AND window = ?",
                        (result.stream, result.window))
        return cur.lastrowid if cur.rowcount else None

    def _rows(self, cur: sqlite3.Cursor) -> list[Result]:
        return [Result.model_validate_json(body).model_copy(update={"id": rid})
                for rid, body in cur]

    def results(self, stream: str | None = None, since: float | None = None,
                since_id: int = 0, limit: int = 100) -> list[Result]:
        """Results oldest first, filtered by stream, end time and id."""
        q = "SELECT id, body FROM results WHERE id > ?"
        args: list[object] = [since_id]
        if stream is not None:
            q += " AND stream = ?"
            args.append(stream)
        if since is not None:
            q += " AND end_ts >= ?"
            args.append(since)
        q += " ORDER BY id LIMIT ?"
        args.append(limit)
        return self._rows(self.db.execute(q, args))

    def latest(self) -> list[Result]:
        """The newest result of every stream."""
        return self._rows(self.db.execute(
            "SELECT id, body FROM results WHERE id IN (SELECT last_id FROM result_stats) "
            "ORDER BY stream"))

    def result_counts(self) -> dict[str, tuple[int, float | None]]:
        """Per stream: number of results and the newest end time."""
        return {s: (n, t) for s, n, t in self.db.execute(
            "SELECT stream, n, last_end_ts FROM result_stats")}

    def prune_results(self, before_ts: float | None, keep: int, batch: int) -> int:
        """Delete up to `batch` of the oldest settled results (published, or refused and
        parked) that are beyond the newest `keep` or end before `before_ts`; how many went.

        Never a result still to be published, the newest of a stream (/v1/results/latest),
        or the highest window of a stream's grid in force (it marks where its windows
        resume after a restart). Oldest by id, through the (published, id) index: a batch
        costs the same however large the table.
        """
        total = int(self.db.execute("SELECT coalesce(sum(n), 0) FROM result_stats")
                    .fetchone()[0])
        if total <= keep and not self._settled_before(before_ts):
            return 0  # the usual tick: nothing over either limit, so no rows read
        keep_ids = {int(i) for (i,) in self.db.execute("SELECT last_id FROM result_stats")}
        for stream, grid in self.grids.items():
            row = self.db.execute("SELECT id FROM results WHERE stream = ? AND grid = ? "
                                  "ORDER BY window DESC LIMIT 1", (stream, grid)).fetchone()
            if row is not None:
                keep_ids.add(int(row[0]))
        rows: list[tuple[int, float]] = []
        for state in (1, REFUSED):  # one range each: IN (1, 2) would sort the whole index
            rows += self.db.execute("SELECT id, end_ts FROM results WHERE published = ? "
                                    "ORDER BY id LIMIT ?", (state, batch + len(keep_ids)))
        over = total - keep
        gone: list[int] = []
        for rid, end_ts in sorted(rows):
            if len(gone) >= batch:
                break
            if rid not in keep_ids and (len(gone) < over or (
                    before_ts is not None and end_ts < before_ts)):
                gone.append(rid)
        if gone:
            with self.tx():
                self.db.execute(f"DELETE FROM results WHERE id IN ({','.join('?' * len(gone))})",
                                gone)
        return len(gone)

    def _settled_before(self, ts: float | None) -> bool:
        """Whether the oldest settled result of either kind ends before `ts` (by id, via
        the (published, id) index: the oldest by id is the oldest window in practice)."""
        if ts is None:
            return False
        return any(self.db.execute(
            "SELECT 1 FROM (SELECT end_ts FROM results WHERE published = ? ORDER BY id "
            "LIMIT 1) WHERE end_ts < ?", (state, ts)).fetchone() for state in (1, REFUSED))

    def unpublished(self, limit: int = 100) -> list[Result]:
        """Results not yet confirmed published on MQTT, oldest first."""
        return self._rows(self.db.execute(
            "SELECT id, body FROM results WHERE published = 0 ORDER BY id LIMIT ?", (limit,)))

    def count_unpublished(self) -> int:
        """Results not yet confirmed published on MQTT."""
        return int(self.db.execute("SELECT count(*) FROM results WHERE published = 0")
                   .fetchone()[0])

    def mark_published(self, result_id: int) -> None:
        self.db.execute("UPDATE results SET published = 1 WHERE id = ?", (result_id,))

    def mark_refused(self, result_id: int, why: str) -> None:
        """Park a result the broker refused: kept and served, not published again this run."""
        self.db.execute("UPDATE results SET published = ?, refused = ? WHERE id = ?",
                        (REFUSED, why, result_id))

    # dead letters ------------------------------------------------------------------------
    def add_deadletter(self, topic: str, reason: str, detail: str, payload: bytes) -> int:
        """Record a rejected input (its first bytes only); returns its id."""
        cur = self.db.execute(
            "INSERT INTO deadletters (ts, topic, reason, detail, payload_head, payload_bytes) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), topic, reason, detail, payload[:PAYLOAD_HEAD_BYTES], len(payload)))
        new_id = int(cur.lastrowid or 0)
        if new_id % DEADLETTER_PRUNE_EVERY == 0:
            gone = self.db.execute("DELETE FROM deadletters WHERE id <= ?",
                                   (new_id - DEADLETTER_KEEP,)).rowcount
            self.deadletters_pruned += gone
        return new_id

    def deadletter_counts(self) -> dict[str, int]:
        """Dead letters by reason."""
        return dict(self.db.execute("SELECT reason, count(*) FROM deadletters GROUP BY reason"))

    def unpublished_deadletters(self, limit: int = 100) -> list[tuple[int, bytes]]:
        """Dead letters not yet confirmed published on MQTT, oldest first: (id, JSON)."""
        cur = self.db.execute(
            "SELECT id, ts, topic, reason, detail, payload_head, payload_bytes FROM deadletters "
            "WHERE published = 0 ORDER BY id LIMIT ?", (limit,))
        return [(i, json.dumps({"id": i, "ts": ts, "topic": topic, "reason": reason,
                                "detail": detail, "payload_head": bytes(head).hex(),
                                "payload_bytes": size}).encode())
                for i, ts, topic, reason, detail, head, size in cur]

    def mark_deadletter_published(self, deadletter_id: int) -> None:
        self.db.execute("UPDATE deadletters SET published = 1 WHERE id = ?", (deadletter_id,))

    def mark_deadletter_refused(self, deadletter_id: int, why: str) -> None:
        """Park a dead letter the broker refused: kept, not published again this run."""
        self.db.execute("UPDATE deadletters SET published = ?, refused = ? WHERE id = ?",
                        (REFUSED, why, deadletter_id))

    def requeue_refused(self) -> int:
        """Give every parked row one more try; how many. Called at start: a refusal is
        usually an ACL or a size limit, and a restart is what follows fixing one."""
        with self.tx():
            return sum(self.db.execute(
                f"UPDATE {table} SET published = 0, refused = NULL WHERE published = ?",
                (REFUSED,)).rowcount for table in ("results", "deadletters"))
