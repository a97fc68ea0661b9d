"""The real units under a real systemd manager: readiness, watchdog restarts, the sandbox.

PID 1 here is not systemd, so `systemd-run --user` has no manager to talk to. These tests start
one: `systemd --user` as root, in a private mount namespace where /run/systemd/system exists
(the manager's "booted with systemd" check). It runs the repository's unit files with
DynamicUser=, the full sandbox and seccomp filter; a test drop-in swaps ExecStart= for a probe
that does what the daemon does at start (load an ONNX model, connect to the broker, then
READY=1, then health-driven WATCHDOG=1 via edgetok.sdnotify) and reports what the sandbox
allowed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Broker

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = Path("/usr/lib/systemd/systemd")
# What the unit runs instead of the daemon (a file of its own, so it is linted like the rest).
PROBE = Path(__file__).with_name("test_systemd_probe.py")
UNIT = "edgetok-gateway.service"
# Where the test directory (probe, model, control files) appears inside the sandbox.
INNER = "/opt/edgetok-test"
# Upper bound for any one wait below; a healthy run needs a small fraction of it.
WAIT_S = 60.0
# The private manager's runtime directory goes here (a tmpfs the services can see).
RUNTIME_PARENT = "/run"
# Short watchdog so a stall is caught quickly in the test; production uses 30 s.
TEST_WATCHDOG_S = 2

pytestmark = [pytest.mark.slow, pytest.mark.root]

BOOT = r"""
set -e
# Private to this mount namespace: the host's /run/systemd is untouched.
mount -t tmpfs -o mode=0755 tmpfs /run/systemd
mkdir /run/systemd/system /run/systemd/inaccessible
cd /run/systemd/inaccessible
# The nodes systemd mounts over paths a sandbox must not reach (normally made by PID 1).
mkdir -m 0000 dir
install -m 0000 /dev/null reg
mkfifo -m 0000 fifo
mknod -m 0000 chr c 0 0
mknod -m 0000 blk b 0 0
"$PYTHON" -c 'import socket; socket.socket(socket.AF_UNIX).bind("sock")'
chmod 0000 sock
exec "$SYSTEMD" --user
"""


def _write_model(path: Path) -> None:
    """A tiny real ONNX model (MatMul + Relu) for the probe to run."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.linspace(-1, 1, 16 * 8, dtype=np.float32).reshape(16, 8), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@dataclass
