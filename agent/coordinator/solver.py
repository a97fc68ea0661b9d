"""The solver: energy-minimal (f, p) per option, then the global optimum over the options.

For a fixed option (ρ, s, q) with C cycles and b bits, spending t_c on compute costs
κ·C³/t_c² and spending t_x on the uplink costs t_x·(N0·B/g)·(2^(b/(B·t_x)) − 1). Both fall
as their time grows and both are convex, so the energy-minimal point uses the whole time
budget τ = deadline − fixed latency, and the best split t_c + t_x = τ is the root of the
(increasing) derivative of a convex function of t_c: a safeguarded Newton search on it is
exact to float precision. All options are solved at once with numpy; no scipy, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from edgetok.agent.coordinator.fastest import fastest_knobs
from edgetok.agent.coordinator.model import (
    Environment,
    Option,
    OptionTable,
    evaluate,
    fixed_latency,
    power_for_rate,
    rate_bps,
)

LN2 = math.log(2.0)
# Newton converges quadratically, so a handful of steps reach float resolution; the cap only
# matters when bisection fallbacks kick in (it then halves the bracket each step, 2^-60).
MAX_NEWTON_ITERS = 60
# Relative step size at which t_c is as exact as a float allows (a few ulps).
NEWTON_RTOL = 4 * float(np.finfo(np.float64).eps)
# Feasibility is judged with this relative slack so that an optimum that sits exactly on the
# deadline is not rejected over the last bit of a float.
FEAS_RTOL = 1e-9
# Distortions closer than this are a tie (then energy, then latency decides): profile
# accuracies are ratios of counts, so anything smaller is float noise.
TIE_ATOL = 1e-9

# After the objective: least energy, then latency (the default), or least latency within
# the energy budget, then energy.
Prefer = Literal["energy", "latency"]


class SolveError(ValueError):
    """No option is allowed (policy and privacy floor exclude them all)."""


@dataclass(frozen=True, slots=True, eq=False)
class Solution:
    """The best (f, p) of every option, with its latency (s), energy (J) and feasibility."""

    f: np.ndarray = field(repr=False)
    p: np.ndarray = field(repr=False)
    latency: np.ndarray = field(repr=False)
    energy: np.ndarray = field(repr=False)
    feasible: np.ndarray = field(repr=False)
    overrun: np.ndarray = field(repr=False)  # s past the deadline, 0 if met
    excess: np.ndarray = field(repr=False)  # J over the energy budget, 0 if met


@dataclass(frozen=True, slots=True)
class Choice:
    """The chosen option with its knobs and predictions (SI units)."""

    index: int
    option: Option
    f_hz: float
    p_w: float
    latency_s: float
    energy_j: float
    distortion: float
    feasible: bool
    overrun_s: float


def _slope(t: np.ndarray, two_a: np.ndarray, s: np.ndarray, tau: np.ndarray,
           k: float) -> tuple[np.ndarray, np.ndarray]:
    """First and second derivative of E(t_c) = κC³/t_c² + E_x(τ − t_c) in t_c.

    With u = s/(τ − t_c) the spectral efficiency and x = u·ln2, the transmit term contributes
    k·(x·e^x − (e^x − 1)) to the slope and k·x²·e^x/(τ − t_c) to the curvature.
    """
    t_x = tau - t
    x = s / t_x * LN2
    ex = np.exp(x)
    slope = k * (x * ex - np.expm1(x)) - two_a / t**3
    curvature = 3.0 * two_a / t**4 + k * x * x * ex / t_x
    return slope, curvature


def _split_time(lo: np.ndarray, hi: np.ndarray, two_a: np.ndarray, s: np.ndarray,
                tau: np.ndarray, k: float) -> np.ndarray:
    """The compute time minimising E on [lo, hi]: safeguarded Newton on the rising slope."""
    s_lo, _ = _slope(lo, two_a, s, tau, k)
    s_hi, _ = _slope(hi, two_a, s, tau, k)
    # A slope of one sign over the whole bracket puts the optimum on its edge.
    out = np.where(s_lo >= 0, lo, hi)
    inner = (s_lo < 0) & (s_hi > 0)
    if not inner.any():
        return out
    a, b, two_a, s, tau = lo[inner], hi[inner], two_a[inner], s[inner], tau[inner]
    t = 0.5 * (a + b)
    for _ in range(MAX_NEWTON_ITERS):
        slope, curvature = _slope(t, two_a, s, tau, k)
        above = slope > 0
        b = np.where(above, t, b)
        a = np.where(above, a, t)
        t_new = t - slope / curvature
        # Outside the bracket Newton is not to be trusted: bisect instead.
        t_new = np.where((t_new > a) & (t_new < b), t_new, 0.5 * (a + b))
        converged = bool(np.all(np.abs(t_new - t) <= NEWTON_RTOL * t))
        t = t_new
        if converged:
            break
    out[inner] = t
    return out


def _finish(table: OptionTable, env: Environment, f: np.ndarray, p: np.ndarray,
            queue_s: np.ndarray | float | None) -> Solution:
    """Evaluate knobs with the forward model and judge feasibility."""
    latency, energy = evaluate(table, env, f, p, queue_s)
    overrun = np.maximum(latency - env.deadline_s, 0.0)
    excess = np.maximum(energy - env.energy_budget_j, 0.0)
    feasible = ((latency <= env.deadline_s * (1 + FEAS_RTOL))
                & (energy <= env.energy_budget_j * (1 + FEAS_RTOL)))
    return Solution(f=f, p=p, latency=latency, energy=energy, feasible=feasible,
                    overrun=overrun, excess=excess)


def solve_options(table: OptionTable, env: Environment,
                  queue_s: np.ndarray | float | None = None,
                  prefer: Prefer = "energy") -> Solution:
    """Energy-minimal feasible (f, p) of every option; the fastest point where none is.

    With prefer="latency", the latency-minimal (f, p) within the energy budget instead.
    """
    c = table.c_head * env.compute_scale
    b = table.bits
    tx = table.transmits
    has_c = c > 0
    tau = env.deadline_s - fixed_latency(table, env, queue_s)
    t_x_min = np.where(tx, b / float(rate_bps(env.p_max_w, env)), 0.0)
    lo = c / env.f_max_hz
    hi_c = c / env.f_min_hz
    deadline_ok = lo + t_x_min <= tau
    hi = np.maximum(np.minimum(hi_c, tau - t_x_min), lo)
    k = env.noise_w / env.gain
    two_a = 2.0 * env.kappa * c**3
    mixed = has_c & tx & deadline_ok
    t = np.where(mixed, hi, 0.0)
    if mixed.any():
        t[mixed] = _split_time(lo[mixed], hi[mixed], two_a[mixed], b[mixed] / env.bandwidth_hz,
                               tau[mixed], k)
    # Device only: as slow as the deadline and f_min allow.
    t = np.where(has_c & ~tx, np.clip(tau, lo, hi_c), t)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        f = np.where(has_c, c / np.where(t > 0, t, 1.0), env.f_min_hz)
        t_x = np.where(has_c, tau - t, tau)
        p = np.where(tx & (t_x > 0), power_for_rate(b / np.where(t_x > 0, t_x, 1.0), env),
                     env.p_max_w)
    f = np.where(deadline_ok, f, env.f_max_hz)
    f = np.where(has_c, np.clip(f, env.f_min_hz, env.f_max_hz), env.f_min_hz)
    p = np.where(deadline_ok, p, env.p_max_w)
    p = np.where(tx, np.clip(p, np.finfo(np.float64).tiny, env.p_max_w), 0.0)
    if prefer == "latency":
        f, p = fastest_knobs(table, env, f, p)
    return _finish(table, env, f, p, queue_s)


def grid_options(table: OptionTable, env: Environment, n: int = 200,
                 queue_s: np.ndarray | float | None = None,
                 prefer: Prefer = "energy") -> Solution:
    """Brute force over an n×n grid of (f, p): the reference the solver is checked against."""
    fs = np.linspace(env.f_min_hz, env.f_max_hz, n)
    ps = np.linspace(env.p_max_w / n, env.p_max_w, n)
    ff, pp = (a.reshape(1, -1) for a in np.meshgrid(fs, ps, indexing="ij"))
    col = table.c_head.reshape(-1, 1)
    sub = OptionTable(bundle=table.bundle, num_layers=table.num_layers, options=table.options,
                      c_head=col, bits=table.bits.reshape(-1, 1),
                      t_tail=table.t_tail.reshape(-1, 1), distortion=table.distortion,
                      split=table.split.reshape(-1, 1), ratio=table.ratio)
    q = queue_s.reshape(-1, 1) if isinstance(queue_s, np.ndarray) else queue_s
    latency, energy = evaluate(sub, env, ff, pp, q)
    ok = (latency <= env.deadline_s) & (energy <= env.energy_budget_j)
    # Feasible points: least energy, then latency (or the reverse). Otherwise: least overrun,
    # then energy.
    key_e = np.where(ok, energy, np.inf)
    key_t = np.where(ok, latency, np.inf)
    key_o = np.where(ok, 0.0, np.maximum(latency - env.deadline_s, 0.0))
    keys = (latency, key_e) if prefer == "energy" else (energy, key_t)
    first = np.where(ok.any(axis=1), np.lexsort(keys)[:, 0],
                     np.lexsort((energy, key_o))[:, 0])
    f, p = ff[0, first], pp[0, first]
    p = np.where(table.transmits, p, 0.0)
    return _finish(table, env, np.asarray(f), np.asarray(p), queue_s)


def rank(table: OptionTable, sol: Solution, allowed: np.ndarray,
         penalty: np.ndarray | None = None, prefer: Prefer = "energy") -> np.ndarray:
    """Allowed option indices, best first: feasible by (penalty, energy, latency), or (penalty,
    latency, energy) when preferring latency, then the rest by (overrun, energy excess,
    distortion). The penalty defaults to the distortion."""
    idx = np.flatnonzero(allowed)
    if idx.size == 0:
        raise SolveError("no option is allowed by the policy and the privacy floor")
    primary = table.distortion if penalty is None else penalty
    feas = idx[sol.feasible[idx]]
    infeas = idx[~sol.feasible[idx]]
    # Rounding to the tie tolerance makes near-equal distortions compare equal.
    second, third = ((sol.energy, sol.latency) if prefer == "energy"
                     else (sol.latency, sol.energy))
    good = feas[np.lexsort((third[feas], second[feas], np.round(primary[feas] / TIE_ATOL)))]
    bad = infeas[np.lexsort((sol.energy[infeas], table.distortion[infeas],
                             sol.excess[infeas], np.round(sol.overrun[infeas] / 1e-9)))]
    return np.concatenate([good, bad])


def choice(table: OptionTable, sol: Solution, i: int) -> Choice:
    """The Choice record of option i in a solution."""
    return Choice(index=int(i), option=table.options[i], f_hz=float(sol.f[i]),
                  p_w=float(sol.p[i]), latency_s=float(sol.latency[i]),
                  energy_j=float(sol.energy[i]), distortion=float(table.distortion[i]),
                  feasible=bool(sol.feasible[i]), overrun_s=float(sol.overrun[i]))


def privacy_mask(table: OptionTable, env: Environment) -> np.ndarray:
    """Options that keep at least privacy_min_split layers on the device."""
    return np.asarray(table.split >= env.privacy_min_split)


def solve(table: OptionTable, env: Environment, allowed: np.ndarray | None = None,
          queue_s: np.ndarray | float | None = None,
          prefer: Prefer = "energy") -> tuple[Choice, Solution]:
    """The global optimum over the allowed options (all, within the privacy floor, if None)."""
    mask = privacy_mask(table, env) if allowed is None else allowed & privacy_mask(table, env)
    sol = solve_options(table, env, queue_s, prefer)
    return choice(table, sol, int(rank(table, sol, mask, prefer=prefer)[0])), sol
