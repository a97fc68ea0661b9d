"""Actuators: modes are detected honestly, and the emulated CPU clock is a real cgroup quota."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgetok.gateway.actuators import (
    MIN_QUOTA_US,
    TBF_BURST_BYTES,
    Actuators,
    ActuatorSettings,
    cfs_quota,
    rate_bps,
)

V1_CPU = Path("/sys/fs/cgroup/cpu")
V2_ROOT = Path("/sys/fs/cgroup")


def test_without_hardware_both_actuators_report_off_and_defaults() -> None:
    a = Actuators(ActuatorSettings(cgroup=None, interface=None))
    asyncio.run(a.apply(1.0e9, 0.05))
    st = a.status()
    assert st["cpu"] == {"mode": "off", "hz": 2.0e9}  # the nominal clock, nothing was set
    assert st["tx"]["mode"] == "off" and st["tx"]["power_w"] == 0.1
    assert a.effective_tx_power_w() == 0.1


def test_a_mode_that_is_impossible_here_is_reported() -> None:
    a = Actuators(ActuatorSettings(tx_mode="real", interface="no-such-if0"))
    assert a.tx_mode == "off"
    assert any("no-such-if0" in e for e in a.status()["errors"])  # type: ignore[union-attr]


def test_shannon_rate_grows_with_power() -> None:
    s = ActuatorSettings()
    rates = [rate_bps(p, s) for p in (0.001, 0.01, 0.1)]
    assert rates == sorted(rates) and rates[0] > 0


@pytest.fixture
def cgroup() -> Iterator[Path]:
    """A fresh real CPU cgroup (v2 if the cpu controller is there, else v1)."""
    if os.geteuid() != 0:
        pytest.skip("creating a cgroup needs root")
    v2 = (V2_ROOT / "cgroup.controllers").is_file() and "cpu" in (
        V2_ROOT / "cgroup.controllers").read_text().split()
    parent = V2_ROOT if v2 else V1_CPU
    if not v2 and not (V1_CPU / "cpu.cfs_quota_us").exists():
        pytest.skip("no cgroup cpu controller here")
    path = parent / f"etk-test-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup: {exc}")
    yield path
    path.rmdir()


@pytest.mark.root
def test_emulated_clock_writes_a_proportional_cpu_quota(cgroup: Path) -> None:
    a = Actuators(ActuatorSettings(cpu_mode="emulated", cgroup=cgroup, nominal_hz=2.0e9))
    assert a.cpu_mode == "emulated"
    asyncio.run(a.apply(0.5e9, 0.0))
    if (cgroup / "cpu.max").exists():
        quota, period = (cgroup / "cpu.max").read_text().split()
    else:
        quota = (cgroup / "cpu.cfs_quota_us").read_text().strip()
        period = (cgroup / "cpu.cfs_period_us").read_text().strip()
    assert int(quota) / int(period) == pytest.approx(0.25)  # a quarter of the nominal clock
    assert int(quota) == MIN_QUOTA_US  # with the shortest period the kernel takes
    assert a.effective_cpu_hz() == 0.5e9
    # 4% of a core: under the kernel's 1 ms floor at the usual period. The write must be
    # taken (a refused one would leave the old clock in force), with a longer period.
    asyncio.run(a.apply(0.08e9, 0.0))
    assert not a.errors
    if (cgroup / "cpu.max").exists():
        quota, period = (cgroup / "cpu.max").read_text().split()
    else:
        quota = (cgroup / "cpu.cfs_quota_us").read_text().strip()
        period = (cgroup / "cpu.cfs_period_us").read_text().strip()
    assert int(quota) / int(period) == pytest.approx(0.04)
    assert a.effective_cpu_hz() == 0.08e9


@pytest.mark.parametrize("share", [1.0, 0.5, 0.1, 0.04, 0.013, 0.01, 2.0])
def test_cfs_quota_keeps_the_share_and_the_kernel_floor(share: float) -> None:
    quota, period = cfs_quota(share)
    assert quota >= MIN_QUOTA_US and period >= MIN_QUOTA_US
    assert quota / period == pytest.approx(share, rel=1e-3)
    assert quota == MIN_QUOTA_US or period == MIN_QUOTA_US  # no longer than it must be


def test_emulated_airtime_covers_what_the_token_bucket_lets_through() -> None:
    """The hold is the airtime of the first bucketful, bits / r(p): more at lower power;
    nothing before a power is set or when the radio is not emulated."""
    iface = next(p.name for p in Path("/sys/class/net").iterdir())
    s = ActuatorSettings(cpu_mode="off", tx_mode="emulated", interface=iface)
    a = Actuators(s)
    assert a.tx_mode == "emulated"
    assert a.airtime_s(1000) == 0.0  # no power decided yet
    a.tx_power_w = 0.1  # as _set_tx records it (not applied: this is the host's interface)
    fast = a.airtime_s(1000)
    assert fast == pytest.approx(8000 / rate_bps(0.1, s))
    a.tx_power_w = 0.001
    slow = a.airtime_s(1000)
    assert slow == pytest.approx(8000 / rate_bps(0.001, s)) and slow > fast
    # Beyond one bucket tbf itself paces the rest at r(p).
    big = a.airtime_s(10 * TBF_BURST_BYTES)
    assert big == pytest.approx(8 * TBF_BURST_BYTES / rate_bps(0.001, s))
    off = Actuators(ActuatorSettings(cpu_mode="off", tx_mode="off", interface=iface))
    off.tx_power_w = 0.001
    off.link_rate = lambda: 1e6
    assert off.airtime_s(1000) == 0.0  # a real link: the sensed rate holds nothing back


def test_link_airtime_holds_frames_at_the_sensed_rate() -> None:
    """A test bed that sets the tbf rate itself: the hold follows the sensed rate."""
    s = ActuatorSettings(cpu_mode="off", tx_mode="off", link_airtime=True)
    a = Actuators(s)
    assert a.airtime_s(1000) == 0.0  # no sensor wired
    rate: dict[str, float | None] = {"bps": 0.5e6}
    a.link_rate = lambda: rate["bps"]
    assert a.airtime_s(1000) == pytest.approx(8000 / 0.5e6)
    assert a.airtime_s(10 * TBF_BURST_BYTES) == pytest.approx(8 * TBF_BURST_BYTES / 0.5e6)
    rate["bps"] = None  # no fresh reading: nothing to hold for
    assert a.airtime_s(1000) == 0.0


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a veth pair and tc")
def test_emulated_power_shapes_the_uplink_with_a_fixed_bucket() -> None:
    """apply() installs tbf at r(p) on the interface, keeping bucket and limit fixed."""
    a_if, b_if = f"etkact{os.getpid() % 10000}a", f"etkact{os.getpid() % 10000}b"
    subprocess.run(["ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if],
                   check=True)
    try:
        s = ActuatorSettings(cpu_mode="off", tx_mode="emulated", interface=a_if)
        act = Actuators(s)
        for p in (0.1, 0.001):
            asyncio.run(act.apply(1e9, p))
            assert not act.errors, act.errors
            out = subprocess.run(["tc", "-j", "qdisc", "show", "dev", a_if],
                                 capture_output=True, text=True, check=True).stdout
            q = next(x for x in json.loads(out) if x["kind"] == "tbf")
            assert q["options"]["rate"] * 8 == pytest.approx(rate_bps(p, s), rel=0.02)
            assert q["options"]["burst"] == pytest.approx(TBF_BURST_BYTES, rel=0.02)
    finally:
        subprocess.run(["ip", "link", "del", a_if], check=False)