class Manager:
    """A private `systemd --user` and the environment that reaches it."""

    proc: subprocess.Popen[bytes]
    runtime: Path
    env: dict[str, str]

    @property
    def notify_socket(self) -> Path:
        """The socket this manager names in $NOTIFY_SOCKET."""
        return self.runtime / "systemd" / "notify"

    @property
    def unit_dir(self) -> Path:
        """Where this manager looks for units (its runtime configuration)."""
        return self.runtime / "systemd" / "user"

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `systemctl --user` against this manager; with `check`, failures carry stderr."""
        proc = subprocess.run(
            ["systemctl", "--user", *args],
            env=self.env,
            text=True,
            capture_output=True,
            timeout=WAIT_S,
        )
        if check and proc.returncode != 0:
            status = subprocess.run(
                ["systemctl", "--user", "status", "--no-pager", "--full", UNIT],
                env=self.env,
                text=True,
                capture_output=True,
                timeout=WAIT_S,
            ).stdout
            raise AssertionError(
                f"systemctl --user {' '.join(args)}: rc={proc.returncode}\n{proc.stderr}\n{status}"
            )
        return proc

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """Properties of a unit, as systemctl show prints them."""
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _why_no_manager() -> str | None:
    """The reason a private systemd manager cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root: a private mount namespace and a manager that can apply DynamicUser="
    for tool in ("unshare", "mount", "systemctl", "mknod"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not SYSTEMD.exists():
        return f"{SYSTEMD} is not installed"
    return None


@pytest.fixture(scope="module")
def manager() -> Iterator[Manager]:
    """A `systemd --user` of our own, stopped (and its units with it) after the module."""
    reason = _why_no_manager()
    if reason:
        pytest.skip(reason)
    # Not under /tmp: the unit's PrivateTmp= would hide the manager's notify socket from the
    # service. World-traversable, because the dynamic service user must reach that socket.
    runtime = Path(tempfile.mkdtemp(prefix="etk-sd-", dir=RUNTIME_PARENT))
    runtime.chmod(0o711)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DBUS_", "XDG_"))}
    env.update(
        XDG_RUNTIME_DIR=str(runtime),
        XDG_STATE_HOME=str(runtime / "state"),
        XDG_CONFIG_HOME=str(runtime / "config"),
        XDG_CACHE_HOME=str(runtime / "cache"),
        PYTHON=sys.executable,
        SYSTEMD=str(SYSTEMD),
    )
    (runtime / "boot.sh").write_text(BOOT)
    log = (runtime / "manager.log").open("wb")
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "slave", "sh", str(runtime / "boot.sh")],
        env=env,
        stdout=log,
        stderr=log,
    )
    mgr = Manager(proc, runtime, env)
    deadline = time.monotonic() + WAIT_S
    # show-environment answers only once the manager serves its private socket.
    while mgr.systemctl("show-environment", check=False).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            log.close()
            why = (runtime / "manager.log").read_text(errors="replace")[-500:]
            shutil.rmtree(runtime, ignore_errors=True)
            pytest.skip(f"a private systemd --user manager did not come up: {why}")
        time.sleep(0.1)
    # PID 1's notify socket is world-writable, so services under any User= can send READY=1;
    # a user manager's is not (its services normally share its UID). Match PID 1.
    mgr.notify_socket.chmod(0o777)
    mgr.unit_dir.mkdir(parents=True, exist_ok=True)
    yield mgr
    proc.terminate()
    try:
        proc.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()
    shutil.rmtree(runtime, ignore_errors=True)


def _home_overrides() -> list[str]:
    """Sandbox lines that let the service run this interpreter if it lives under a home.

    ProtectHome=yes (the unit's setting) hides /root and /home; a pyenv interpreter or a
    checkout there would be unreachable. The installed service runs from /opt/edgetok, so this
    loosening exists only for the test, and only when needed.
    """
    homes = ("/root/", "/home/")
    paths = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, ROOT)} | {
        os.path.abspath(p) for p in (sys.prefix, ROOT)}
    inside = sorted(p for p in paths if p.startswith(homes))
    lines = ["ProtectHome=tmpfs", *(f"BindReadOnlyPaths={p}" for p in inside)] if inside else []
    # A checkout under /tmp (a CI clone) would vanish behind the private /tmp that
    # DynamicUser= implies (and that cannot be turned off): bind it back in, read-only.
    lines += [f"BindReadOnlyPaths={p}" for p in sorted(paths)
              if p.startswith(("/tmp/", "/var/tmp/"))]
    return lines


@dataclass
class Installed:
    """A unit installed in the private manager, with its probe's directory and output."""

    mgr: Manager
    workdir: Path

    def events(self) -> list[dict[str, Any]]:
        """What the probe printed so far, one dict per event (every run appends)."""
        log = self.workdir / "probe.log"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]

    def output(self) -> str:
        """The probe's raw stdout and stderr, for failure messages."""
        log = self.workdir / "probe.log"
        return log.read_text(errors="replace")[-3000:] if log.exists() else "(no output)"

    def wait(self, what: str, predicate: Callable[[], bool]) -> None:
        """Poll until `predicate` holds; fail with the probe's output after WAIT_S."""
        deadline = time.monotonic() + WAIT_S
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; probe output:\n{self.output()}")
            time.sleep(0.1)


