"""Emulated hosts: one `server` namespace and N `gateway` namespaces, each on its own veth link.

Gateway i lives in netns `etk-gw-<tag>-<i>` with address 10.77.<i>.1/30 on `uplink`; the
server namespace `etk-srv-<tag>` holds the other end, 10.77.<i>.2/30 on `gw<i>`, and the
broker. The uplink (gateway to server) is shaped with a `tc` tbf on the gateway's veth; the
downlink is not shaped. No propagation delay is added (netem is missing on this kernel), so
the round trip on the veth is tens of microseconds. Each gateway has a CPU-quota cgroup.

CPUs are split between the two sides, as between separate boards: gateways run on the upper
half of this process's CPUs, the server namespace on the lower half (with two cores, one
each). Left to the scheduler, a gateway's threads migrate onto the core the broker and server
are busy on: in an A/A check (one policy, six runs of 15 windows) per-run p50s spread
5.5-7.3 ms unpinned and 5.2-5.4 ms pinned.

Teardown always runs: `close()` from try/finally, an atexit hook, SIGTERM, and the
`--cleanup` command, which removes what a dead owner left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from testbed.cgroup import CgroupError, CpuGroup, stale_groups

log = logging.getLogger(__name__)

PREFIX = "etk"
SUBNET = "10.77"
GW_IF = "uplink"
STATE_DIR = Path("/run/etk-testbed")
BROKER_PORT = 1883
# tbf queue bound in bytes, the same at every rate: tbf rebuilds (and empties) its queue
# whenever the limit changes, and a bound given as `latency` changes with the rate, so each
# rate step dropped the queued frames (a 200 ms TCP retransmission each). 64 KiB holds a
# few fp32 frames: 1 s of queue at 0.5 Mbit/s, 10 ms at 50 Mbit/s.
TBF_LIMIT_BYTES = 64 * 1024
# Token bucket depth, also fixed: two full frames. tbf cuts GSO packets to the bucket size
# when they are queued, so lowering the bucket later strands a larger packet at the head
# of the queue for good (seen: a stuck link after a rate step down).
TBF_BURST_BYTES = 2 * 1514
# A tag is the owner's pid, optionally with a suffix for several test beds per process.
_TAG_RE = re.compile(r"^(\d+)(?:t\d+)?$")
_NS_RE = re.compile(rf"^{PREFIX}-(?:gw|srv)-(\d+(?:t\d+)?)(?:-\d+)?$")


class TestbedError(RuntimeError):
    """A namespace, link or process could not be set up."""


def owner_of(tag: str) -> int | None:
    """The pid that owns a test bed tag, or None if the tag is not one of ours."""
    m = _TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def _orphan(tag: str, only: str | None) -> bool:
    """Whether `--cleanup [--tag only]` should remove the test bed with this tag."""
    owner = owner_of(tag)
    if owner is None:
        return False
    return tag == only if only is not None else not _alive(owner)


def run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, raising TestbedError with its stderr on failure."""
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise TestbedError(f"{shlex.join(argv)}: {out.stderr.strip() or out.returncode}")
    return out


