"""The test bed builds its namespaces, link shaping and CPU quota, and always tears them down."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from testbed import Testbed, available, cleanup  # noqa: E402
from testbed.cgroup import CpuGroup  # noqa: E402
from testbed.net import BROKER_PORT, split_cpus  # noqa: E402
from testbed.run import Run, RunSpec, nominal_hz  # noqa: E402

pytestmark = pytest.mark.root

WHY = available()
needs_testbed = pytest.mark.skipif(WHY is not None, reason=f"test bed unavailable: {WHY}")


def _netns() -> set[str]:
    """Network namespaces that exist now."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _dead_pid() -> int:
    """A pid whose process has exited: a unique tag whose owner is dead."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


_beds = itertools.count()


def _tag() -> str:
    """A tag owned by this (live) process, so a parallel --cleanup leaves it alone."""
    return f"{os.getpid()}t{next(_beds)}"


@pytest.fixture
def bed() -> Iterator[Testbed]:
    """A one-gateway test bed, always torn down."""
    tb = Testbed(1, tag=_tag())
    try:
        yield tb.up()
    finally:
        tb.close()


def _until(cond: object, timeout: float = 5.0) -> bool:
    """Poll a condition until it holds or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


@needs_testbed
def test_link_is_private_shaped_and_reachable(bed: Testbed, tmp_path: Path) -> None:
    """The veth joins the namespaces, tbf shapes it, and the host sees none of it."""
    host = bed.hosts[0]
    assert {host.netns, bed.server_ns} <= _netns()
    bed.set_rate(0, 2.0)
    assert "tbf" in bed.qdisc(0) and "rate 2Mbit" in bed.qdisc(0)
    bed.start_broker(tmp_path / "broker")
    # The broker in the server namespace is reachable from the gateway's, over the veth ...
    bed.wait_tcp(host.netns, host.server_address, 1883, timeout=5)
    sent = bed.tx_bytes(0)
    assert sent > 0
    # ... while the host's own namespace has neither address nor interface of the test bed.
    host_addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    assert host.address not in host_addrs and host.server_address not in host_addrs
    bed.set_rate(0, None)
    assert "tbf" not in bed.qdisc(0)


@needs_testbed
def test_cpu_quota_caps_the_process_and_follows_the_actuator_file(bed: Testbed) -> None:
    """A process started in a gateway joins its cgroup; quota and actuator bridge apply."""
    host = bed.hosts[0]
    bed.set_cpu(0, 0.25)
    proc = bed.popen(host.netns, ["sleep", "30"], cgroup=host.cpu)
    assert _until(lambda: proc.pid in host.cpu.pids())
    assert _share(host.cpu) == pytest.approx(0.25)
    # The gateway's emulated actuator writes cpu.max (its own period); the test bed mirrors
    # the share into the cgroup.
    (host.cpu.actuator_dir() / "cpu.max").write_text("50000 100000")
    assert _until(lambda: _share(host.cpu) == pytest.approx(0.5))
    bed.stop(proc)


@needs_testbed
def test_a_busy_process_under_a_quota_is_stalled_and_the_stalls_are_counted(
        bed: Testbed) -> None:
    """The kernel's count of quota stalls, which e2e reports per lane: a busy loop at 10% of
    a core spends most of its wall time stalled; without a quota, none of it."""
    host = bed.hosts[0]
    bed.set_cpu(0, 0.1)
    before = host.cpu.throttled_s()
    assert before is not None
    proc = bed.popen(host.netns, [sys.executable, "-c", "while True: pass"], cgroup=host.cpu)
    time.sleep(1.0)
    bed.stop(proc)
    stalled = (host.cpu.throttled_s() or 0.0) - before
    assert 0.5 < stalled < 1.5
    bed.set_cpu(0, None)
    before = host.cpu.throttled_s() or 0.0
    proc = bed.popen(host.netns, [sys.executable, "-c", "while True: pass"], cgroup=host.cpu)
    time.sleep(0.5)
    bed.stop(proc)
    assert (host.cpu.throttled_s() or 0.0) - before < 0.05


