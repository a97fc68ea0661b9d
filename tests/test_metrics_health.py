"""The real gateway daemon talks sd_notify: STATUS while waiting, READY only after the broker
connects, health-driven WATCHDOG pings, STOPPING on SIGTERM; /readyz agrees."""

from __future__ import annotations

import http.client
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Broker, free_port
from harness import Proc, gateway_config, spawn

pytestmark = pytest.mark.slow


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        yield path, sock
    finally:
        sock.close()


def _collect(sock: socket.socket, until: str | None, seconds: float) -> list[str]:
    """Lines received for `seconds`, or until a datagram carries the line `until`."""
    lines: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            lines += sock.recv(4096).decode().split("\n")
        except TimeoutError:
            break
        if until is not None and until in lines:
            break
    return lines


def wait_alive(gw: Proc) -> None:
    """Until /healthz answers (readyz cannot: the broker is down on purpose)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert gw.proc is not None and gw.proc.poll() is None, gw.logtext()[-2000:]
        try:
            if gw.get("/healthz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(gw.logtext()[-2000:])


def test_ready_after_broker_then_watchdog_then_stopping(
        tmp_path: Path, tiny_bundle: Path, notify_socket: tuple[Path, socket.socket]) -> None:
    path, sock = notify_socket
    broker = Broker(port=free_port(), workdir=tmp_path / "broker")
    broker.workdir.mkdir()
    gw = spawn("gateway", gateway_config(tmp_path, tiny_bundle, broker.port, free_port(),
                                         variant="r0.00-s2"), tmp_path, "gateway")
    # One second of watchdog: the daemon pings every half of it while healthy.
    gw.env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"}
    gw.start(wait=False)
    try:
        wait_alive(gw)
        early = _collect(sock, "READY=1", 2)
        assert "READY=1" not in early, early
        assert any(line.startswith("STATUS=waiting for broker") for line in early), early
        code, ready = gw.get("/readyz")
        assert code == 503 and ready["failing"] == ["broker_connected"]
        broker.start()
        later = _collect(sock, "READY=1", 30)
        assert "READY=1" in later, gw.logtext()[-2000:]
        assert gw.get("/readyz")[0] == 200
        pings = _collect(sock, None, 2.5)
        assert pings.count("WATCHDOG=1") >= 2, pings
        # An open event stream must not hold up the shutdown: the server ends it.
        sse = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=30)
        sse.request("GET", "/v1/results/stream")
        stream = sse.getresponse()
        assert stream.status == 200 and stream.readline().startswith(b"retry:")
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in _collect(sock, "STOPPING=1", 20)
        stream.read()  # returns at the stream's end; a stream left open raises TimeoutError
        assert stream.isclosed()
        sse.close()
        assert gw.proc.wait(timeout=30) == 0
    finally:
        gw.stop()
        broker.stop()