@pytest.fixture
def install(manager: Manager) -> Iterator[Callable[..., Installed]]:
    """Install the repository's gateway unit (plus drop-ins) with ExecStart= set to the probe."""
    made: list[Path] = []

    def _install(args: str, extra: Sequence[str] = (), actuators: bool = False) -> Installed:
        workdir = Path(tempfile.mkdtemp(prefix="etk-probe-"))
        workdir.chmod(0o755)
        made.append(workdir)
        shutil.copy(PROBE, workdir / "probe.py")
        _write_model(workdir / "m.onnx")
        for f in workdir.iterdir():
            f.chmod(0o644)
        shutil.copy(ROOT / "systemd" / UNIT, manager.unit_dir / UNIT)
        dropins = manager.unit_dir / f"{UNIT}.d"
        shutil.rmtree(dropins, ignore_errors=True)
        dropins.mkdir()
        if actuators:
            shutil.copy(ROOT / "systemd" / f"{UNIT}.d" / "actuators.conf", dropins)
        lines = [
            "[Service]",
            "ExecStart=",
            f"ExecStart={sys.executable} {INNER}/probe.py {args}",
            f"BindReadOnlyPaths={workdir}:{INNER}",
            # The sandbox may get a fresh /run (where /run is not a mount point, as in a
            # container); keep the manager's notify socket reachable at its advertised path.
            f"BindReadOnlyPaths={manager.notify_socket}",
            f"StandardOutput=append:{workdir}/probe.log",
            f"StandardError=append:{workdir}/probe.log",
            *_home_overrides(),
            *extra,
        ]
        (dropins / "zz-test.conf").write_text("\n".join(lines) + "\n")
        manager.systemctl("daemon-reload")
        return Installed(manager, workdir)

    yield _install
    manager.systemctl("stop", UNIT, check=False)
    manager.systemctl("reset-failed", UNIT, check=False)
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


def test_ready_only_after_broker_connects(
    install: Callable[..., Installed], mosquitto: Broker
) -> None:
    """With the broker down the unit stays 'activating'; READY=1 follows the broker's start."""
    mosquitto.stop()
    unit = install(f"serve {mosquitto.port}")
    unit.mgr.systemctl("start", "--no-block", UNIT)
    # The probe is up, has loaded its model and keeps failing to reach the broker.
    unit.wait(
        "the probe to try the broker",
        lambda: any(e["event"] == "connecting" for e in unit.events()),
    )
    time.sleep(1.0)  # several reconnect attempts, all refused
    assert unit.mgr.show(UNIT, "ActiveState")["ActiveState"] == "activating"
    assert not any(e["event"] == "ready_sent" for e in unit.events())

    broker_up = time.monotonic()
    mosquitto.start()
    unit.wait(
        "the unit to become active",
        lambda: unit.mgr.show(UNIT, "ActiveState")["ActiveState"] == "active",
    )
    props = unit.mgr.show(UNIT, "ActiveEnterTimestampMonotonic", "StatusText", "MainPID")
    events = {e["event"]: e for e in unit.events()}
    active_at = int(props["ActiveEnterTimestampMonotonic"]) / 1e6
    # Same clock (CLOCK_MONOTONIC) on both sides: the order is what matters, not the gaps.
    # "ready_sent" is printed after notify() returns, so systemd may already have acted on it;
    # what must hold is broker up -> connected -> active, and connected before READY.
    assert broker_up <= events["mqtt_connected"]["t"] <= active_at
    assert events["mqtt_connected"]["t"] <= events["ready_sent"]["t"]
    assert props["StatusText"] == "probe: broker connected, model loaded"
    assert int(props["MainPID"]) == events["start"]["pid"]

    unit.mgr.systemctl("stop", UNIT)
    assert any(e["event"] == "stopping" for e in unit.events())
    assert unit.mgr.show(UNIT, "Result")["Result"] == "success"