@needs_testbed
def test_gateways_and_server_run_on_separate_cpus(bed: Testbed) -> None:
    """Gateway processes run on the gateway CPUs only, server-side ones on the others."""
    host = bed.hosts[0]
    gw = bed.popen(host.netns, ["sleep", "30"], cgroup=host.cpu)
    srv = bed.popen(bed.server_ns, ["sleep", "30"])
    # taskset execs `ip netns exec`, which execs sleep: wait for the final image.
    assert _until(lambda: _comm(gw.pid) == "sleep" and _comm(srv.pid) == "sleep")
    if len(os.sched_getaffinity(0)) < 2:
        assert not bed.pin  # nothing to split: both sides share the one CPU
    else:
        assert bed.pin
        assert os.sched_getaffinity(gw.pid) == set(bed.gateway_cpus)
        assert os.sched_getaffinity(srv.pid) == set(bed.server_cpus)
        assert not set(bed.gateway_cpus) & set(bed.server_cpus)
    bed.stop(gw)
    bed.stop(srv)


@needs_testbed
def test_policies_run_side_by_side_each_in_its_own_lane(tmp_path: Path,
                                                       tiny_bundle: Path) -> None:
    """Two policies in one run: each lane's gateway talks to its own broker and server, runs
    its own policy, and the driver gives the lanes' windows alternate slots of the period."""
    specs = [RunSpec(name="side", policy=pol, gateways=1, link_mbit=10.0, cpu_share=1.0,
                     deadline_ms=500.0, window_rate=2.0, windows=4, warmup=1,
                     bundle=tiny_bundle, nominal_hz=nominal_hz(tiny_bundle),
                     coordinator="server", prefer="latency")
             for pol in ("device-only", "server-only")]
    with Testbed(2, tag=_tag()) as tb:
        for k in range(2):
            tb.start_broker(tmp_path / f"broker{k}", BROKER_PORT + k)
        device, server = Run(tb, specs, tmp_path / "run", 7).execute()
    for lane, where in ((device, "device"), (server, "server")):
        results = lane.driver["results"]
        assert len(results) == 5, [r["gateway"] for r in results]
        assert {r["gateway"] for r in results} == {f"g0-r7-{lane.spec.policy}"}
        assert {r["where"] for r in results} == {where}, lane.spec.policy
        assert set(lane.exit_codes) == {f"g0-r7-{lane.spec.policy}",
                                        f"server-{lane.spec.policy}"}
    assert server.wire_bytes[0] > device.wire_bytes[0], "frames cross the server lane's link"
    # Each lane's gateway's quota stalls during the replay, read from its own cgroup.
    for lane in (device, server):
        assert len(lane.throttled_s) == 1 and lane.throttled_s[0] is not None
        assert 0.0 <= lane.throttled_s[0] < 10.0
    # Slots of 0.25 s, each publish within a quarter slot of its own: never closer than half.
    t_dev = {r["j"]: r["t_pub"] for r in device.driver["sent"]}
    gaps = [r["t_pub"] - t_dev[r["j"]] for r in server.driver["sent"]]
    assert all(0.125 - 0.02 <= g <= 0.375 + 0.02 for g in gaps), gaps
    assert len({round(g, 3) for g in gaps}) > 1, "each publish moves at random"


@needs_testbed
def test_a_hung_server_sends_windows_to_the_fallback_until_it_answers_again(
        tmp_path: Path, tiny_bundle: Path) -> None:
    """A hang stops the edge server (SIGSTOP) while its broker still takes frames: windows
    in it fall back on the device, in time, and once it resumes the server path comes
    back; the hung server still stops cleanly at the end."""
    spec = RunSpec(name="hang", policy="server-only", gateways=1, link_mbit=10.0,
                   cpu_share=1.0, deadline_ms=500.0, window_rate=2.0, windows=14, warmup=1,
                   bundle=tiny_bundle, nominal_hz=nominal_hz(tiny_bundle),
                   coordinator="server", prefer="latency", hangs=((1.5, 1.5),))
    with Testbed(1, tag=_tag()) as tb:
        tb.start_broker(tmp_path / "broker0", BROKER_PORT)
        run = Run(tb, spec, tmp_path / "run", 8)
        (data,) = run.execute()
    assert len(run.hang_log) == 1
    stopped, resumed = run.hang_log[0]
    assert resumed - stopped == pytest.approx(1.5, abs=0.2)
    sent = {r["window"]: r["t_pub"] for r in data.driver["sent"]}
    results = data.driver["results"]
    assert len(results) == 15
    hung = [r for r in results if stopped <= sent[r["window"]] <= resumed - 0.6]
    # (The gateway tries the server again with a probe 2 s after its last one timed out.)
    after = [r for r in results if sent[r["window"]] > resumed + 2.2]
    assert hung and {r["where"] for r in hung} == {"device-fallback"}
    assert all(r["latency_ms"]["total"] < 500 for r in hung)
    assert after and {r["where"] for r in after} == {"server"}
    assert data.exit_codes["server"] == 0


