"""py-spy profiles are counted per stage: the frame nearest the leaf decides, per thread."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from testbed import profile  # noqa: E402

# Collapsed stacks as py-spy writes them with --threads, and lines it never writes.
RAW = """\
thread (101): MainThread;<module> (edgetok/__main__.py:5);run (asyncio/runners.py:190);\
Gateway._ingest (gateway/daemon.py:242);Store.journal (gateway/store.py:101);\
dumps (json/__init__.py:231) 6
thread (101): MainThread;run (asyncio/runners.py:190);Handle._run (asyncio/events.py:80);\
Connection.data_received (edgetok/mqttconn.py:107);decode_json (gateway/decode.py:85) 3
thread (101): MainThread;BaseEventLoop._run_once (asyncio/base_events.py:1922);\
EpollSelector.select (selectors.py:468) 1
thread (102): ort_0;Thread.run (threading.py:982);_worker (concurrent/futures/thread.py:83);\
Runtime.run (models/runtime.py:155);CSession.run (models/ortcapi.py:372) 4
thread (104);mystery (lib/thing.py:3) 1

not a stack
thread (101): MainThread;foo (a.py:1) x
thread (101): MainThread;foo (a.py:1) -3
thread (101): MainThread;foo (a.py:1) 0
thread (101): MainThread 5
thread (101): MainThread;a (a.py:1);;b (b.py:2) 3
"""
# Another gateway's recording: its main thread has another id and the same name.
RAW_2 = """\
thread (201): MainThread;Gateway._process (gateway/daemon.py:199);\
Inferencer._remote (gateway/inference.py:320);encode_frame (edgetok/frames.py:40) 2
"""


def test_stage_is_the_frame_nearest_the_leaf_that_a_stage_claims(tmp_path: Path) -> None:
    """Store.journal beats the daemon and asyncio frames above it, and the json leaf below
    it that no stage claims; decode_json beats the MQTT frame that called it."""
    raw = tmp_path / "a.txt"
    raw.write_text(RAW)
    s = profile.summarise(raw, windows=5)
    stages = {k: v["samples"] for k, v in s["stages"].items()}
    assert stages == {"head (ONNX Runtime)": 4, "journal (SQLite)": 6, "decode/ingest": 3,
                      "wake-up (select, queue)": 1, "other": 1}
    assert list(s["stages"]) == [x for x in profile.GATEWAY_ORDER if x in stages]
    assert s["samples"] == 15
    assert s["samples_per_window"] == 3.0
    assert s["stages"]["journal (SQLite)"]["per_window"] == 1.2
    assert s["stages"]["journal (SQLite)"]["share"] == 0.4
    assert s["self"][0] == ("dumps (json/__init__.py:231)", 0.4)
    # Entry points are on every path: no inclusive share; the frames below them have one.
    inclusive = dict(s["inclusive"])
    assert "<module> (edgetok/__main__.py:5)" not in inclusive
    assert inclusive["Gateway._ingest (gateway/daemon.py:242)"] == 0.4


def test_threads_split_by_name_and_files_add_up(tmp_path: Path) -> None:
    """Samples per thread name: threads of the same name in several recordings add up, a
    thread without a name is counted apart, and `threads` keeps only the named ones."""
    (tmp_path / "a.txt").write_text(RAW)
    (tmp_path / "b.txt").write_text(RAW_2)
    s = profile.summarise([tmp_path / "a.txt", tmp_path / "b.txt"], windows=10)
    assert {k: v["samples"] for k, v in s["threads"].items()} == {
        "MainThread": 12, "ort_0": 4, profile.UNNAMED: 1}
    assert list(s["threads"]) == ["MainThread", "ort_0", profile.UNNAMED]  # busiest first
    main = s["threads"]["MainThread"]["stages"]
    assert main["uplink"] == {"samples": 2, "share": 0.167, "per_window": 0.2}
    assert s["threads"]["ort_0"]["stages"] == {
        "head (ONNX Runtime)": {"samples": 4, "share": 1.0, "per_window": 0.4}}
    only = profile.summarise(tmp_path / "b.txt", threads={"ort_0"})
    assert only["samples"] == 0 and only["stages"] == {} and only["samples_per_window"] is None


def test_leaf_first_then_table_order() -> None:
    """Nearer the leaf wins over earlier in the table; within one frame the table decides."""
    table = [("first", re.compile(r"shared|^a ")), ("second", re.compile(r"shared|^b "))]
    assert profile.stage_of(("a (m.py:1)", "b (m.py:2)"), table) == "second"
    assert profile.stage_of(("b (m.py:2)", "shared (m.py:3)"), table) == "first"
    assert profile.stage_of(("c (m.py:4)",), table) == profile.OTHER


def test_malformed_lines_are_not_stacks() -> None:
    """Lines py-spy never writes give no stack rather than a wrong one."""
    for line in ("", "  ", "not a stack", "t;f (a.py:1) x", "t;f (a.py:1) 0",
                 "thread (1): Main 5", "thread (1): Main;a (a.py:1);;b (b.py:2) 3"):
        assert profile.parse_line(line) is None, line
    assert profile.parse_line("thread (7): ort_1;f (a.py:1);g (b.py:2) 12\n") == \
        profile.Stack("ort_1", ("f (a.py:1)", "g (b.py:2)"), 12)


def test_stage_table_lists_stages_in_table_order() -> None:
    """Rows follow the stage table even when the first column lacks a stage."""
    a = {"samples_per_window": 1.0, "stages": {"event loop": {"per_window": 1.0}}}
    b = {"samples_per_window": 3.0, "stages": {"tokenize": {"per_window": 2.0},
                                               "event loop": {"per_window": 1.0}}}
    rows = profile.stage_table("t", {"joint": a, "server-only": b}).splitlines()
    assert [r.split()[0] for r in rows[2:]] == ["tokenize", "event", "total"]
    assert rows[2].split()[1:] == ["-", "2.0"]
    assert rows[-1].split()[1:] == ["1.0", "3.0"]


# A process that journals rows into SQLite and multiplies matrices with numpy, each in its
# own file and for about the same time, called from a loop in a third file.
BUSY = {
    "journal.py": """
        import time

        def journal(db, rows):
            end = time.monotonic() + 0.01
            while time.monotonic() < end:
                db.executemany("INSERT INTO t VALUES (?, ?)", rows)
                db.commit()
    """,
    "crunch.py": """
        import time

        def crunch(np, a):
            end = time.monotonic() + 0.01
            while time.monotonic() < end:
                a = np.tanh(a @ a.T)
            return a
    """,
    "main.py": """
        import sqlite3, sys, threading, time
        import numpy as np
        from crunch import crunch
        from journal import journal

        db = sqlite3.connect(sys.argv[1])
        db.execute("CREATE TABLE t (a INTEGER, b TEXT)")
        rows = [(i, "x" * 40) for i in range(200)]
        a = np.random.default_rng(0).random((120, 120))
        print("ready", flush=True)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            journal(db, rows)
            a = crunch(np, a) + 0.1
    """,
}


@pytest.mark.slow
def test_summarise_a_real_py_spy_recording(tmp_path: Path) -> None:
    """Record a busy process with py-spy as the test bed does: its SQLite and numpy samples
    go to their stages, not to the loop in main.py that every stack passes through."""
    if not Path(profile.py_spy()).is_file():
        pytest.skip("py-spy is not installed")
    for name, text in BUSY.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    busy = subprocess.Popen([sys.executable, str(tmp_path / "main.py"), str(tmp_path / "db")],
                            cwd=tmp_path, stdout=subprocess.PIPE)
    raw = tmp_path / "profile.txt"
    try:
        assert busy.stdout is not None and busy.stdout.readline() == b"ready\n"
        recorder = profile.record(busy.pid, raw, rate=200)
        time.sleep(1.5)
        profile.stop([recorder])
    finally:
        busy.kill()
        busy.communicate()
    log = raw.with_suffix(".log").read_text(errors="replace")
    if not raw.is_file() and any(k in log for k in ("Permission denied", "not permitted",
                                                    "ptrace")):
        pytest.skip(f"py-spy cannot attach here (ptrace not permitted): {log.strip()[-200:]}")
    assert raw.is_file(), log
    stages = [("journal", r"\(journal\.py:"), ("numpy", r"\(crunch\.py:"),
              ("loop", r"\(main\.py:")]
    s = profile.summarise(raw, windows=3, stages=stages, own=r"\w+\.py:")
    assert s["samples"] >= 50, s  # 200 Hz for 1.5 s, less what the sampler misses
    assert list(s["threads"]) == ["MainThread"]
    share = {k: v["share"] for k, v in s["stages"].items()}
    assert share.get("journal", 0) >= 0.2, share
    assert share.get("numpy", 0) >= 0.2, share
    assert share.get("loop", 0) + share.get(profile.OTHER, 0) <= 0.3, share
    assert s["samples_per_window"] == round(s["samples"] / 3, 2)
    # SQLite and numpy run in C: the leaf py-spy sees is the Python frame that called them.
    assert {frame.split(" (")[1].split(":")[0] for frame, _ in s["self"]} <= {
        "journal.py", "crunch.py", "main.py"}, s["self"]
