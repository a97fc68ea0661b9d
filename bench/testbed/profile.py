"""Where a process's time goes: py-spy recordings and their samples counted per stage."""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The gateway's stages, by the source files (and functions) that do their work. A sample
# goes to the stage of the frame nearest its leaf that any stage claims; where one frame
# matches several, the first stage listed wins, so the catch-alls come last. Frames show
# paths relative to sys.path (gateway/store.py), or below site-packages (onnxruntime/...).
# Frames no stage claims (json, contextlib, asyncio's transports and futures, edgetok/aio.py)
# count for the caller that a stage claims: a socket write from edgetok/mqttconn.py is MQTT's.
GATEWAY_STAGES: tuple[tuple[str, str], ...] = (
    ("head (ONNX Runtime)", r"models/runtime\.py:|models/ortcapi\.py:|onnxruntime/"),
    ("tokenize", r"tokenizers/"),
    ("journal (SQLite)", r"gateway/store\.py:|sqlite3/"),
    # Encoding (and quantizing) a frame and the send's bookkeeping in Inferencer._remote,
    # _exchange and the server probes; publishing the frame, below it, is MQTT's.
    ("uplink", r"gateway/uplink\.py:|edgetok/frames\.py:"
               r"|^Inferencer\.(_remote|_exchange|_probe_server) "),
    ("mqtt", r"edgetok/mqtt\w*\.py:|gateway/mqtt\w*\.py:|aiomqtt/|paho/"),
    ("decode/ingest", r"gateway/(decode|ingest|windows)\.py:"),
    ("control plane",
     r"gateway/(controlplane|actuators|linksense|qdisc)\.py:|edgetok/control\.py:"),
    ("http", r"gateway/http\.py:|edgetok/web\.py:|aiohttp/"),
    ("gateway (other)", r"gateway/|edgetok/(?!aio\.py:)"),
    # py-spy leaves out threads the OS sees asleep, so a sample in the loop's select or at a
    # worker's queue is a thread woken and not yet back in Python: under a CPU quota, that
    # includes waiting for the quota's next period.
    ("wake-up (select, queue)", r"\(selectors\.py:|^_worker \(concurrent/futures/thread\.py:"),
    ("event loop", r"asyncio/(base_events|events|runners)\.py:"),
)
OTHER = "other"
GATEWAY_ORDER = (*(name for name, _ in GATEWAY_STAGES), OTHER)
# Code worth an inclusive share: the gateway's own and its MQTT stack.
GATEWAY_CODE = r"gateway/|edgetok/|models/|tokenizers/|paho/|aiomqtt/"
# Entry points sit under every sample of their thread: an inclusive share that says nothing.
ENTRY_FRAME = re.compile(r"^(main|<module>|cmd_\w+|run_gateway) \(")
# One line of `py-spy record --format raw`: "thread (TID): Name;frame;...;frame COUNT".
LINE = re.compile(r"^(?P<stack>\S.*) (?P<count>[0-9]+)$")
UNNAMED = "(unnamed)"


@dataclass(frozen=True, slots=True)
class Stack:
    """One line of a collapsed-stack file: a call stack, root first, seen `count` times."""

    thread: str
    frames: tuple[str, ...]
    count: int


def parse_line(line: str) -> Stack | None:
    """The stack of one line, or None for a line that is not one."""
    m = LINE.match(line.strip())
    if m is None or int(m["count"]) == 0:
        return None
    frames = m["stack"].split(";")
    thread = UNNAMED
    if frames[0].startswith("thread ("):  # recorded with --threads
        _, named, name = frames.pop(0).partition("): ")
        thread = name if named and name else UNNAMED
    if not frames or not all(frames):
        return None
    return Stack(thread, tuple(frames), int(m["count"]))


def read_stacks(raw: Path | Sequence[Path]) -> Iterator[Stack]:
    """Every stack of one or more raw files; several files add up."""
    for path in [raw] if isinstance(raw, Path) else raw:
        for line in path.read_text(errors="replace").splitlines():
            stack = parse_line(line)
            if stack is not None:
                yield stack


def stage_of(frames: Sequence[str], stages: Sequence[tuple[str, re.Pattern[str]]]) -> str:
    """The stage of the frame nearest the leaf that a stage claims, else OTHER."""
    for frame in reversed(frames):
        for name, pattern in stages:
            if pattern.search(frame):
                return name
    return OTHER