def test_cpus_split_into_a_server_half_and_a_gateway_half() -> None:
    """Two CPUs give one to each side; an odd count gives the gateways the larger half."""
    assert split_cpus([1, 0]) == ([0], [1])
    assert split_cpus([0, 1, 2]) == ([0], [1, 2])
    assert split_cpus([3]) == ([3], [3])


def _comm(pid: int) -> str:
    """The command name of a process."""
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _share(g: CpuGroup) -> float:
    """The cgroup's CPU quota over its period."""
    if g.version == "v2":
        quota, period = (g.path / "cpu.max").read_text().split()
        return int(quota) / int(period)
    return int((g.path / "cpu.cfs_quota_us").read_text()) / \
        int((g.path / "cpu.cfs_period_us").read_text())


@needs_testbed
def test_teardown_runs_when_the_body_fails() -> None:
    """An exception inside the test bed still removes namespaces, cgroups and processes."""
    tb = Testbed(2, tag=_tag())
    with pytest.raises(RuntimeError, match="boom"), tb:
        proc = tb.popen(tb.hosts[1].netns, ["sleep", "30"], cgroup=tb.hosts[1].cpu)
        raise RuntimeError("boom")
    assert not {h.netns for h in tb.hosts} & _netns()
    assert tb.server_ns not in _netns()
    assert not any(h.cpu.path.exists() for h in tb.hosts)
    assert proc.poll() is not None


@needs_testbed
def test_teardown_survives_a_second_sigterm() -> None:
    """SIGTERM twice in a row (a pkill of both `timeout` and the bench): all still removed."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from testbed import Testbed; "
            "tb = Testbed(1, tag=sys.argv[2]).up(); "
            # A child that ignores SIGTERM keeps the first teardown waiting on it.
            "tb.popen(tb.server_ns, ['sh', '-c', 'trap \"\" TERM; sleep 60']); "
            "print(tb.server_ns, tb.hosts[0].netns, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT / "bench"), _tag()],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    names = set(proc.stdout.readline().split())
    assert len(names) == 2 and names <= _netns()
    proc.terminate()
    time.sleep(0.5)  # inside the first teardown, still waiting on that child
    proc.terminate()
    assert proc.wait(timeout=30) != 0
    proc.stdout.close()
    assert not names & _netns()


@needs_testbed
def test_cleanup_removes_what_a_dead_owner_left() -> None:
    """--cleanup removes namespaces and cgroups of a test bed whose owner died."""
    tag = str(_dead_pid())
    tb = Testbed(1, tag=tag).up()
    tb._closed = True  # the owner "dies" without tearing down
    left = {tb.hosts[0].netns, tb.server_ns}
    assert left <= _netns()
    live = Testbed(1, tag=_tag()).up()
    try:
        removed = cleanup()
        assert live.server_ns in _netns()  # its owner (this process) is alive
    finally:
        live.close()
    assert left <= set(removed)
    assert not left & _netns()
    assert not tb.hosts[0].cpu.path.exists()
    tb.hosts[0].cpu._stop.set()


def test_unavailable_reason_is_reported_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without root the reason to skip is said plainly."""
    import testbed.net as net

    monkeypatch.setattr(net.os, "geteuid", lambda: 1000)
    assert net.available() == "needs root (network namespaces, tc, cgroups)"
