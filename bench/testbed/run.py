"""One measured run in the test bed: server, coordinator and N gateways, replayed and collected."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgetok.procs import to_toml
from testbed import profile
from testbed.net import BROKER_PORT, GW_IF, Testbed, TestbedError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
SERVER_HTTP = 8090
GATEWAY_HTTP = 8080
# The emulated radio: a 20 MHz Wi-Fi channel, 10 dB noise figure, 20 dBm cap (as in
# configs/scenarios/wifi.toml and bench/coordinator.py).
BANDWIDTH_HZ = 20e6
NOISE_W_PER_HZ = 3.98e-20
P_MAX_W = 0.1
# κ for a Cortex-A72-class core (about 0.7 W at 1.5 GHz), as in the scenario files.
KAPPA = 2.0e-28
# The governor's lowest clock as a fraction of the highest (a Pi 4: 0.6 of 1.5 GHz).
F_MIN_FRAC = 0.4
# Telemetry period of the gateways: shorter lets the coordinator follow a link drop sooner
# at the price of more control traffic on the uplink (one ~400-byte JSON per period).
TELEMETRY_S = 1.0
# Precision of the server-only baseline when no coordinator runs (raw tokens, as fp16).
STATIC_SERVER_PRECISION = "fp16"


def gain_for(rate_bps: float) -> float:
    """Channel gain g at which the emulated radio gets `rate_bps` at full power."""
    return (2 ** (rate_bps / BANDWIDTH_HZ) - 1) * NOISE_W_PER_HZ * BANDWIDTH_HZ / P_MAX_W


def rate_for(p_w: float, full_rate_bps: float) -> float:
    """Shannon rate r(p) = B·log2(1 + p·g/(N0·B)) on a channel that gives `full_rate_bps`
    at full power: what the gateway's emulated transmit-power actuator sets with tc."""
    g = gain_for(full_rate_bps)
    return BANDWIDTH_HZ * math.log2(1 + p_w * g / (NOISE_W_PER_HZ * BANDWIDTH_HZ))


@dataclass(frozen=True, slots=True)
class RunSpec:
    """What one run measures: a policy under link, CPU and load conditions."""

    name: str
    policy: str
    gateways: int
    link_mbit: float
    cpu_share: float
    deadline_ms: float
    window_rate: float
    windows: int
    warmup: int
    bundle: Path
    nominal_hz: float
    coordinator: str  # "server" (edgetok server runs it), "shim" (testbed.coord) or "static"
    actuators: bool = True
    trace: tuple[tuple[float, float], ...] = ()  # (seconds after replay start, Mbit/s)
    # (seconds after replay start, seconds): the edge servers hang (SIGSTOP) that long.
    hangs: tuple[tuple[float, float], ...] = ()
    prefer: str = "energy"  # the coordinator's preference after accuracy: energy or latency
    server_probe_s: float | None = None  # gateways' server_probe_interval_s; None: default

    @property
    def f_max_hz(self) -> float:
        """The emulated device's top clock: its CPU share times one core's clock."""
        return self.cpu_share * self.nominal_hz


@dataclass
class RunData:
    """Raw observations of a run, for the metrics."""

    spec: RunSpec
    driver: dict[str, Any]
    wire_bytes: list[int]
    rate_log: list[tuple[float, float]] = field(default_factory=list)
    logs: Path | None = None
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    profiles: list[Path] = field(default_factory=list)  # py-spy raw files, one a gateway
    # Seconds each gateway's CPU quota stalled it during the replay (None: unreadable): the
    # emulated clock stalls a window that finds its quota spent, so a lane stalled more
    # than another is slower for reasons no decision has a say in.
    throttled_s: list[float | None] = field(default_factory=list)


