"""Actuators for the coordinator's CPU frequency and transmit power, real or emulated.

Real: cpufreq sysfs (scaling_max_freq, or scaling_setspeed under the userspace governor) and
`iw dev IF set txpower fixed`. Where those are missing (containers, wired test hosts) the
emulated mode scales head compute with a cgroup CPU quota, and turns transmit power into an
uplink rate r(p), from the same rate model the coordinator uses: `tc` tbf shapes the uplink
interface to r(p), and each frame is first held for the airtime of the part of it the token
bucket would let through at line speed (see airtime_s).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from edgetok.gateway.linksense import SenseMode, run_bounded
from edgetok.settings import Strict, resolve_path

log = logging.getLogger(__name__)

CPUFREQ = Path("/sys/devices/system/cpu")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Quota period written with no cap.
CPU_PERIOD_US = 10_000
# A quota runs at full speed until spent, then stalls for the rest of its period: at the
# kernel's default 100 ms period a head of a few ms runs unslowed and the next waits up to
# 90 ms, nothing like a slower clock. So the period is the shortest the kernel allows for the
# share: its 1 ms minimum quota (and period) over the share. 25%: 1 ms per 4 ms; 10%: per
# 10 ms; 4%: per 25 ms. Shorter periods cost the scheduler a timer each.
MIN_QUOTA_US = 1_000
MTU_BYTES = 1500
# Emulated radio (tc tbf): bucket and queue bound stay fixed as the rate changes. tbf rebuilds
# its queue when the limit changes (a `latency` bound changes with the rate), and a bucket
# that shrinks can strand a larger packet queued before: either stalls the uplink.
TBF_BURST_BYTES = 2 * MTU_BYTES
TBF_LIMIT_BYTES = 64 * 1024

Mode = Literal["auto", "real", "emulated", "off"]
# Actuation errors kept for /v1/status (the newest; `error_count` counts them all). A write
# that keeps failing fails again on every fallback run, so an unbounded list would grow
# without end.
ERRORS_KEPT = 16
# tc and iw answer in milliseconds; one that hangs (a wedged driver) is killed after this.
TX_TIMEOUT_S = 5.0


def cfs_quota(share: float) -> tuple[int, int]:
    """(quota, period) in µs that cap a process tree at `share` of one core, with the
    shortest period whose quota the kernel accepts (MIN_QUOTA_US)."""
    period = max(math.ceil(MIN_QUOTA_US / share), MIN_QUOTA_US)
    return max(round(share * period), MIN_QUOTA_US), period


class ActuatorSettings(Strict):
    """How decisions on CPU clock and transmit power reach the hardware."""

    cpu_mode: Mode = Field("auto", description="auto: real cpufreq if writable, else an "
                           "emulated cgroup quota if `cgroup` is set, else off.")
    cgroup: Path | None = Field(None, description="cgroup directory whose CPU quota the "
                                "emulated mode writes: cpu.max (v2) or cpu.cfs_quota_us (v1). "
                                "The gateway must run inside it.")
    nominal_hz: float = Field(2.0e9, gt=0, description="The CPU's clock when nothing sets "
                              "it; the emulated quota treats it as one full core.")
    tx_mode: Mode = Field("auto", description="auto: iw on a wireless `interface`, else tc "
                          "tbf (and frame airtime) on `interface` if set, else off.")
    interface: str | None = Field(None, description="Uplink network interface.")
    default_tx_power_w: float = Field(0.1, gt=0, description="Transmit power of the radio "
                                      "when nothing sets it (reported in telemetry, so the "
                                      "coordinator reads measured rates at the true power).")
    bandwidth_hz: float = Field(20e6, gt=0, description="Emulated channel bandwidth B (Hz).")
    gain: float = Field(1e-7, gt=0, description="Emulated channel gain g.")
    noise_w_per_hz: float = Field(4e-21, gt=0, description="Emulated noise density N0.")
    link_sense: SenseMode = Field(
        "auto", description="How the gateway reads its uplink rate now, to skip a transmission "
        "that cannot make its deadline: iw (Wi-Fi tx bitrate), tc (the tbf rate on "
        "`interface`), auto (iw on a wireless interface, else tc), off.")
    link_airtime: bool = Field(
        False, description="Test beds whose tbf rate is set from outside (a link trace), "
        "not by the emulated transmit power: hold each frame for the airtime at the sensed "
        "rate of the part tbf's bucket passes at line speed, as the emulated radio does. "
        "Never on a real link.")
    link_sense_interval_s: float = Field(
        0.5, gt=0, description="Seconds between link-rate readings: shorter notices a drop "
        "sooner. A tc reading is one rtnetlink dump (tens of µs of CPU); an iw reading "
        "spawns `iw` (a few ms).")

    _abs = field_validator("cgroup")(resolve_path)


def rate_bps(p_w: float, s: ActuatorSettings) -> float:
    """Shannon rate r(p) = B log2(1 + p g / (N0 B)) of the emulated channel."""
    return s.bandwidth_hz * math.log2(1 + p_w * s.gain / (s.noise_w_per_hz * s.bandwidth_hz))


def _writable(p: Path) -> bool:
    return p.is_file() and os.access(p, os.W_OK)


class Actuators:
    """Applies (cpu_hz, tx_power_w) and reports which mode each actuator is in."""

    def __init__(self, s: ActuatorSettings) -> None:
        self.s = s
        self.cpu_hz: float | None = None
        self.tx_power_w: float | None = None
        self.errors: deque[str] = deque(maxlen=ERRORS_KEPT)
        self.error_count = 0
        self.link_rate: Callable[[], float | None] | None = None  # the link sensor's reading
        self.cpu_mode = self._pick_cpu()
        self.tx_mode = self._pick_tx()

    def _cpu_files(self) -> list[Path]:
        return sorted(CPUFREQ.glob("cpu[0-9]*/cpufreq/scaling_max_freq"))

    def _pick_cpu(self) -> str:
        want = self.s.cpu_mode
        real_ok = bool(self._cpu_files()) and all(_writable(f) for f in self._cpu_files())
        emu_ok = self.s.cgroup is not None and (
            _writable(self.s.cgroup / "cpu.max") or _writable(self.s.cgroup / "cpu.cfs_quota_us"))
        if want in ("auto", "real") and real_ok:
            return "real"
        if want in ("auto", "emulated") and emu_ok:
            return "emulated"
        if want not in ("auto", "off"):
            self._error(f"cpu actuator mode {want!r} is not possible here")
        return "off"

    def _pick_tx(self) -> str:
        want, iface = self.s.tx_mode, self.s.interface
        if iface is None or want == "off":
            return "off"
        wireless = Path(f"/sys/class/net/{iface}/wireless").exists() and shutil.which("iw")
        if want in ("auto", "real") and wireless:
            return "real"
        if want in ("auto", "emulated") and shutil.which("tc") and \
                Path(f"/sys/class/net/{iface}").exists():
            return "emulated"
        self._error(f"tx actuator mode {want!r} is not possible on {iface}")
        return "off"

    def set_cpu(self, cpu_hz: float) -> None:
        """Set only the clock (cheap: one sysfs or cgroup write), e.g. for a fallback run."""
        if cpu_hz != self.cpu_hz:
            self._set_cpu(cpu_hz)

    async def apply(self, cpu_hz: float, tx_power_w: float) -> bool:
        """Set both; True once both are in force (or their actuator is off). Failures are
        recorded and reported, never raised: the caller decides when to try again."""
        if cpu_hz != self.cpu_hz:
            self._set_cpu(cpu_hz)
        cpu_ok = self.cpu_mode == "off" or self.cpu_hz == cpu_hz
        return await self.set_tx(tx_power_w) and cpu_ok

    def effective_cpu_hz(self) -> float:
        """The clock the head really runs at: as set, or nominal when not actuated."""
        return self.cpu_hz if self.cpu_mode != "off" and self.cpu_hz else self.s.nominal_hz

    def effective_tx_power_w(self) -> float:
        """The power the radio really uses: as set, or its default when not actuated."""
        if self.tx_mode != "off" and self.tx_power_w:
            return self.tx_power_w
        return self.s.default_tx_power_w

    def _set_cpu(self, hz: float) -> None:
        if self.cpu_mode == "off":
            return
        try:
            if self.cpu_mode == "real":
                for f in self._cpu_files():
                    f.write_text(str(int(hz / 1000)))  # sysfs takes kHz
            elif self.cpu_mode == "emulated" and self.s.cgroup is not None:
                quota, period = cfs_quota(min(max(hz / self.s.nominal_hz, 0.01), 64.0))
                if (self.s.cgroup / "cpu.max").exists():  # cgroup v2
                    (self.s.cgroup / "cpu.max").write_text(f"{quota} {period}")
                else:  # cgroup v1 cpu controller
                    (self.s.cgroup / "cpu.cfs_period_us").write_text(str(period))
                    (self.s.cgroup / "cpu.cfs_quota_us").write_text(str(quota))
            self.cpu_hz = hz
        except OSError as exc:
            self._error(f"cannot set CPU clock: {exc}")

    def airtime_s(self, nbytes: int) -> float:
        """Emulated mode: how long to hold a frame of `nbytes` before it goes to the socket.

        tbf sends at r(p) only once its bucket is empty: after any pause the first
        TBF_BURST_BYTES leave at line speed, so on tbf alone a low power would cost a small
        frame nothing. Holding the frame for that part's airtime, bits / r(p), and leaving
        the rest to tbf, puts the whole frame on the air for its bits / r(p).
        """
        free = min(nbytes, TBF_BURST_BYTES)
        if self.tx_mode == "emulated" and self.tx_power_w:
            return 8.0 * free / max(rate_bps(self.tx_power_w, self.s), 1.0)
        sensed = self.link_rate() if self.s.link_airtime and self.link_rate else None
        return 8.0 * free / sensed if sensed else 0.0

    async def set_tx(self, p_w: float) -> bool:
        """Set the transmit power with iw or tc, off the event loop; True once it is in force.

        A command that fails or hangs (killed after TX_TIMEOUT_S) leaves the power as it was.
        """
        iface = self.s.interface
        if iface is None or self.tx_mode == "off" or p_w <= 0 or p_w == self.tx_power_w:
            return True
        if self.tx_mode == "real":
            mbm = round(10 * math.log10(p_w * 1000) * 100)
            cmd = ["iw", "dev", iface, "set", "txpower", "fixed", str(mbm)]
        else:
            bps = max(rate_bps(p_w, self.s), 8000.0)
            cmd = ["tc", "qdisc", "replace", "dev", iface, "root", "tbf", "rate",
                   f"{int(bps)}bit", "burst", str(TBF_BURST_BYTES), "limit",
                   str(TBF_LIMIT_BYTES)]
        try:
            code, _, err = await run_bounded(cmd, TX_TIMEOUT_S)
        except TimeoutError:
            why = f"no answer in {TX_TIMEOUT_S:g} s"
        except OSError as exc:
            why = str(exc)
        else:
            if code == 0:
                self.tx_power_w = p_w
                return True
            why = err.decode(errors="replace").strip() or f"exit code {code}"
        self._error(f"cannot set transmit power: {' '.join(cmd)}: {why}")
        return False

    def _error(self, msg: str) -> None:
        """Record a failure; log it when it differs from the last (a repeat is counted)."""
        self.error_count += 1
        if not self.errors or self.errors[-1] != msg:
            log.warning("%s", msg)
        self.errors.append(msg)

    def status(self) -> dict[str, object]:
        return {"cpu": {"mode": self.cpu_mode, "hz": self.effective_cpu_hz()},
                "tx": {"mode": self.tx_mode, "power_w": self.effective_tx_power_w(),
                       "interface": self.s.interface},
                "errors": list(self.errors)[-5:], "error_count": self.error_count}
