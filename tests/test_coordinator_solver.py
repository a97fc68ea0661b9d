"""The solver against a brute-force grid over (f, p), on random scenarios and bundles."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgetok.agent.coordinator.model import (
    Environment,
    ModelError,
    OptionTable,
    evaluate,
    gain_from_rate,
    options_from_manifest,
    power_for_rate,
    rate_bps,
)
from edgetok.agent.coordinator.solver import (
    TIE_ATOL,
    choice,
    grid_options,
    privacy_mask,
    rank,
    solve,
    solve_options,
)
from edgetok.agent.coordinator.synthetic import synthetic_manifest

GRID = 120
RTOL = 1e-9


def log_uniform(lo: float, hi: float) -> st.SearchStrategy[float]:
    """Floats spread evenly in log scale between lo and hi."""
    return st.floats(math.log10(lo), math.log10(hi)).map(lambda x: 10.0**x)


@st.composite
def tables(draw: st.DrawFn) -> OptionTable:
    """A synthetic bundle with a random depth, set of pruning ratios and cost profile."""
    layers = draw(st.integers(1, 4))
    ratios = draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75]), min_size=1, max_size=3,
                           unique=True))
    m = synthetic_manifest(num_layers=layers, ratios=sorted(ratios),
                           tokens=draw(st.integers(4, 64)), hidden=draw(st.integers(8, 256)),
                           layer_ms=draw(log_uniform(0.05, 30.0)),
                           server_speedup=draw(log_uniform(0.5, 10.0)),
                           int8_loss=draw(st.floats(0.0, 0.05)))
    return options_from_manifest(m, draw(st.sampled_from(["accuracy", "output_distortion"])))


@st.composite
def environments(draw: st.DrawFn, layers: int = 4) -> Environment:
    """A random link, device, server and budget, from hopeless to generous."""
    bandwidth = draw(log_uniform(1e5, 4e7))
    noise = draw(log_uniform(4e-21, 4e-19))
    p_max = draw(log_uniform(0.01, 1.0))
    snr_max = draw(log_uniform(0.05, 1e4))
    f_min = draw(log_uniform(2e8, 1.2e9))
    return Environment(
        bandwidth_hz=bandwidth, gain=snr_max * noise * bandwidth / p_max, noise_w_per_hz=noise,
        p_max_w=p_max, f_min_hz=f_min, f_max_hz=f_min * draw(st.floats(1.0, 5.0)),
        kappa=draw(log_uniform(1e-29, 1e-27)), slowdown=draw(st.floats(0.5, 3.0)),
        queue_s=draw(st.floats(0.0, 0.02)), deadline_s=draw(log_uniform(1e-3, 0.5)),
        energy_budget_j=draw(st.one_of(st.just(math.inf), log_uniform(1e-5, 0.2))),
        privacy_min_split=draw(st.integers(0, layers)))


def _key(table: OptionTable, latency: float, energy: float, i: int) -> tuple[float, float]:
    return round(float(table.distortion[i]) / TIE_ATOL), energy


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=tables(), data=st.data())
def test_never_worse_than_the_grid(table: OptionTable, data: st.DataObject) -> None:
    env = data.draw(environments(table.num_layers))
    sol = solve_options(table, env)
    grid = grid_options(table, env, n=GRID)
    # Per option: wherever the grid found a feasible point, the solver's is feasible and no
    # more expensive.
    both = grid.feasible
    assert sol.feasible[both].all()
    assert (sol.energy[both] <= grid.energy[both] * (1 + RTOL) + 1e-15).all()
    # Knobs stay in their boxes; nothing is transmitted at split = L.
    assert ((sol.f >= env.f_min_hz * (1 - RTOL)) & (sol.f <= env.f_max_hz * (1 + RTOL))).all()
    tx = table.transmits
    assert ((sol.p[tx] > 0) & (sol.p[tx] <= env.p_max_w * (1 + RTOL))).all()
    assert (sol.p[~tx] == 0).all()
    # Globally: feasible whenever the grid is, and at least as good by (D, then E).
    allowed = privacy_mask(table, env)
    s_best = int(rank(table, sol, allowed)[0])
    g_best = int(rank(table, grid, allowed)[0])
    if grid.feasible[g_best]:
        assert sol.feasible[s_best]
        s_d, s_e = _key(table, sol.latency[s_best], sol.energy[s_best], s_best)
        g_d, g_e = _key(table, grid.latency[g_best], grid.energy[g_best], g_best)
        assert s_d < g_d or (s_d == g_d and s_e <= g_e * (1 + RTOL) + 1e-15)
    assert table.split[s_best] >= env.privacy_min_split


@settings(max_examples=40, deadline=None)
@given(table=tables(), data=st.data())
def test_per_option_optimum_beats_a_dense_time_split(table: OptionTable,
                                                     data: st.DataObject) -> None:
    """Energy-minimal points are exact: a 20 001-point sweep of the time split never beats them."""
    env = data.draw(environments(table.num_layers))
    sol = solve_options(table, env)
    c = table.c_head * env.compute_scale
    for i in np.flatnonzero(sol.feasible & (c > 0) & table.transmits):
        tau = env.deadline_s - (table.t_tail[i] * env.slowdown + env.queue_s)
        t_x_min = table.bits[i] / rate_bps(env.p_max_w, env)
        lo, hi = c[i] / env.f_max_hz, min(c[i] / env.f_min_hz, tau - t_x_min)
        t_c = np.linspace(lo, hi, 20001)[:-1]
        e = (env.kappa * c[i] ** 3 / t_c**2
             + power_for_rate(table.bits[i] / (tau - t_c), env) * (tau - t_c))
        assert sol.energy[i] <= e.min() * (1 + 1e-7) + 1e-15


def _env(**kw: float) -> Environment:
    base = dict(bandwidth_hz=20e6, gain=7.96e-12, noise_w_per_hz=3.98e-20, p_max_w=0.1,
                f_min_hz=0.6e9, f_max_hz=1.5e9, kappa=2e-28, slowdown=1.0, queue_s=0.002,
                deadline_s=0.1)
    base.update(kw)
    return Environment(**base)  # type: ignore[arg-type]


TABLE = options_from_manifest(synthetic_manifest(num_layers=4, ratios=(0.0, 0.25, 0.5),
                                                 layer_ms=8.0))


def test_device_only_sends_nothing_and_runs_as_slow_as_allowed() -> None:
    env = _env(deadline_s=0.2)
    sol = solve_options(TABLE, env)
    i = TABLE.index("r0.00-s4", "fp32")
    assert sol.p[i] == 0.0
    c = TABLE.c_head[i]
    # 96.9 Mcycles fit in 200 ms at f_min, so the clock is f_min and the latency C/f_min.
    assert sol.f[i] == pytest.approx(env.f_min_hz)
    assert sol.latency[i] == pytest.approx(c / env.f_min_hz)
    assert sol.energy[i] == pytest.approx(env.kappa * c * env.f_min_hz**2)


def test_server_only_uses_no_head_and_just_enough_power() -> None:
    env = _env()
    sol = solve_options(TABLE, env)
    i = TABLE.index("r0.00-s0", "int8")
    assert sol.f[i] == env.f_min_hz
    lat, _ = evaluate(TABLE, env, sol.f, sol.p)
    assert lat[i] == pytest.approx(env.deadline_s, rel=1e-9)
    # Any less power would miss the deadline.
    lat2, _ = evaluate(TABLE, env, sol.f, sol.p * 0.99)
    assert lat2[i] > env.deadline_s


def test_hopeless_deadline_returns_least_overrun_marked_infeasible() -> None:
    env = _env(deadline_s=0.004, gain=1e-16)
    c, sol = solve(TABLE, env)
    assert not c.feasible
    assert not sol.feasible.any()
    assert c.overrun_s == pytest.approx(float(sol.overrun.min()))
    assert c.f_hz == env.f_max_hz or c.option.split == 0


def test_energy_budget_alone_can_make_an_option_infeasible() -> None:
    loose = _env(deadline_s=0.1)
    i = TABLE.index("r0.00-s4", "fp32")
    e = float(solve_options(TABLE, loose).energy[i])
    tight = _env(deadline_s=0.1, energy_budget_j=e * 0.9)
    sol = solve_options(TABLE, tight)
    assert sol.latency[i] <= tight.deadline_s * (1 + RTOL)
    assert not sol.feasible[i]
    assert sol.excess[i] == pytest.approx(e - tight.energy_budget_j)


def test_privacy_floor_is_respected() -> None:
    for floor in range(TABLE.num_layers + 1):
        c, _ = solve(TABLE, _env(privacy_min_split=floor))
        assert c.option.split >= floor


def test_ties_on_distortion_go_to_lower_energy() -> None:
    c, sol = solve(TABLE, _env())
    same = np.flatnonzero(sol.feasible & (np.abs(TABLE.distortion - c.distortion) < TIE_ATOL))
    assert same.size > 1  # several splits share the profile's accuracy
    assert c.energy_j == pytest.approx(float(sol.energy[same].min()))


def test_worse_link_moves_toward_fewer_bytes() -> None:
    bytes_sent = []
    for rate in (20e6, 5e6, 1e6, 0.2e6):
        g = gain_from_rate(rate, 0.1, 20e6, 3.98e-20)
        c, _ = solve(TABLE, _env(gain=g, deadline_s=0.06, privacy_min_split=1))
        bytes_sent.append(c.option.s_bytes)
    assert bytes_sent == sorted(bytes_sent, reverse=True)
    assert bytes_sent[0] > bytes_sent[-1]


def test_choice_record_matches_the_solution() -> None:
    env = _env()
    sol = solve_options(TABLE, env)
    c = choice(TABLE, sol, 5)
    assert c.option is TABLE.options[5]
    assert (c.f_hz, c.p_w, c.latency_s) == (sol.f[5], sol.p[5], sol.latency[5])


def test_rate_and_power_are_inverse() -> None:
    env = _env()
    p = np.array([1e-6, 1e-3, 0.05, 0.1])
    assert power_for_rate(rate_bps(p, env), env) == pytest.approx(p, rel=1e-9)
    g = gain_from_rate(float(rate_bps(0.05, env)), 0.05, env.bandwidth_hz, env.noise_w_per_hz)
    assert g == pytest.approx(env.gain, rel=1e-9)


def test_environment_rejects_nonsense() -> None:
    with pytest.raises(ModelError, match="f_max_hz"):
        _env(f_max_hz=1e8)
    with pytest.raises(ModelError, match="gain"):
        _env(gain=0.0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=tables(), data=st.data())
def test_latency_first_is_never_slower_than_the_grid(table: OptionTable,
                                                     data: st.DataObject) -> None:
    """prefer="latency": per option no slower than any grid point within the energy budget
    and the deadline, and globally as good by (D, then latency)."""
    env = data.draw(environments(table.num_layers))
    sol = solve_options(table, env, prefer="latency")
    grid = grid_options(table, env, n=GRID, prefer="latency")
    both = grid.feasible
    assert sol.feasible[both].all()
    assert (sol.latency[both] <= grid.latency[both] * (1 + RTOL) + 1e-15).all()
    # Within the budget wherever the option can be.
    assert (sol.energy[both] <= env.energy_budget_j * (1 + 1e-9)).all()
    assert ((sol.f >= env.f_min_hz * (1 - RTOL)) & (sol.f <= env.f_max_hz * (1 + RTOL))).all()
    tx = table.transmits
    assert ((sol.p[tx] > 0) & (sol.p[tx] <= env.p_max_w * (1 + RTOL))).all()
    allowed = privacy_mask(table, env)
    s_best = int(rank(table, sol, allowed, prefer="latency")[0])
    g_best = int(rank(table, grid, allowed, prefer="latency")[0])
    if grid.feasible[g_best]:
        assert sol.feasible[s_best]
        s_d = round(float(table.distortion[s_best]) / TIE_ATOL)
        g_d = round(float(table.distortion[g_best]) / TIE_ATOL)
        assert s_d < g_d or (s_d == g_d and sol.latency[s_best]
                             <= grid.latency[g_best] * (1 + RTOL) + 1e-15)


def test_latency_first_without_a_budget_runs_flat_out() -> None:
    """No energy budget: every option at f_max and p_max, the fastest it can be."""
    env = Environment(bandwidth_hz=20e6, gain=1e-7, noise_w_per_hz=4e-21, p_max_w=0.1,
                      f_min_hz=6e8, f_max_hz=1.5e9, kappa=2e-28, deadline_s=0.05)
    sol = solve_options(TABLE, env, prefer="latency")
    # Server-only options too: the gateway's own per-window work runs on that clock.
    assert (sol.f == env.f_max_hz).all()
    assert (sol.p[TABLE.transmits] == env.p_max_w).all()
    slow = solve_options(TABLE, env)
    assert (slow.f[TABLE.c_head <= 0] == env.f_min_hz).all()  # energy first: nothing to run
    assert (sol.latency <= slow.latency * (1 + 1e-12)).all()
    assert (sol.energy >= slow.energy * (1 - 1e-12)).all()