def test_sandbox_runs_onnxruntime_and_confines_the_daemon(
    install: Callable[..., Installed], mosquitto: Broker
) -> None:
    """The unit's hardening (DynamicUser, seccomp, MDWE, read-only OS) leaves ORT working."""
    unit = install(f"serve {mosquitto.port}")
    unit.mgr.systemctl("start", UNIT)  # returns once READY=1 arrived
    facts = next(e for e in unit.events() if e["event"] == "start")
    assert facts["uid"] != 0  # DynamicUser=
    assert facts["ort_output"] == [2, 8]
    assert facts["ort_sum"] > 0
    assert facts["write_state"] == "ok"  # StateDirectory=
    assert facts["write_etc"] == "EROFS" and facts["write_usr"] == "EROFS"  # ProtectSystem=strict
    assert facts["netlink"] == "EAFNOSUPPORT"  # RestrictAddressFamilies=
    assert facts["wx_memory"] == "EPERM"  # MemoryDenyWriteExecute=
    assert facts["watchdog_s"] == pytest.approx(30.0)  # the unit's WatchdogSec=
    # Environment=ORT_DISABLE_TELEMETRY=1: ORT did not even try to persist a telemetry device id.
    assert "telemetry" not in unit.output().lower()
    # The credential files do not exist on this host: the SetCredential= fallback kept the
    # start from failing, and the daemon still gets a credentials directory.
    assert facts["credentials"]
    assert unit.mgr.show(UNIT, "ActiveState")["ActiveState"] == "active"


def test_stalled_pipeline_is_killed_by_the_watchdog_and_restarted(
    install: Callable[..., Installed], mosquitto: Broker
) -> None:
    """Healthy pings keep the unit alive; a stall stops them and systemd restarts the unit."""
    unit = install(f"serve {mosquitto.port}", [f"WatchdogSec={TEST_WATCHDOG_S}", "RestartSec=1"])
    unit.mgr.systemctl("start", UNIT)
    first_pid = int(unit.mgr.show(UNIT, "MainPID")["MainPID"])
    # Healthy for three watchdog periods: only the probe's pings can keep it running that long.
    time.sleep(3 * TEST_WATCHDOG_S)
    props = unit.mgr.show(UNIT, "NRestarts", "MainPID", "ActiveState")
    assert props == {"NRestarts": "0", "MainPID": str(first_pid), "ActiveState": "active"}

    (unit.workdir / "stall").write_text("")
    unit.wait("a watchdog restart", lambda: int(unit.mgr.show(UNIT, "NRestarts")["NRestarts"]) >= 1)
    (unit.workdir / "stall").unlink()
    unit.wait(
        "the restarted unit to be ready",
        lambda: unit.mgr.show(UNIT, "ActiveState")["ActiveState"] == "active",
    )
    starts = [e["pid"] for e in unit.events() if e["event"] == "start"]
    assert starts[0] == first_pid and len(starts) >= 2 and starts[-1] != first_pid
    # The stalled instance never reached its shutdown path: it was killed, not stopped.
    assert not any(e["event"] == "stopping" and e["pid"] == first_pid for e in unit.events())


@pytest.fixture
def netns() -> Iterator[str]:
    """A throwaway network namespace, so tc changes nothing the rest of the suite uses."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("iproute2 (ip, tc) is not installed")
    name = f"etk-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def _qdisc(netns: str) -> str:
    """The root qdisc of lo inside `netns`."""
    return subprocess.run(
        ["ip", "netns", "exec", netns, "tc", "qdisc", "show", "dev", "lo"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@pytest.mark.parametrize("actuators", [False, True], ids=["base-unit", "with-actuators"])
def test_actuators_dropin_is_what_lets_tc_shape_the_link(
    install: Callable[..., Installed], netns: str, actuators: bool
) -> None:
    """Without the drop-in tc is refused; with it the unprivileged service user can shape."""
    # PrivateUsers=no in both cases: from inside a user namespace the service could not join a
    # network namespace owned by the host's. What then refuses tc in the base unit is its empty
    # CapabilityBoundingSet= and the lack of AF_NETLINK in RestrictAddressFamilies=.
    netns_lines = [f"NetworkNamespacePath=/run/netns/{netns}", "PrivateUsers=no"]
    unit = install("tc", netns_lines, actuators=actuators)
    unit.mgr.systemctl("start", UNIT)
    unit.wait("the tc attempt", lambda: any(e["event"] == "tc" for e in unit.events()))
    result = next(e for e in unit.events() if e["event"] == "tc")
    assert result["uid"] != 0
    if actuators:
        assert result["rc"] == 0, result["stderr"]
        assert "tbf" in _qdisc(netns)
    else:
        assert result["rc"] != 0
        assert "tbf" not in _qdisc(netns)
