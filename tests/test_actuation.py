"""Actuation that fails or hangs: errors stay bounded, the loop runs on, decisions stay."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import pytest
from conftest import Broker
from harness import Collector, gateway_config, until

from edgetok.control import Decision, Telemetry, encode_decision
from edgetok.gateway import actuators, controlplane
from edgetok.gateway.actuators import ERRORS_KEPT, Actuators, ActuatorSettings, rate_bps
from edgetok.gateway.config import GatewayConfig
from edgetok.gateway.daemon import Gateway
from edgetok.procs import free_port


def test_a_write_that_keeps_failing_is_counted_not_hoarded(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every fallback run sets the clock again; a broken knob fails each time."""
    cgroup = tmp_path / "cg"
    cgroup.mkdir()
    (cgroup / "cpu.max").write_text("max 100000")
    a = Actuators(ActuatorSettings(cpu_mode="emulated", cgroup=cgroup, tx_mode="off"))
    assert a.cpu_mode == "emulated"
    (cgroup / "cpu.max").unlink()
    (cgroup / "cpu.max").mkdir()  # the knob is gone: every write now fails for real
    with caplog.at_level(logging.WARNING, logger="edgetok.gateway.actuators"):
        for _ in range(1000):
            a.set_cpu(1.0e9)
    assert a.cpu_hz is None  # never taken, so every run tried again
    assert a.error_count == 1000 and len(a.errors) == ERRORS_KEPT
    st = a.status()
    assert st["error_count"] == 1000 and len(st["errors"]) == 5
    assert "cannot set CPU clock" in a.errors[-1]
    assert len(caplog.records) == 1  # one warning for a run of the same failure


def fake_tc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: str) -> Path:
    """An `tc` first on PATH: the first call runs `first` (a fault), later ones succeed.

    Each call appends its pid and arguments to the returned file. A wedged tc, or one that
    fails on loopback, cannot be had for real without shaping this host's own traffic.
    """
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "tc.calls"
    tc = bindir / "tc"
    tc.write_text(f"#!/bin/sh\necho \"$$ $*\" >> {calls}\n"
                  f"[ \"$(wc -l < {calls})\" -gt 1 ] && exit 0\n{first}\n")
    tc.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return calls


def alive(pid: int) -> bool:
    """Whether the process exists at all (an unreaped zombie counts: it was not waited for)."""
    return Path(f"/proc/{pid}").exists()


def emulated_radio() -> Actuators:
    a = Actuators(ActuatorSettings(cpu_mode="off", tx_mode="emulated", interface="lo",
                                   link_sense="off"))
    assert a.tx_mode == "emulated"
    return a


@pytest.mark.asyncio
async def test_a_hung_tc_neither_stalls_the_loop_nor_survives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_tc(tmp_path, monkeypatch, "exec sleep 30")
    monkeypatch.setattr(actuators, "TX_TIMEOUT_S", 0.3)
    a = emulated_radio()
    turns = 0

    async def ticker() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    tick = asyncio.create_task(ticker())
    try:
        assert not await a.apply(1e9, 0.05)
        assert turns > 0  # the loop (and ingest with it) ran on while tc hung
    finally:
        tick.cancel()
    assert a.tx_power_w is None and a.effective_tx_power_w() == 0.1  # the old power stands
    assert "no answer" in a.errors[-1]
    pid = int(calls.read_text().split()[0])
    assert not alive(pid)  # killed and reaped
    assert await a.apply(1e9, 0.05)  # tried again, it takes
    assert a.tx_power_w == 0.05
    last = calls.read_text().splitlines()[-1].split()[1:]
    assert last[:6] == ["qdisc", "replace", "dev", "lo", "root", "tbf"]
    assert last[7] == f"{int(rate_bps(0.05, a.s))}bit"


def _decision(gw: Gateway, seq: int, tx_power_w: float) -> bytes:
    d = Decision(gateway=gw.cfg.id, epoch=1, seq=seq, ts=time.time(),
                 bundle=gw.manifest.bundle_id, variant="r0.00-s2", pruning_ratio=0.0, split=2,
                 precision="fp32", cpu_hz=1e9, tx_power_w=tx_power_w, latency_ms=10.0,
                 energy_mj=1.0, distortion=0.0, feasible=True, policy="joint")
    return encode_decision(d)