def summarise(raw: Path | Sequence[Path], windows: int | None = None, top: int = 10,
              stages: Sequence[tuple[str, str]] = GATEWAY_STAGES,
              threads: Collection[str] | None = None,
              own: str = GATEWAY_CODE) -> dict[str, Any]:
    """Samples per stage, overall and per thread name, and the top self and inclusive frames."""
    # windows: how many the recordings span, for samples per window; threads: the names to
    # keep (all if None); own: the frames that get an inclusive share.
    table = [(name, re.compile(pattern)) for name, pattern in stages]
    order = [name for name, _ in stages] + [OTHER]
    own_code = re.compile(own)
    per_thread: dict[str, collections.Counter[str]] = collections.defaultdict(
        collections.Counter)
    leaf: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for s in read_stacks(raw):
        if threads is not None and s.thread not in threads:
            continue
        per_thread[s.thread][stage_of(s.frames, table)] += s.count
        leaf[s.frames[-1]] += s.count
        for frame in set(s.frames):
            if own_code.search(frame) and not ENTRY_FRAME.match(frame):
                inclusive[frame] += s.count
    overall = sum(per_thread.values(), collections.Counter[str]())
    total = overall.total()
    busiest = sorted(per_thread.items(), key=lambda kv: (-kv[1].total(), kv[0]))
    return {
        "samples": total, "windows": windows,
        "samples_per_window": _per(total, windows),
        "stages": _by_stage(overall, order, windows),
        "threads": {name: {"samples": c.total(), "stages": _by_stage(c, order, windows)}
                    for name, c in busiest},
        "self": _top(leaf, total, top), "inclusive": _top(inclusive, total, top),
    }


def _per(samples: int, windows: int | None) -> float | None:
    """Samples per window, or None without a window count."""
    return round(samples / windows, 2) if windows else None


def _by_stage(counts: collections.Counter[str], order: list[str], windows: int | None
              ) -> dict[str, dict[str, Any]]:
    """Samples, share and samples per window of each stage that has any, in table order."""
    total = max(counts.total(), 1)
    return {stage: {"samples": counts[stage], "share": round(counts[stage] / total, 3),
                    "per_window": _per(counts[stage], windows)}
            for stage in order if counts[stage]}


def _top(counts: collections.Counter[str], total: int, top: int) -> list[tuple[str, float]]:
    """The `top` most sampled frames with their share of all samples (ties by name)."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return [(frame, round(n / max(total, 1), 3)) for frame, n in ranked]


def stage_table(title: str, summaries: dict[str, dict[str, Any]],
                order: Sequence[str] = GATEWAY_ORDER) -> str:
    """Samples per window of each stage (rows) for each summary (columns), as text."""
    seen = {s for m in summaries.values() for s in m["stages"]}
    stages = [s for s in order if s in seen] + sorted(seen - set(order))
    width = max([len(k) for k in summaries] + [8])
    label = max(len(s) for s in [*stages, "stage"])
    lines = [title, f"{'stage':<{label}}" + "".join(f" {k:>{width}}" for k in summaries)]
    for stage in [*stages, "total"]:
        cells = [m["samples_per_window"] if stage == "total"
                 else m["stages"].get(stage, {}).get("per_window") for m in summaries.values()]
        lines.append(f"{stage:<{label}}" + "".join(
            f" {'-' if c is None else f'{c:.1f}':>{width}}" for c in cells))
    return "\n".join(lines)


def py_spy() -> str:
    """The py-spy executable: on PATH, else next to this interpreter."""
    return shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


def record(pid: int, out: Path, rate: int) -> subprocess.Popen[bytes]:
    """Start py-spy sampling process `pid` into `out` (its messages: `out`.log) until stop()."""
    # --nonblocking: never pause the target, whose CPU quota must not be spent on sampling.
    argv = [py_spy(), "record", "--pid", str(pid), "--format", "raw", "--threads",
            "--nonblocking", "--rate", str(rate), "-o", str(out)]
    with out.with_suffix(".log").open("wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


def stop(recorders: Sequence[subprocess.Popen[bytes]], timeout: float = 30) -> None:
    """Stop recorders with SIGINT, which makes py-spy write its file; kill any that hang."""
    for proc in recorders:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in recorders:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
