"""CPU quota groups for emulated gateways: cgroup v2 cpu.max, or cgroup v1 CFS quota."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path

from edgetok.gateway.actuators import CPU_PERIOD_US, cfs_quota

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_CPU = CGROUP_ROOT / "cpu"
# Quota and period come from the gateway actuator's rule (edgetok.gateway.actuators.cfs_quota:
# the shortest period the kernel allows), so that a burst of a few ms runs ~1/share times
# slower, as on a slower clock (at the kernel's default of 100 ms it would run at full speed
# and a 10% quota would change nothing).

# How often the cpu.max bridge (v1 hosts) looks for a write by the gateway's actuator.
BRIDGE_POLL_S = 0.05


class CgroupError(RuntimeError):
    """No usable CPU controller, or a cgroup operation failed."""


def detect() -> str | None:
    """'v2' if the unified hierarchy has the cpu controller, 'v1' if a v1 cpu hierarchy is
    mounted, else None."""
    ctl = CGROUP_ROOT / "cgroup.controllers"
    if ctl.is_file() and "cpu" in ctl.read_text().split():
        return "v2"
    if (V1_CPU / "cpu.cfs_quota_us").is_file():
        return "v1"
    return None


class CpuGroup:
    """One cgroup that caps a process tree at a share of one core."""

    def __init__(self, name: str, bridge_dir: Path | None = None) -> None:
        """Name the cgroup in whichever hierarchy has the cpu controller."""
        self.version = detect()
        if self.version is None:
            raise CgroupError("no cgroup cpu controller (neither v2 cpu.max nor v1 cpu)")
        root = CGROUP_ROOT if self.version == "v2" else V1_CPU
        self.path = root / name
        self.share: float | None = None
        self.bridge_dir = bridge_dir
        self._bridge: threading.Thread | None = None
        self._stop = threading.Event()

    def create(self) -> CpuGroup:
        """Make the cgroup (enabling the v2 cpu controller for children if needed)."""
        if self.version == "v2":
            sub = CGROUP_ROOT / "cgroup.subtree_control"
            if "cpu" not in sub.read_text().split():
                sub.write_text("+cpu")
        self.path.mkdir(exist_ok=True)
        if self.bridge_dir is not None:
            self._start_bridge()
        return self

    @property
    def procs_file(self) -> Path:
        """The file a process joins the cgroup through."""
        return self.path / "cgroup.procs"

    def set_share(self, share: float | None) -> None:
        """Cap at `share` of one core (None: no cap)."""
        quota, period = (None, CPU_PERIOD_US) if share is None else cfs_quota(share)
        if self.version == "v2":
            (self.path / "cpu.max").write_text(f"{'max' if quota is None else quota} {period}")
        else:
            (self.path / "cpu.cfs_period_us").write_text(str(period))
            (self.path / "cpu.cfs_quota_us").write_text(str(-1 if quota is None else quota))
        self.share = share
        log.info("%s: CPU quota %s", self.path.name,
                 "none" if share is None else f"{share:.0%} of a core")

    def actuator_dir(self) -> Path:
        """The directory whose cpu.max the gateway's emulated CPU actuator writes.

        A bridge file under `bridge_dir`, mirrored into the cgroup by a thread of this
        process: `ip netns exec` hides /sys/fs/cgroup from the gateway, and a v1 host has
        no cpu.max at all (the bridge writes cpu.cfs_quota_us there)."""
        if self.bridge_dir is None:
            raise CgroupError("pass bridge_dir to get a cpu.max for the actuator")
        return self.bridge_dir

    def _start_bridge(self) -> None:
        """Create the cpu.max bridge file and the thread that mirrors it."""
        assert self.bridge_dir is not None
        self.bridge_dir.mkdir(parents=True, exist_ok=True)
        f = self.bridge_dir / "cpu.max"
        f.write_text(f"max {CPU_PERIOD_US}\n")
        self._bridge = threading.Thread(target=self._mirror, args=(f,), daemon=True,
                                        name=f"cpumax-{self.path.name}")
        self._bridge.start()

    def _mirror(self, f: Path) -> None:
        """Apply each new write to the bridge file as a CPU share."""
        seen = f.stat().st_mtime_ns
        while not self._stop.wait(BRIDGE_POLL_S):
            try:
                mtime = f.stat().st_mtime_ns
                if mtime == seen:
                    continue
                seen = mtime
                quota, period = f.read_text().split()[:2]
                share = None if quota == "max" else int(quota) / int(period)
                self.set_share(share)
            except (OSError, ValueError) as exc:  # a torn write is retried on the next poll
                log.debug("cpu.max bridge: %s", exc)

    def throttled_s(self) -> float | None:
        """Seconds the quota has stalled the group since it was made (cpu.stat: v2's
        throttled_usec, v1's throttled_time in ns); None if unreadable."""
        try:
            stat = dict(line.split()[:2] for line in
                        (self.path / "cpu.stat").read_text().splitlines() if line.strip())
            if "throttled_usec" in stat:
                return int(stat["throttled_usec"]) / 1e6
            return int(stat["throttled_time"]) / 1e9
        except (OSError, KeyError, ValueError):
            return None

    def pids(self) -> list[int]:
        """Processes in the cgroup now."""
        try:
            return [int(x) for x in self.procs_file.read_text().split()]
        except OSError:
            return []

    def remove(self) -> None:
        """Kill what is left inside, then remove the cgroup (and stop the bridge)."""
        self._stop.set()
        if not self.path.exists():
            return
        for _ in range(50):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        try:
            self.path.rmdir()
        except OSError as exc:
            log.warning("cannot remove cgroup %s: %s", self.path, exc)


def stale_groups(prefix: str) -> list[Path]:
    """cgroups whose names start with `prefix`, in whichever hierarchy is in use."""
    root = CGROUP_ROOT if detect() == "v2" else V1_CPU
    return sorted(root.glob(f"{prefix}*")) if root.is_dir() else []
