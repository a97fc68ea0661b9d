"""The uplink's current link rate, sensed locally: Wi-Fi tx bitrate (iw) or the tc tbf rate
(read over rtnetlink).

The coordinator sees the link through telemetry a second or more late; the radio knows its
rate now. The inferencer uses this reading to skip a transmission that cannot make its
deadline instead of waiting for the reply to time out.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from edgetok.aio import within
from edgetok.gateway.qdisc import read_tbf_rate

log = logging.getLogger(__name__)

SenseMode = Literal["auto", "iw", "tc", "off"]
# A reading older than this many poll intervals is not trusted (the poller is stuck).
STALE_POLLS = 4
# One poll must not hang the loop: iw answers in milliseconds.
POLL_TIMEOUT_S = 2.0
_IW_RATE = re.compile(r"tx bitrate:\s*([0-9.]+)\s*MBit/s")


async def run_bounded(cmd: Sequence[str], timeout_s: float) -> tuple[int, bytes, bytes]:
    """Run a command off the event loop: (exit code, stdout, stderr); TimeoutError past
    timeout_s. A child that outlasts it, or its caller's cancellation, is killed and reaped:
    a hung iw or tc (a wedged driver) left running would pile up one child per try."""
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await within(proc.communicate(), timeout_s)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out, err


def parse_iw_link(text: str) -> float | None:
    """Bit/s from `iw dev IF link` output ('tx bitrate: 72.2 MBit/s ...'), None if absent."""
    m = _IW_RATE.search(text)
    return float(m.group(1)) * 1e6 if m else None


def pick_mode(want: SenseMode, interface: str | None) -> SenseMode:
    """The mode that can work here: iw on a wireless interface, else tc, else off."""
    if interface is None or want == "off":
        return "off"
    wireless = Path(f"/sys/class/net/{interface}/wireless").exists()
    if want in ("auto", "iw") and wireless and shutil.which("iw"):
        return "iw"
    exists = Path(f"/sys/class/net/{interface}").exists()
    if want in ("auto", "tc") and exists:
        return "tc"
    if want != "auto":
        log.warning("link sensing %r is not possible on %s; off", want, interface)
    return "off"


def _hint(exc: BaseException) -> str:
    """What to do about a refused netlink socket; '' for other failures."""
    if isinstance(exc, OSError) and exc.errno in (errno.EAFNOSUPPORT, errno.EPERM,
                                                  errno.EACCES):
        return (" (netlink refused: under systemd, install with --with-actuators, whose "
                "drop-in allows AF_NETLINK, or set [actuators] link_sense = \"off\")")
    return ""


class LinkSensor:
    """Polls the interface's link rate; `rate_bps()` is the latest fresh reading or None."""

    def __init__(self, mode: SenseMode, interface: str | None, interval_s: float) -> None:
        self.mode = pick_mode(mode, interface)
        self.interface = interface
        self.interval_s = interval_s
        self._rate: float | None = None
        self._at = -float("inf")
        self.errors = 0
        self.last_error: str | None = None
        self._polling = False

    async def _read(self) -> float | None:
        assert self.interface is not None
        if self.mode == "tc":  # one netlink round trip, tens of µs: no need to leave the loop
            return read_tbf_rate(self.interface)
        _, out, _ = await run_bounded(["iw", "dev", self.interface, "link"], POLL_TIMEOUT_S)
        return parse_iw_link(out.decode(errors="replace"))

    async def poll(self) -> float | None:
        """Read the rate once (None when the link reports none, e.g. no tbf installed, or
        while another poll still runs: one reader of the link at a time)."""
        if self.mode == "off" or self._polling:
            return None
        loop = asyncio.get_running_loop()
        self._polling = True
        try:
            rate = await self._read()
        except (OSError, TimeoutError) as exc:
            self.errors += 1
            self.last_error = str(exc) or type(exc).__name__
            # The first failure is worth a warning: a sandbox without netlink (the systemd
            # unit without its actuators drop-in) turns sensing, and the server probes that
            # need it, off for good, which was silent at DEBUG.
            log.log(logging.WARNING if self.errors == 1 else logging.DEBUG,
                    "link sensing with %s on %s failed: %s%s", self.mode, self.interface,
                    self.last_error, _hint(exc))
            return None
        finally:
            self._polling = False
        self._rate, self._at = rate, loop.time()
        return rate

    def rate_bps(self) -> float | None:
        """The latest reading, unless it is older than STALE_POLLS intervals."""
        if self._rate is None:
            return None
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:
            return None
        return self._rate if now - self._at <= STALE_POLLS * self.interval_s else None

    async def run(self) -> None:
        """Poll forever (returns at once when sensing is off)."""
        if self.mode == "off":
            return
        log.info("sensing the uplink rate of %s with %s every %.2f s", self.interface,
                 self.mode, self.interval_s)
        while True:
            await self.poll()
            await asyncio.sleep(self.interval_s)

    def status(self) -> dict[str, object]:
        """Mode, interface and the latest reading, for /v1/status."""
        return {"mode": self.mode, "interface": self.interface, "rate_bps": self.rate_bps(),
                "errors": self.errors, "last_error": self.last_error}
