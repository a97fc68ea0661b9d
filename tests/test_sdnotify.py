"""edgetok.sdnotify against a real AF_UNIX datagram socket standing in for systemd's."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edgetok import sdnotify
from edgetok.sdnotify import Watchdog, notify, status, watchdog_interval_s

# Generous upper bound for a datagram to arrive; only a broken implementation waits this long.
RECV_TIMEOUT_S = 5.0


@dataclass
class NotifySocket:
    """The receiving end of $NOTIFY_SOCKET, as PID 1 would hold it."""

    sock: socket.socket
    address: str

    def recv(self, timeout: float = RECV_TIMEOUT_S) -> list[str]:
        """The lines of the next datagram."""
        self.sock.settimeout(timeout)
        return self.sock.recv(65536).decode().split("\n")

    def drain(self) -> list[list[str]]:
        """Every datagram already queued, without waiting."""
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(65536).decode().split("\n"))
        except BlockingIOError:
            return out
        finally:
            self.sock.setblocking(True)

    async def arecv(self) -> list[str]:
        """The next datagram, awaited on the running loop."""
        self.sock.setblocking(False)
        data = await asyncio.wait_for(
            asyncio.get_running_loop().sock_recv(self.sock, 65536), RECV_TIMEOUT_S
        )
        return data.decode().split("\n")


@pytest.fixture
def path_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    """A socket bound to a file path (sun_path is limited to 108 bytes, so keep it short)."""
    workdir = tempfile.mkdtemp(prefix="sdn-")
    path = os.path.join(workdir, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield NotifySocket(sock, path)
    sock.close()
    shutil.rmtree(workdir)


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    """A socket in the abstract namespace, announced as '@name' the way systemd does."""
    name = f"edgetok-sdnotify-test/{os.getpid()}/{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield NotifySocket(sock, "@" + name)
    sock.close()


def test_ready_and_status_arrive_as_one_datagram(path_socket: NotifySocket) -> None:
    """READY=1 and STATUS= sent together are one datagram, lines in order."""
    assert notify(sdnotify.READY, status("connected to broker; bundle tiny loaded"))
    assert path_socket.recv() == ["READY=1", "STATUS=connected to broker; bundle tiny loaded"]


def test_stopping_and_watchdog_lines(path_socket: NotifySocket) -> None:
    """Each call is its own datagram carrying exactly what was passed."""
    assert notify(sdnotify.STOPPING)
    assert notify(sdnotify.WATCHDOG)
    assert path_socket.recv() == ["STOPPING=1"]
    assert path_socket.recv() == ["WATCHDOG=1"]


def test_abstract_namespace_socket(abstract_socket: NotifySocket) -> None:
    """An '@' NOTIFY_SOCKET reaches the abstract-namespace socket."""
    assert notify(sdnotify.READY)
    assert abstract_socket.recv() == ["READY=1"]


def test_no_socket_is_a_quiet_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside systemd notify() returns False and raises nothing."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify(sdnotify.READY) is False


def test_dead_socket_returns_false(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A NOTIFY_SOCKET nobody listens on (PID 1 gone) is reported, not raised."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert notify(sdnotify.READY) is False


def test_unsupported_address_kind_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    """A vsock address (systemd 253+ in VMs) is declined rather than misrouted."""
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert notify(sdnotify.READY) is False


def test_newline_cannot_inject_assignments(path_socket: NotifySocket) -> None:
    """A multi-line value is refused by notify() and flattened by status()."""
    with pytest.raises(ValueError):
        notify("STATUS=bad\nREADY=1")
    with pytest.raises(ValueError):
        notify("READY")
    assert notify(status("broker said:\nREADY=1  oops"))
    assert path_socket.recv() == ["STATUS=broker said: READY=1 oops"]


def test_status_is_bounded() -> None:
    """Very long status text is cut to STATUS_MAX_CHARS."""
    line = status("x" * (sdnotify.STATUS_MAX_CHARS * 3))
    assert line == "STATUS=" + "x" * sdnotify.STATUS_MAX_CHARS


def test_extend_timeout_line() -> None:
    """EXTEND_TIMEOUT_USEC= is in microseconds."""
    assert sdnotify.extend_timeout(90) == "EXTEND_TIMEOUT_USEC=90000000"


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 30.0),
        ("30000000", "self", 30.0),
        ("30000000", "other", None),
        ("0", None, None),
        ("not-a-number", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    """WATCHDOG_USEC is honoured only when WATCHDOG_PID (if any) names this process."""
    if usec is None:
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is None:
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() if pid == "self" else os.getpid() + 1))
    assert watchdog_interval_s() == expected


def test_watchdog_takes_systemd_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit interval the Watchdog uses WATCHDOG_USEC and pings at half of it."""
    monkeypatch.setenv("WATCHDOG_USEC", "8000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    dog = Watchdog(lambda: True)
    assert dog.enabled
    assert dog.period_s == pytest.approx(4.0)


@pytest.mark.asyncio
async def test_watchdog_without_systemd_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    """No WatchdogSec= means run() ends at once, so a TaskGroup is not held open by it."""
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    dog = Watchdog(lambda: True)
    assert not dog.enabled
    await asyncio.wait_for(dog.run(), RECV_TIMEOUT_S)
    assert dog.pings == 0


@dataclass
class Pipeline:
    """A stand-in pipeline: progress is a monotonic timestamp that a worker keeps advancing."""

    stall_after_s: float = 0.3
    last_progress: float = field(default_factory=time.monotonic)
    checks_while_stalled: int = 0
    stalled: asyncio.Event = field(default_factory=asyncio.Event)

    def age(self) -> float:
        """Seconds since the pipeline last moved a window along."""
        return time.monotonic() - self.last_progress

    def healthy(self) -> bool:
        """What the daemon passes to Watchdog: recent progress means healthy."""
        ok = self.age() < self.stall_after_s
        if not ok:
            self.checks_while_stalled += 1
            if self.checks_while_stalled >= 3:
                self.stalled.set()
        return ok


@pytest.mark.asyncio
async def test_stalled_pipeline_stops_the_pings(path_socket: NotifySocket) -> None:
    """Pings flow while the pipeline progresses, stop when it stalls, resume when it recovers."""
    pipe = Pipeline()
    dog = Watchdog(pipe.healthy, interval_s=0.1)
    stop_worker = asyncio.Event()

    async def worker() -> None:
        while not stop_worker.is_set():
            pipe.last_progress = time.monotonic()
            await asyncio.sleep(0.01)

    async with asyncio.TaskGroup() as tg:
        worker_task = tg.create_task(worker())
        dog_task = tg.create_task(dog.run())
        for _ in range(3):
            assert await path_socket.arecv() == ["WATCHDOG=1"]

        # The pipeline stalls: progress stops, health goes stale after stall_after_s.
        stop_worker.set()
        await worker_task
        await asyncio.wait_for(pipe.stalled.wait(), RECV_TIMEOUT_S)
        path_socket.drain()  # pings sent before the stall became visible
        withheld = dog.withheld
        pipe.checks_while_stalled = 0
        pipe.stalled.clear()
        await asyncio.wait_for(pipe.stalled.wait(), RECV_TIMEOUT_S)  # three more stalled checks
        assert path_socket.drain() == []
        assert dog.withheld >= withheld + 3
        pings_while_stalled = dog.pings

        # Progress resumes: pings come back.
        pipe.last_progress = time.monotonic() + 3600
        assert await path_socket.arecv() == ["WATCHDOG=1"]
        assert dog.pings > pings_while_stalled
        dog_task.cancel()


@pytest.mark.asyncio
async def test_raising_health_check_counts_as_unhealthy(path_socket: NotifySocket) -> None:
    """A health callback that raises withholds the ping and does not kill the watchdog."""
    calls = 0

    def broken() -> bool:
        nonlocal calls
        calls += 1
        raise RuntimeError("pipeline state unreadable")

    dog = Watchdog(broken, interval_s=0.1)
    assert dog.tick() is False
    assert dog.tick() is False
    assert calls == 2 and dog.withheld == 2 and dog.pings == 0
    assert path_socket.drain() == []
