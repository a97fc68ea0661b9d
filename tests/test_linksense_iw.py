"""Link sensing with iw: a hung iw is killed and reaped, and polls never overlap.

The hung iw is a fake on PATH (a wedged driver cannot be produced on demand); it records its
pid, so the test can tell whether that process still exists.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from harness import until

from edgetok.gateway import linksense
from edgetok.gateway.linksense import LinkSensor

IW_LINK = "Connected to aa:bb:cc:dd:ee:ff (on wlan0)\n\ttx bitrate: 72.2 MBit/s MCS 7\n"


def fake_iw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> Path:
    """Put an `iw` that appends its pid to a file, then runs `body`, first on PATH."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    pids = tmp_path / "iw.pids"
    iw = bindir / "iw"
    iw.write_text(f"#!/bin/sh\necho $$ >> {pids}\n{body}\n")
    iw.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return pids


def alive(pid: int) -> bool:
    """Whether the process exists at all (an unreaped zombie counts: it was not waited for)."""
    return Path(f"/proc/{pid}").exists()


def sensor() -> LinkSensor:
    s = LinkSensor("off", "wlan0", 0.5)
    s.mode = "iw"  # as pick_mode chooses on a wireless interface with iw installed
    return s


@pytest.mark.asyncio
async def test_a_hung_iw_is_killed_and_reaped(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pids = fake_iw(tmp_path, monkeypatch, "exec sleep 30")
    monkeypatch.setattr(linksense, "POLL_TIMEOUT_S", 0.2)
    s = sensor()
    for _ in range(3):
        assert await s.poll() is None
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 3 and s.errors == 3
    assert [p for p in started if alive(p)] == []


@pytest.mark.asyncio
async def test_a_cancelled_poll_leaves_no_iw_behind(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon stops its sensor by cancelling it, mid-poll as likely as not."""
    pids = fake_iw(tmp_path, monkeypatch, "exec sleep 30")
    task = asyncio.create_task(sensor().run())
    await until(lambda: pids.exists() and pids.read_text().strip())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [pid] = [int(p) for p in pids.read_text().split()]
    assert not alive(pid)


@pytest.mark.asyncio
async def test_polls_never_overlap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second poll while the first waits on iw starts no second iw."""
    pids = fake_iw(tmp_path, monkeypatch, "sleep 0.3\nprintf '%s' \"$IW_OUT\"")
    monkeypatch.setenv("IW_OUT", IW_LINK)
    s = sensor()
    first, second = await asyncio.gather(s.poll(), s.poll())
    assert first == pytest.approx(72.2e6) and second is None
    assert len(pids.read_text().split()) == 1
    assert await s.poll() == pytest.approx(72.2e6)  # and the next one runs again
    assert s.rate_bps() == pytest.approx(72.2e6) and s.errors == 0


@pytest.mark.asyncio
async def test_a_refused_netlink_socket_is_a_warning_with_what_to_do(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The systemd unit without its actuators drop-in refuses AF_NETLINK; sensing then
    stayed off with only a DEBUG line. The refusal is injected: this host allows netlink."""
    import errno
    import logging

    def refused(interface: str) -> float | None:
        raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))

    monkeypatch.setattr(linksense, "read_tbf_rate", refused)
    s = LinkSensor("tc", "lo", 0.5)
    with caplog.at_level(logging.DEBUG, logger="edgetok.gateway.linksense"):
        for _ in range(3):
            assert await s.poll() is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "--with-actuators" in warnings[0]
    assert s.status()["errors"] == 3 and "not supported" in str(s.status()["last_error"])