def merged(parts: list[RunData]) -> RunData:
    """Runs of one policy and scenario (rounds of one measurement) as one, in time order."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    driver: dict[str, Any] = {"started": first.driver["started"],
                              "round_starts": [p.driver["started"] for p in parts]}
    for key in ("sent", "results", "frames", "telemetry"):
        driver[key] = [x for p in parts for x in p.driver.get(key, [])]
    # Each round's driver also sees the decisions retained from the rounds before it.
    seen = {(d.get("gateway"), d.get("epoch"), d.get("seq")): d
            for p in parts for d in p.driver["decisions"]}
    driver["decisions"] = list(seen.values())
    windows = sum(p.spec.windows for p in parts)
    return RunData(spec=replace(first.spec, windows=windows), driver=driver,
                   wire_bytes=[b for p in parts for b in p.wire_bytes],
                   rate_log=sorted(x for p in parts for x in p.rate_log),
                   exit_codes={k: v for p in parts for k, v in p.exit_codes.items()},
                   profiles=[x for p in parts for x in p.profiles],
                   throttled_s=[x for p in parts for x in p.throttled_s])


def controller_config(spec: RunSpec) -> dict[str, Any]:
    """The coordinator's settings for this run (edgetok's ControllerConfig)."""
    first = spec.trace[0][1] if spec.trace else spec.link_mbit
    return {
        "policy": spec.policy, "objective": "accuracy", "prefer": spec.prefer,
        "link": {"bandwidth_hz": BANDWIDTH_HZ, "gain": gain_for(first * 1e6),
                 "noise_w_per_hz": NOISE_W_PER_HZ, "p_max_w": P_MAX_W},
        "device": {"f_min_hz": F_MIN_FRAC * spec.f_max_hz, "f_max_hz": spec.f_max_hz,
                   "kappa": KAPPA},
        "server": {"slowdown": 1.0, "queue_ms": 1.0},
        "budget": {"deadline_ms": spec.deadline_ms},
        "server_workers": 2,
    }


def gateway_config(spec: RunSpec, tb: Testbed, i: int, gw_id: str, state: Path,
                   broker_port: int = BROKER_PORT) -> dict[str, Any]:
    """A gateway config for host i of the test bed."""
    host = tb.hosts[i]
    variant, precision = static_variant(spec)
    act: dict[str, Any] = {"cpu_mode": "off", "tx_mode": "off"}
    if spec.actuators and spec.coordinator != "static":
        act = {"cpu_mode": "emulated", "cgroup": str(host.cpu.actuator_dir()),
               "nominal_hz": spec.nominal_hz,
               # A trace is the channel changing under the radio: the test bed owns the rate,
               # and the gateway holds frames for their airtime at the rate it senses.
               "tx_mode": "off" if spec.trace else "emulated", "interface": GW_IF,
               "link_airtime": bool(spec.trace),
               "bandwidth_hz": BANDWIDTH_HZ, "gain": gain_for(spec.link_mbit * 1e6),
               "noise_w_per_hz": NOISE_W_PER_HZ}
    return {
        "id": gw_id, "state_dir": str(state),
        "mqtt": {"host": host.server_address, "port": broker_port,
                 "client_id": f"edgetok-{gw_id}", "session_expiry_s": 60,
                 "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "bundle": {"path": str(spec.bundle), "threads": 1},
        "decision": {"variant": variant, "precision": precision,
                     "follow_coordinator": spec.coordinator != "static"},
        "http": {"host": "127.0.0.1", "port": GATEWAY_HTTP},
        "actuators": act,
        "telemetry_interval_s": TELEMETRY_S,
        **({} if spec.server_probe_s is None else {"server_probe_interval_s": spec.server_probe_s}),
        "streams": [{"name": "imu", "topics": [f"sensors/{gw_id}/imu"],
                     "channels": ["acc_x", "acc_y", "acc_z", "gyr_x", "gyr_y", "gyr_z"],
                     "rate_hz": 10.0, "window": 100, "deadline_ms": spec.deadline_ms,
                     "lateness_ms": 0.0, "idle_close_s": 2.0}],
    }


def static_variant(spec: RunSpec) -> tuple[str, str]:
    """The gateway's initial (variant, precision); with no coordinator, the policy itself:
    split = L, split = 0, or the split fixed-split picks from the profile at the nominal
    link. `joint` starts on-device until its first decision."""
    from edgetok.models.bundle import read_manifest

    m = read_manifest(spec.bundle)
    if spec.policy == "server-only":
        return "r0.00-s0", STATIC_SERVER_PRECISION
    if spec.policy == "fixed-split":
        from edgetok.agent.coordinator.online import ControllerConfig, OnlineController

        ctl = OnlineController(ControllerConfig.model_validate(controller_config(spec)), m)
        best = int(ctl.policy.allowed.nonzero()[0][0])
        o = ctl.table.options[best]
        return o.variant, o.precision
    return f"r0.00-s{m.num_layers}", "fp32"


def server_config(spec: RunSpec, broker_port: int = BROKER_PORT,
                  http_port: int = SERVER_HTTP) -> dict[str, Any]:
    """The edge server's config; carries the coordinator when the server runs it."""
    cfg: dict[str, Any] = {
        "id": "srv", "bundles": [str(spec.bundle)], "workers": 2, "threads": 1,
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "session_expiry_s": 0,
                 "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "http": {"host": "127.0.0.1", "port": http_port}}
    if spec.coordinator == "server":
        cfg["coordinator"] = controller_config(spec)
    return cfg


def _python(module: str, *args: str) -> list[str]:
    """argv for `python -m module args...` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def _env() -> dict[str, str]:
    """Environment for helper modules run from bench/."""
    path = [str(BENCH), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True, slots=True)
class Lane:
    """One policy's share of a run: its own broker, server and gateways."""

    spec: RunSpec
    ids: list[str]  # gateway ids
    hosts: list[int]  # the test bed's gateway hosts they run on
    broker_port: int
    http_port: int  # the server's
    suffix: str  # of its log and config files: "" when a run has one lane


def lane_data(data: dict[str, Any], ids: list[str]) -> dict[str, Any]:
    """The driver's record restricted to the gateways of one lane."""
    keep = set(ids)
    out = dict(data)
    for key in ("sent", "results", "frames", "decisions", "telemetry"):
        out[key] = [x for x in data.get(key, []) if x.get("gateway") in keep]
    return out


class Run:
    """Starts the processes of one run, replays, and always stops what it started.

    A run has one lane per spec: policies measured side by side, at the same time, under the
    same link trace and on the same machine, each with its own broker (BROKER_PORT + lane),
    server and gateways. One driver staggers all the gateways' windows over the period.
    With `profile_rate` (Hz), py-spy samples every gateway from the replay's start to the
    driver's exit, into profile-<gateway id>.txt in the run's directory.
    """

    def __init__(self, tb: Testbed, specs: RunSpec | list[RunSpec], workdir: Path,
                 run_id: int, profile_rate: int = 0) -> None:
        """Gateway ids unique to the run (retained decisions never leak across runs)."""
        specs = [specs] if isinstance(specs, RunSpec) else specs
        self.tb, self.spec, self.dir = tb, specs[0], workdir
        self.profile_rate = profile_rate
        n = self.spec.gateways
        if any((x.gateways, x.link_mbit, x.cpu_share, x.trace, x.hangs) != (
                n, self.spec.link_mbit, self.spec.cpu_share, self.spec.trace, self.spec.hangs)
               for x in specs):
            raise ValueError("side-by-side lanes must share one scenario")
        if len(specs) * n > len(tb.hosts):
            raise TestbedError(f"{len(specs)} lane(s) of {n} gateway(s) need "
                               f"{len(specs) * n} hosts; the test bed has {len(tb.hosts)}")
        one = len(specs) == 1
        self.lanes = [Lane(
            spec=x, ids=[f"g{i}-r{run_id}" + ("" if one else f"-{x.policy}") for i in range(n)],
            hosts=list(range(k * n, (k + 1) * n)), broker_port=BROKER_PORT + k,
            http_port=SERVER_HTTP + k, suffix="" if one else f"-{x.policy}")
            for k, x in enumerate(specs)]
        self.hosts = [i for lane in self.lanes for i in lane.hosts]
        self.rate_log: list[tuple[float, float]] = []
        self.hang_log: list[tuple[float, float]] = []  # (stopped, resumed), wall time

    def _configure_links(self) -> None:
        """Set every gateway's link rate and CPU share for the start of the run."""
        s = self.spec
        first = s.trace[0][1] if s.trace else s.link_mbit
        for i in self.hosts:
            self.tb.set_rate(i, first)
            self.tb.set_cpu(i, s.cpu_share)
        self.rate_log.append((time.time(), first))

    def _trace(self, started: float, stop: threading.Event) -> None:
        """Step the link rate of every gateway along the trace, from the replay start."""
        for at, mbit in self.spec.trace:
            if stop.wait(max(started + at - time.time(), 0)):
                return
            for i in self.hosts:
                self.tb.set_rate(i, mbit)
            self.rate_log.append((time.time(), mbit))
            log.info("trace: uplink now %.1f Mbit/s", mbit)

    def _hang(self, started: float, stop: threading.Event,
              servers: list[subprocess.Popen[bytes]]) -> None:
        """Hang every lane's edge server (SIGSTOP, then SIGCONT) along `hangs`, from the
        replay start: the server stops answering (a swap storm, a stuck driver) while its
        broker still takes the frames, and answers the backlog when it comes back."""
        for at, secs in self.spec.hangs:
            if stop.wait(max(started + at - time.time(), 0)):
                return
            _signal(servers, signal.SIGSTOP)
            t0 = time.time()
            log.info("hang: edge servers stopped for %.1f s", secs)
            try:
                stop.wait(secs)
            finally:
                _signal(servers, signal.SIGCONT)
            self.hang_log.append((t0, time.time()))

    def _start_lane(self, lane: Lane, started: list[tuple[str, subprocess.Popen[bytes]]]
                    ) -> None:
        """Start one lane's server (and coordinator shim) and, once it serves, its gateways."""
        tb, s, sfx = self.tb, lane.spec, lane.suffix
        conf = self.dir / f"server{sfx}.toml"
        conf.write_text(to_toml(server_config(s, lane.broker_port, lane.http_port)))
        srv = tb.popen(tb.server_ns, _python("edgetok", "server", "--config", str(conf)),
                       self.dir / f"server{sfx}.log")
        started.append((f"server{sfx}", srv))
        if s.coordinator == "shim":
            (self.dir / f"controller{sfx}.json").write_text(json.dumps(controller_config(s)))
            started.append((f"coord{sfx}", tb.popen(tb.server_ns, _python(
                "testbed.coord", "--config", str(self.dir / f"controller{sfx}.json"),
                "--bundle", str(s.bundle), "--port", str(lane.broker_port)),
                self.dir / f"coord{sfx}.log", env=_env())))
        tb.wait_tcp(tb.server_ns, "127.0.0.1", lane.http_port, srv, timeout=60)
        for i, gw_id in zip(lane.hosts, lane.ids, strict=True):
            path = self.dir / f"{gw_id}.toml"
            path.write_text(to_toml(gateway_config(s, tb, i, gw_id, self.dir / f"state-{gw_id}",
                                                   lane.broker_port)))
            started.append((gw_id, tb.popen(tb.hosts[i].netns, _python(
                "edgetok", "gateway", "--config", str(path)), self.dir / f"{gw_id}.log",
                cgroup=tb.hosts[i].cpu)))

    def _profile_path(self, gw_id: str) -> Path:
        """Where py-spy writes the samples of one gateway."""
        return self.dir / f"profile-{gw_id}.txt"

    def _start_profiles(self, started: list[tuple[str, subprocess.Popen[bytes]]],
                        profilers: list[subprocess.Popen[bytes]]) -> None:
        """A py-spy per gateway, on the host: outside the gateways' CPU quota and netns."""
        gateways = {g for lane in self.lanes for g in lane.ids}
        for name, proc in started:
            if name in gateways:  # its pid is the gateway's: sh, taskset, ip netns exec exec
                # Appended one by one: if a later one fails, the finally still stops these.
                profilers.append(profile.record(proc.pid, self._profile_path(name),
                                                self.profile_rate))

    def execute(self) -> list[RunData]:
        """Start every lane, replay, stop everything; the data of each lane, in lane order."""
        s, tb = self.spec, self.tb
        self.dir.mkdir(parents=True, exist_ok=True)
        self._configure_links()
        started: list[tuple[str, subprocess.Popen[bytes]]] = []
        codes: dict[str, int | None] = {}
        stop_threads = threading.Event()
        profilers: list[subprocess.Popen[bytes]] = []
        try:
            for lane in self.lanes:
                self._start_lane(lane, started)
            before = {i: tb.tx_bytes(i) for i in self.hosts}
            stalled_at_start = {i: tb.hosts[i].cpu.throttled_s() for i in self.hosts}
            driver_out = self.dir / "driver.json"
            gateways = [f"{g}@{lane.broker_port}" for lane in self.lanes for g in lane.ids]
            static = all(lane.spec.coordinator == "static" for lane in self.lanes)
            drv = tb.popen(tb.server_ns, _python(
                "testbed.driver", "--port", str(BROKER_PORT), "--gateways", ",".join(gateways),
                "--window-rate", str(s.window_rate), "--windows", str(s.windows),
                "--warmup", str(s.warmup), "--frames", "--tag", str(self.dir.name),
                *([] if static else ["--await-decision"]),
                "--results-timeout", str(max(30.0, 3 * s.deadline_ms / 1000)),
                "--out", str(driver_out)), env=_env(), stdout=subprocess.PIPE)
            threads: list[threading.Thread] = []
            servers = [p for name, p in started if name.startswith("server")]
            assert drv.stdout is not None
            with drv.stdout:
                for raw in drv.stdout:
                    line = raw.decode(errors="replace").strip()
                    if not line.startswith("REPLAY START"):
                        continue
                    if self.profile_rate:
                        self._start_profiles(started, profilers)
                    at = float(line.split()[2])
                    if s.trace:
                        threads.append(threading.Thread(
                            target=self._trace, args=(at, stop_threads), daemon=True))
                    if s.hangs:
                        threads.append(threading.Thread(
                            target=self._hang, args=(at, stop_threads, servers), daemon=True))
                    for t in threads:
                        t.start()
            code = drv.wait()
            tb.procs.remove(drv)
            profile.stop(profilers)  # now: the gateways' shutdown is not part of a window
            for gw_id in (g for lane in self.lanes for g in lane.ids):
                if profilers and not self._profile_path(gw_id).is_file():
                    log.warning("no py-spy samples of %s: see %s", gw_id,
                                self._profile_path(gw_id).with_suffix(".log"))
            stop_threads.set()
            for t in threads:
                t.join()
            if code != 0:
                raise TestbedError(f"driver exited with {code}; logs in {self.dir}")
            wire = {i: tb.tx_bytes(i) - b for i, b in before.items()}
            stalled = {i: _delta(tb.hosts[i].cpu.throttled_s(), t0)
                       for i, t0 in stalled_at_start.items()}
            data = json.loads(driver_out.read_text())
        finally:
            stop_threads.set()
            profile.stop(profilers)
            # Gateways first: they drain in-flight windows while the servers still answer.
            for name, proc in reversed(started):
                codes[name] = tb.stop(proc)
        out = []
        for lane in self.lanes:
            lane_codes = {k: v for k, v in codes.items()
                          if k in lane.ids or k in (f"server{lane.suffix}", f"coord{lane.suffix}")}
            out.append(RunData(lane.spec, lane_data(data, lane.ids),
                               [wire[i] for i in lane.hosts], self.rate_log, self.dir,
                               lane_codes, [self._profile_path(g) for g in lane.ids
                                            if self._profile_path(g).is_file()],
                               [stalled[i] for i in lane.hosts]))
        # What the metrics need besides driver.json, so a kept run can be re-analysed.
        (self.dir / "run.json").write_text(json.dumps({"lanes": [
            {"spec": {k: str(v) if isinstance(v, Path) else v
                      for k, v in ((f, getattr(d.spec, f)) for f in d.spec.__slots__)},
             "gateways": lane.ids, "wire_bytes": d.wire_bytes, "exit_codes": d.exit_codes,
             "throttled_s": d.throttled_s}
            for lane, d in zip(self.lanes, out, strict=True)], "rate_log": self.rate_log,
            "hang_log": self.hang_log}))
        return out


def _signal(procs: list[subprocess.Popen[bytes]], sig: signal.Signals) -> None:
    """Send `sig` to every process still running."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)


def _delta(now: float | None, then: float | None) -> float | None:
    """now - then, or None if either is unknown."""
    return None if now is None or then is None else round(now - then, 6)


def nominal_hz(bundle: Path) -> float:
    """The clock that one full core of this machine stands for: the bundle's profiling clock."""
    from edgetok.models.bundle import read_manifest

    hz = read_manifest(bundle).reference_hz
    return float(hz) if hz and math.isfinite(hz) else 2.0e9
