"""The latency-first solver: per option, the fastest (f, p) within the energy budget.

For deployments that prefer latency to energy (`prefer = "latency"`): after the objective,
options are ranked by latency, and each option runs as fast as its energy budget allows.
Without a budget that is simply (f_max, p_max). With one, the budget binds: spending E_c on
compute gives f = √(E_c/(κ·C)), and the rest E_b − E_c buys the largest power whose
transmit energy p·S/r(p) (increasing in p) fits. Latency is then a unimodal function of E_c,
found by golden-section search; the power by bisection. numpy only, all options at once.
"""

from __future__ import annotations

import math

import numpy as np

from edgetok.agent.coordinator.model import Environment, OptionTable, rate_bps

GOLDEN_ITERS = 80  # shrinks the compute-energy bracket by 0.618^80 ≈ 2e-17: float precision
BISECT_ITERS = 80  # power bracket, halved in log space from 60 decades down to float precision
P_FLOOR = 1e-60  # relative to p_max: the lowest power the bisection considers


def _tx_energy(p: np.ndarray, bits: np.ndarray, env: Environment) -> np.ndarray:
    """p·S/r(p): increasing in p, from S·N0·ln2/g at p → 0."""
    return np.asarray(p * bits / rate_bps(p, env))


def _power_for_energy(e_x: np.ndarray, bits: np.ndarray, env: Environment) -> np.ndarray:
    """The largest p ≤ p_max with p·S/r(p) ≤ e_x (bisection on log p)."""
    top = np.full_like(e_x, env.p_max_w)
    fits_top = _tx_energy(top, bits, env) <= e_x
    lo = np.log(top * P_FLOOR)
    hi = np.log(top)
    for _ in range(BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        ok = _tx_energy(np.exp(mid), bits, env) <= e_x
        lo = np.where(ok, mid, lo)
        hi = np.where(ok, hi, mid)
    return np.where(fits_top, top, np.exp(lo))


def _latency(e_c: np.ndarray, c: np.ndarray, bits: np.ndarray, e_b: float,
             env: Environment) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(latency of the knobs, f, p) when e_c of the budget goes to compute."""
    f = np.clip(np.sqrt(e_c / (env.kappa * c)), env.f_min_hz, env.f_max_hz)
    p = _power_for_energy(e_b - env.kappa * c * f**2, bits, env)
    return c / f + bits / rate_bps(p, env), f, p


def fastest_knobs(table: OptionTable, env: Environment, energy_min_f: np.ndarray,
                  energy_min_p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per option, the latency-minimal (f, p) with energy within the budget.

    Where even the energy-minimal point is over the budget, that point is kept: it is the
    closest the option gets (the energy-first solver's answer, passed in).
    """
    c = table.c_head * env.compute_scale
    bits = table.bits
    tx = table.transmits
    e_b = env.energy_budget_j
    # f_max even with no head to run: the gateway still tokenizes, encodes and publishes each
    # window on this clock, work the model does not count (its energy is 0 in the model, so
    # the clock costs no budget) but the latency shows.
    f = np.full(c.shape, env.f_max_hz)
    p = np.where(tx, env.p_max_w, 0.0)
    if math.isinf(e_b):
        return f, p
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        e_full = env.kappa * c * f**2 + np.where(tx, _tx_energy(np.maximum(p, 1e-300), bits,
                                                                 env), 0.0)
    e_floor = env.kappa * c * env.f_min_hz**2 + np.where(
        tx, bits * env.noise_w_per_hz * math.log(2.0) / env.gain, 0.0)
    binds = e_full > e_b * (1 + 1e-12)
    hopeless = binds & (e_floor >= e_b)
    f = np.where(hopeless, energy_min_f, f)
    p = np.where(hopeless, energy_min_p, p)
    todo = binds & ~hopeless
    dev = todo & ~tx  # compute only: the clock the budget pays for
    f = np.where(dev, np.clip(np.sqrt(e_b / (env.kappa * np.where(c > 0, c, 1.0))),
                              env.f_min_hz, env.f_max_hz), f)
    srv = todo & tx & (c <= 0)  # transmit only: the power the budget pays for
    if srv.any():
        p[srv] = _power_for_energy(np.full(int(srv.sum()), e_b), bits[srv], env)
    mixed = todo & tx & (c > 0)
    if mixed.any():
        cm, bm = c[mixed], bits[mixed]
        lo = env.kappa * cm * env.f_min_hz**2
        hi = np.minimum(env.kappa * cm * env.f_max_hz**2,
                        e_b - bm * env.noise_w_per_hz * math.log(2.0) / env.gain)
        g = (math.sqrt(5.0) - 1) / 2
        a, b = lo, hi
        x1, x2 = b - g * (b - a), a + g * (b - a)
        t1 = _latency(x1, cm, bm, e_b, env)[0]
        t2 = _latency(x2, cm, bm, e_b, env)[0]
        for _ in range(GOLDEN_ITERS):
            left = t1 <= t2  # the minimum lies in [a, x2]
            b = np.where(left, x2, b)
            a = np.where(left, a, x1)
            x2n = np.where(left, x1, a + g * (b - a))
            x1n = np.where(left, b - g * (b - a), x2)
            t_new = _latency(np.where(left, x1n, x2n), cm, bm, e_b, env)[0]
            t1, t2 = np.where(left, t_new, t2), np.where(left, t1, t_new)
            x1, x2 = x1n, x2n
        _, fm, pm = _latency(0.5 * (a + b), cm, bm, e_b, env)
        f[mixed], p[mixed] = fm, pm
    return f, p
