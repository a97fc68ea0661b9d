"""The sd_notify protocol inline: readiness, status and health-driven watchdog pings to systemd.

The protocol is one datagram of newline-separated KEY=VALUE lines sent to the AF_UNIX socket
named by $NOTIFY_SOCKET (a path, or an abstract-namespace name when it starts with '@'); see
sd_notify(3). Outside systemd the variable is unset and every call is a cheap no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"

READY = "READY=1"
STOPPING = "STOPPING=1"
RELOADING = "RELOADING=1"
WATCHDOG = "WATCHDOG=1"

# How long one send may block the caller. PID 1 drains its notify socket quickly, so a full
# queue means the manager is wedged; waiting longer would stall the asyncio loop for nothing,
# while a shorter limit could drop READY=1 during a busy boot.
SEND_TIMEOUT_S = 1.0

# Ping at this fraction of WatchdogSec=, as sd_watchdog_enabled(3) recommends: one late or
# lost ping must not be enough for systemd to kill a healthy daemon.
PING_FRACTION = 0.5

# The longest STATUS= text we send; systemctl status shows one line, and a datagram is bounded.
STATUS_MAX_CHARS = 512


def status(text: str) -> str:
    """A STATUS= line for `text`, flattened to one line so it cannot inject other assignments."""
    flat = " ".join(text.split())
    return "STATUS=" + flat[:STATUS_MAX_CHARS]


def extend_timeout(seconds: float) -> str:
    """An EXTEND_TIMEOUT_USEC= line: ask for `seconds` more before the start/stop timeout."""
    return f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}"


def _address(raw: str) -> str | None:
    """The socket address for a $NOTIFY_SOCKET value, or None if we do not support its kind."""
    if raw.startswith("@"):
        # Linux abstract namespace: a leading NUL byte instead of the '@'.
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    # systemd 253+ also accepts vsock:CID:PORT for VMs; gateways do not use it.
    return None


def notify(*lines: str) -> bool:
    """Send `lines` (READY=1, STATUS=..., STOPPING=1, WATCHDOG=1) as one datagram to systemd.

    Returns False when not run by systemd or when the send failed; it never raises for a
    missing or broken socket, because a notification must not take the daemon down.
    """
    for line in lines:
        if "\n" in line or "=" not in line:
            raise ValueError(f"not a single KEY=VALUE line: {line!r}")
    raw = os.environ.get(NOTIFY_SOCKET_ENV)
    if not raw or not lines:
        return False
    address = _address(raw)
    if address is None:
        log.warning("unsupported %s=%r; notifications are disabled", NOTIFY_SOCKET_ENV, raw)
        return False
    payload = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT_S)
            sock.sendto(payload, address)
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", raw, exc)
        return False
    return True


def watchdog_interval_s() -> float | None:
    """systemd's watchdog timeout for this process in seconds, or None if none is armed.

    WATCHDOG_PID, when set, names the process the watchdog is meant for; a child that merely
    inherited the environment must not ping on the daemon's behalf.
    """
    usec = os.environ.get(WATCHDOG_USEC_ENV)
    if not usec:
        return None
    pid = os.environ.get(WATCHDOG_PID_ENV)
    if pid is not None and pid.strip() != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring malformed %s=%r", WATCHDOG_USEC_ENV, usec)
        return None
    return value / 1_000_000 if value > 0 else None


class Watchdog:
    """Sends WATCHDOG=1 every half interval, but only while `healthy()` says the pipeline is.

    A pipeline that stops making progress stops the pings, so systemd's WatchdogSec= kills and
    (with Restart=on-failure) restarts it, instead of a timer keeping a stuck daemon alive.
    """

    def __init__(
        self,
        healthy: Callable[[], bool],
        interval_s: float | None = None,
        send: Callable[..., bool] = notify,
    ) -> None:
        """Watch `healthy`; the interval defaults to systemd's (watchdog_interval_s())."""
        self.healthy = healthy
        self.interval_s = interval_s if interval_s is not None else watchdog_interval_s()
        self._send = send
        self.pings = 0
        self.withheld = 0
        self._was_healthy = True

    @property
    def enabled(self) -> bool:
        """True when systemd armed a watchdog for us (or an interval was given)."""
        return self.interval_s is not None and self.interval_s > 0

    @property
    def period_s(self) -> float | None:
        """Seconds between health checks (and pings), or None when disabled."""
        return self.interval_s * PING_FRACTION if self.interval_s else None

    def _check(self) -> bool:
        """Ask the callback; a callback that raises counts as unhealthy, and is logged."""
        try:
            return bool(self.healthy())
        except Exception:
            log.exception("watchdog health check raised; treating the pipeline as unhealthy")
            return False

    def tick(self) -> bool:
        """One health check: ping if healthy, withhold if not; True if a ping was sent."""
        ok = self._check()
        if ok != self._was_healthy:
            if ok:
                log.info("pipeline healthy again; resuming watchdog pings")
            else:
                log.warning(
                    "pipeline unhealthy; withholding watchdog pings (systemd will "
                    "restart the service after %.1fs without one)",
                    self.interval_s or 0,
                )
            self._was_healthy = ok
        if not ok:
            self.withheld += 1
            return False
        sent = self._send(WATCHDOG)
        if sent:
            self.pings += 1
        return sent

    async def run(self) -> None:
        """Check and ping until cancelled; returns at once when no watchdog is armed."""
        period = self.period_s
        if period is None:
            log.debug("no systemd watchdog armed; health pings disabled")
            return
        log.info("watchdog armed: %.1fs timeout, health check every %.1fs", self.interval_s, period)
        while True:
            self.tick()
            await asyncio.sleep(period)


# How often STATUS= is refreshed for `systemctl status`; systemd keeps only the last line.
STATUS_INTERVAL_S = 10.0


async def lifecycle(connected: asyncio.Event, ready_status: Callable[[], str],
                    summary: Callable[[], str], watchdog: Watchdog,
                    on_ready: Callable[[], None] | None = None) -> None:
    """STATUS= now, READY=1 once `connected` is set, then STATUS= refreshes and the health
    watchdog until cancelled: what both daemons tell systemd."""
    notify(status(summary()))
    await connected.wait()
    notify(READY, status(ready_status()))
    if on_ready is not None:
        on_ready()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(watchdog.run())
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            notify(status(summary()))