def split_cpus(cpus: list[int]) -> tuple[list[int], list[int]]:
    """(server CPUs, gateway CPUs): the lower and upper half; one CPU is shared by both."""
    cpus = sorted(cpus)
    if len(cpus) < 2:
        return cpus, cpus
    return cpus[:len(cpus) // 2], cpus[len(cpus) // 2:]


def available() -> str | None:
    """None if a test bed can be built here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc, cgroups)"
    for tool in ("ip", "tc"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"`{tool}` is not installed"
    probe = f"{PREFIX}-gw-{os.getpid()}-probe"
    try:
        run(["ip", "netns", "add", probe])
    except (TestbedError, OSError) as exc:
        return f"`ip netns` is unavailable: {exc}"
    finally:
        run(["ip", "netns", "del", probe], check=False)
    from testbed.cgroup import detect

    if detect() is None:
        return "no cgroup cpu controller"
    return None


@dataclass(frozen=True, slots=True)
class Host:
    """One emulated gateway host."""

    index: int
    netns: str
    address: str
    server_address: str
    cpu: CpuGroup


class Testbed:
    """Namespaces, links, CPU groups and the processes started inside them."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, gateways: int = 1, tag: str | None = None, pin: bool = True) -> None:
        """Plan a test bed; nothing is created before up(). `pin`: keep gateways and server
        on separate CPUs (needs `taskset`)."""
        if not 1 <= gateways <= 250:
            raise ValueError("1..250 gateways (one /30 per gateway under 10.77.0.0/16)")
        self.tag = tag or str(os.getpid())
        if owner_of(self.tag) is None:
            raise ValueError(f"tag {self.tag!r}: use the owner's pid, optionally + 't<n>'")
        self.n = gateways
        self.server_ns = f"{PREFIX}-srv-{self.tag}"
        self.state = STATE_DIR / self.tag
        self.hosts: list[Host] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.rates: dict[int, float | None] = {}
        self.server_cpus, self.gateway_cpus = split_cpus(list(os.sched_getaffinity(0)))
        self.pin = pin and shutil.which("taskset") is not None and \
            self.server_cpus != self.gateway_cpus
        if pin and not self.pin:
            log.warning("gateways and server share CPUs (one CPU, or no `taskset`)")
        self._closed = False

    # setup -------------------------------------------------------------------------------
    def up(self) -> Testbed:
        """Create everything; on any failure tear down what was made and re-raise."""
        atexit.register(self.close)
        with contextlib.suppress(ValueError):  # not the main thread: rely on atexit/finally
            signal.signal(signal.SIGTERM, self._on_sigterm)
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "owner.json").write_text(json.dumps(
            {"pid": os.getpid(), "gateways": self.n, "started": time.time()}))
        try:
            run(["ip", "netns", "add", self.server_ns])
            run(["ip", "-n", self.server_ns, "link", "set", "lo", "up"])
            for i in range(self.n):
                self.hosts.append(self._add_gateway(i))
        except BaseException:
            self.close()
            raise
        log.info("test bed %s up: %d gateway namespace(s), server %s", self.tag, self.n,
                 self.server_ns)
        return self

    def _add_gateway(self, i: int) -> Host:
        """Namespace, veth pair, addresses and CPU group of gateway i."""
        ns = f"{PREFIX}-gw-{self.tag}-{i}"
        gw_addr, srv_addr = f"{SUBNET}.{i}.1", f"{SUBNET}.{i}.2"
        run(["ip", "netns", "add", ns])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        # Created directly inside the namespaces: no interface ever appears in the host's.
        run(["ip", "link", "add", GW_IF, "netns", ns, "type", "veth", "peer", "name",
             f"gw{i}", "netns", self.server_ns])
        run(["ip", "-n", ns, "addr", "add", f"{gw_addr}/30", "dev", GW_IF])
        run(["ip", "-n", self.server_ns, "addr", "add", f"{srv_addr}/30", "dev", f"gw{i}"])
        run(["ip", "-n", ns, "link", "set", GW_IF, "up"])
        run(["ip", "-n", self.server_ns, "link", "set", f"gw{i}", "up"])
        cpu = CpuGroup(f"{PREFIX}-{self.tag}-gw{i}", bridge_dir=self.state / f"cpu-gw{i}")
        cpu.create()
        return Host(i, ns, gw_addr, srv_addr, cpu)

    # shaping -----------------------------------------------------------------------------
    def set_rate(self, i: int, mbit: float | None) -> None:
        """Shape gateway i's uplink to `mbit` Mbit/s with tbf (None: unshaped)."""
        ns = self.hosts[i].netns
        if mbit is None:
            run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", GW_IF, "root"],
                check=False)
        else:
            bps = mbit * 1e6
            run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", GW_IF, "root",
                 "tbf", "rate", f"{int(bps)}bit", "burst", str(TBF_BURST_BYTES), "limit",
                 str(TBF_LIMIT_BYTES)])
        self.rates[i] = mbit

    def set_cpu(self, i: int, share: float | None) -> None:
        """Cap gateway i at `share` of one core (None: no cap)."""
        self.hosts[i].cpu.set_share(share)

    def qdisc(self, i: int) -> str:
        """The queueing discipline on gateway i's uplink, as tc shows it."""
        return run(["ip", "netns", "exec", self.hosts[i].netns, "tc", "qdisc", "show", "dev",
                    GW_IF]).stdout.strip()

    def tx_bytes(self, i: int) -> int:
        """Bytes gateway i has put on its uplink interface (every protocol layer included)."""
        out = run(["ip", "netns", "exec", self.hosts[i].netns, "cat",
                   f"/sys/class/net/{GW_IF}/statistics/tx_bytes"]).stdout
        return int(out.strip())

    # processes ---------------------------------------------------------------------------
    def popen(self, netns: str, argv: list[str], log_path: Path | None = None,
              env: dict[str, str] | None = None, cgroup: CpuGroup | None = None,
              stdout: int | IO[bytes] | None = None) -> subprocess.Popen[bytes]:
        """Start argv inside a namespace (and, before exec, inside a cgroup), on that
        side's CPUs; tracked."""
        cmd = ["ip", "netns", "exec", netns]
        if self.pin:
            cpus = self.server_cpus if netns == self.server_ns else self.gateway_cpus
            cmd = ["taskset", "-c", ",".join(map(str, cpus)), *cmd]
        if cgroup is not None:
            # The shell joins the cgroup and then execs: every thread starts capped. It must
            # come before `ip netns exec`, which mounts a fresh /sys without the cgroups.
            cmd = ["sh", "-c", f'echo $$ > {shlex.quote(str(cgroup.procs_file))} && '
                   'exec "$@"', "sh", *cmd]
        out: int | IO[bytes] | None = stdout
        if log_path is not None:
            out = log_path.open("ab")
        try:
            proc = subprocess.Popen(cmd + argv, stdout=out,
                                    stderr=subprocess.STDOUT if log_path else None,
                                    env={**os.environ, **(env or {})})
        finally:
            if log_path is not None and hasattr(out, "close"):
                out.close()  # type: ignore[union-attr]
        self.procs.append(proc)
        return proc

    def start_broker(self, workdir: Path, port: int = BROKER_PORT) -> subprocess.Popen[bytes]:
        """mosquitto in the server namespace, on every address of that namespace only."""
        from edgetok.procs import mosquitto_path

        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {port}\nallow_anonymous true\npersistence false\n"
            # As in edgetok.procs: the default 1000 would drop QoS 1 for a slow subscriber.
            "max_queued_messages 100000\nmax_inflight_messages 0\n"
            # Without it Nagle plus delayed ACKs add ~40 ms to every small frame.
            "set_tcp_nodelay true\n")
        proc = self.popen(self.server_ns, [mosquitto_path(), "-c", str(conf)],
                          log_path=workdir / "mosquitto.log")
        self.wait_tcp(self.server_ns, "127.0.0.1", port, proc)
        return proc

    def wait_tcp(self, netns: str, host: str, port: int,
                 proc: subprocess.Popen[bytes] | None = None, timeout: float = 15) -> None:
        """Block until host:port accepts connections as seen from inside `netns`."""
        probe = ("import socket,sys,time\nd=time.monotonic()+float(sys.argv[3])\n"
                 "while time.monotonic()<d:\n"
                 " try:\n  socket.create_connection((sys.argv[1],int(sys.argv[2])),0.2)"
                 ".close();sys.exit(0)\n except OSError: time.sleep(0.05)\nsys.exit(1)")
        import sys

        code = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", probe,
                               host, str(port), str(timeout)], timeout=timeout + 10).returncode
        if code != 0:
            alive = proc is None or proc.poll() is None
            raise TestbedError(f"{host}:{port} not reachable from {netns} "
                               f"({'running' if alive else 'process exited'})")

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 20) -> int | None:
        """SIGCONT (a hung one must see the SIGTERM), SIGTERM, wait, SIGKILL; forget it."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)
        return proc.returncode

    # teardown ----------------------------------------------------------------------------
    def _on_sigterm(self, signum: int, frame: object) -> None:
        """Tear down on SIGTERM, then exit."""
        # A second SIGTERM (`timeout` forwards one, a pkill adds another) must not cut the
        # teardown short: close() would return at once as already begun, and exit.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.close()
        raise SystemExit(128 + signum)

    def close(self) -> None:
        """Stop every process, delete the namespaces and cgroups. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for proc in list(self.procs):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=5)
        for h in self.hosts:
            h.cpu.remove()
        names = [h.netns for h in self.hosts] + [self.server_ns]
        for i in range(len(self.hosts), self.n):  # a host that failed half-way
            names.append(f"{PREFIX}-gw-{self.tag}-{i}")
        for ns in names:
            _kill_netns(ns)
        for g in stale_groups(f"{PREFIX}-{self.tag}-"):
            CpuGroup(g.name).remove()
        with contextlib.suppress(OSError):
            for f in sorted(self.state.rglob("*"), reverse=True):
                f.unlink() if f.is_file() else f.rmdir()
            self.state.rmdir()
        log.info("test bed %s torn down", self.tag)

    def __enter__(self) -> Testbed:
        """Bring the test bed up."""
        return self.up()

    def __exit__(self, *exc: object) -> None:
        """Tear the test bed down, whatever happened inside."""
        self.close()


