"""Actuation that fails: errors stay bounded."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edgetok.gateway.actuators import ERRORS_KEPT, Actuators, ActuatorSettings


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
