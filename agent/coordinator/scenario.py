"""Scenario files for `edgetok plan`: link, device, server and budget tables (TOML, pydantic)."""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import Field, model_validator

from edgetok.agent.coordinator.model import Environment, Objective
from edgetok.agent.coordinator.solver import Prefer
from edgetok.settings import Strict, load_toml


class LinkTable(Strict):
    """The uplink: bandwidth, channel gain, noise density and the radio's power cap."""

    bandwidth_hz: float = Field(gt=0, description="Uplink bandwidth B (Hz).")
    gain: float = Field(gt=0, description="Channel power gain g (linear, path loss included).")
    noise_w_per_hz: float = Field(gt=0, description="Noise power spectral density N0 (W/Hz); "
                                  "-174 dBm/Hz is 3.98e-21.")
    p_max_w: float = Field(gt=0, description="Largest transmit power (W); 20 dBm is 0.1 W.")


class DeviceTable(Strict):
    """The gateway's CPU: clock range, energy coefficient and the profiling clock."""

    f_min_hz: float = Field(gt=0, description="Lowest CPU clock the governor allows (Hz).")
    f_max_hz: float = Field(gt=0, description="Highest CPU clock (Hz).")
    reference_hz: float | None = Field(
        None, gt=0, description="Clock of the machine the bundle was profiled on (Hz); "
        "C_head = head_ms_1t × reference_hz. Defaults to the bundle's manifest.reference_hz.")
    kappa: float = Field(gt=0, description="Effective switched capacitance κ (J/cycle/Hz²): "
                         "compute energy is κ·C·f².")

    @model_validator(mode="after")
    def _range(self) -> DeviceTable:
        if self.f_max_hz < self.f_min_hz:
            raise ValueError(f"f_max_hz ({self.f_max_hz}) is below f_min_hz ({self.f_min_hz})")
        return self


class ServerTable(Strict):
    """The edge server as the gateway sees it."""

    slowdown: float = Field(1.0, gt=0, description="Tail latency / profiled tail latency "
                            "(1 = as fast as the profiling machine).")
    queue_ms: float = Field(0.0, ge=0, description="Queueing delay before the tail runs (ms).")


class BudgetTable(Strict):
    """What each window must meet."""

    deadline_ms: float = Field(gt=0, description="End-to-end deadline per window (ms).")
    energy_mj: float = Field(math.inf, gt=0, description="Device energy budget per window (mJ); "
                             "omit for none.")
    privacy_min_split: int = Field(0, ge=0, description="Layers that must stay on the device "
                                   "(0 allows sending raw tokens).")


class Scenario(Strict):
    """One planning scenario: the four tables of an `edgetok plan` scenario file."""

    link: LinkTable = Field(description="The uplink.")
    device: DeviceTable = Field(description="The gateway CPU.")
    server: ServerTable = Field(default_factory=ServerTable,
                                description="The edge server.")
    budget: BudgetTable = Field(description="Deadline, energy budget and privacy floor.")
    objective: Objective = Field("accuracy", description="What to minimise: 'accuracy' "
                                 "(1 − profiled accuracy) or 'output_distortion'.")
    prefer: Prefer = Field(
        "energy", description="After the objective: least energy, then latency ('energy'), "
        "or least latency within the energy budget, then energy ('latency').")

    def environment(self) -> Environment:
        """The scenario as the solver's SI-unit Environment."""
        return Environment(
            bandwidth_hz=self.link.bandwidth_hz, gain=self.link.gain,
            noise_w_per_hz=self.link.noise_w_per_hz, p_max_w=self.link.p_max_w,
            f_min_hz=self.device.f_min_hz, f_max_hz=self.device.f_max_hz,
            kappa=self.device.kappa, slowdown=self.server.slowdown,
            queue_s=self.server.queue_ms / 1000.0, deadline_s=self.budget.deadline_ms / 1000.0,
            energy_budget_j=self.budget.energy_mj / 1000.0,
            privacy_min_split=self.budget.privacy_min_split)


def load_scenario(path: Path | str) -> Scenario:
    """Read a scenario TOML; ConfigError lists every problem with its location."""
    return load_toml(path, Scenario)