def _kill_netns(ns: str) -> None:
    """Kill whatever runs in a namespace, then delete it (its veths go with it)."""
    listed = run(["ip", "netns", "list"], check=False).stdout
    if not any(line.split()[0] == ns for line in listed.splitlines() if line.strip()):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), sig)
        if pids and sig == signal.SIGTERM:
            time.sleep(1.0)
    run(["ip", "netns", "del", ns], check=False)


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup(tag: str | None = None) -> list[str]:
    """Remove test beds whose owner is dead (or the one with `tag`); the namespaces removed."""
    removed: list[str] = []
    listed = run(["ip", "netns", "list"], check=False).stdout.splitlines()
    for line in listed:
        if not line.strip():
            continue
        ns = line.split()[0]
        m = _NS_RE.match(ns)
        if m is None or not _orphan(m.group(1), tag):
            continue
        _kill_netns(ns)
        removed.append(ns)
    try:
        groups = stale_groups(f"{PREFIX}-")
    except CgroupError:
        groups = []
    for g in groups:
        if _orphan(g.name.split("-")[1], tag):
            CpuGroup(g.name).remove()
            removed.append(str(g))
    if STATE_DIR.is_dir():
        for d in STATE_DIR.iterdir():
            if _orphan(d.name, tag):
                for f in sorted(d.rglob("*"), reverse=True):
                    f.unlink() if f.is_file() else f.rmdir()
                d.rmdir()
    return removed