@pytest.mark.asyncio
async def test_the_newest_decision_is_applied_and_a_failed_power_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bundle: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Decisions that queue up are coalesced to the newest; a tc that fails does not drop
    it (the coordinator will not send a retained decision again): it is retried."""
    calls = fake_tc(tmp_path, monkeypatch, "echo 'RTNETLINK answers: busy' >&2; exit 2")
    monkeypatch.setattr(controlplane, "ACTUATE_RETRY_S", 0.05)
    cfg = gateway_config(tmp_path, tiny_bundle, free_port(), free_port(), extra={
        "actuators": {"cpu_mode": "off", "tx_mode": "emulated", "interface": "lo",
                      "link_sense": "off"}})
    gw = Gateway(GatewayConfig.model_validate(cfg))
    cp = gw.control
    try:
        for seq, power in ((1, 0.01), (2, 0.02), (3, 0.05)):
            cp.on_control(_decision(gw, seq, power))  # returns at once: nothing applied yet
        assert cp.last is None and cp.pending is not None and cp.pending.seq == 3
        cp.on_control(_decision(gw, 2, 0.02))  # older than what waits: ignored
        with caplog.at_level(logging.INFO, logger="edgetok.gateway.controlplane"):
            applier = asyncio.create_task(cp._applier())
            await until(lambda: cp.last is not None and cp.actuation_due is None)
            applier.cancel()
        assert cp.last is not None and cp.last.seq == 3
        assert gw.inferencer.decision.seq == 3
        applied = [r.getMessage() for r in caplog.records if "decision #" in r.getMessage()]
        assert [m.split()[1] for m in applied] == ["#3:", "#3:"]  # switched, then in force
        rate = f"{int(rate_bps(0.05, gw.control.actuators.s))}bit"
        assert [c.split()[8] for c in calls.read_text().splitlines()] == [rate, rate]
        assert cp.actuators.tx_power_w == 0.05 and cp.actuators.error_count == 1
    finally:
        gw.inferencer.close()
        gw.store.close()


@pytest.mark.asyncio
async def test_a_report_that_cannot_be_built_costs_that_report_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bundle: Path, mosquitto: Broker,
        caplog: pytest.LogCaptureFixture) -> None:
    """A telemetry figure the wire refuses ended the control plane's task group, and the
    daemon with it; now that report is skipped and the next ones go out."""
    cfg = gateway_config(tmp_path, tiny_bundle, mosquitto.port, free_port(), extra={
        "telemetry_interval_s": 0.05,
        "actuators": {"cpu_mode": "off", "tx_mode": "off", "link_sense": "off"}})
    gw = Gateway(GatewayConfig.model_validate(cfg))
    cp = gw.control
    built = cp.telemetry
    calls = 0

    def flaky() -> Telemetry:
        nonlocal calls
        calls += 1
        if calls == 1:  # what a NaN in a measured figure does at validation
            return Telemetry(gateway=gw.cfg.id, ts=float("nan"))
        return built()

    monkeypatch.setattr(cp, "telemetry", flaky)
    seen = Collector(mosquitto.port, [gw.topics.telemetry]).start()
    session = asyncio.create_task(gw.session.run())
    try:
        await gw.session.connected.wait()
        with caplog.at_level(logging.ERROR, logger="edgetok.gateway.controlplane"):
            reporter = asyncio.create_task(cp._report())
            await until(lambda: len(seen.on(gw.topics.telemetry)) >= 2)
            assert not reporter.done()
            reporter.cancel()
        assert cp.reports_failed == 1 and cp.status()["reports_failed"] == 1
        assert len([r for r in caplog.records if "telemetry report" in r.getMessage()]) == 1
    finally:
        await gw.session.close()
        await session
        seen.stop()
        gw.inferencer.close()
        gw.store.close()
