"""Policies as option-set restrictions: what each may choose, and joint dominating them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetok.agent.coordinator.model import Environment, gain_from_rate, options_from_manifest
from edgetok.agent.coordinator.policies import PolicyError, make_policy
from edgetok.agent.coordinator.solver import TIE_ATOL, rank, solve_options
from edgetok.agent.coordinator.synthetic import synthetic_manifest
from edgetok.control import POLICY_NAMES

TABLE = options_from_manifest(synthetic_manifest(num_layers=4, ratios=(0.0, 0.25, 0.5),
                                                 layer_ms=8.0))


def _env(rate_bps: float = 20e6, **kw: float) -> Environment:
    base = dict(bandwidth_hz=20e6, gain=gain_from_rate(rate_bps, 0.1, 20e6, 3.98e-20),
                noise_w_per_hz=3.98e-20, p_max_w=0.1, f_min_hz=0.6e9, f_max_hz=1.5e9,
                kappa=2e-28, queue_s=0.002, deadline_s=0.1)
    base.update(kw)
    return Environment(**base)  # type: ignore[arg-type]


def test_each_policy_allows_what_its_name_says() -> None:
    env = _env()
    L = TABLE.num_layers
    assert make_policy("joint", TABLE, env).allowed.all()
    assert (TABLE.split[make_policy("device-only", TABLE, env).allowed] == L).all()
    assert (TABLE.split[make_policy("server-only", TABLE, env).allowed] == 0).all()
    fixed = make_policy("fixed-split", TABLE, env).allowed
    assert fixed.sum() == 1
    o = TABLE.options[int(np.flatnonzero(fixed)[0])]
    assert o.pruning_ratio == 0.0
    assert o.precision == "fp32"


def test_fixed_split_is_latency_optimal_at_nominal_bandwidth() -> None:
    from edgetok.agent.coordinator.model import evaluate

    for rate in (50e6, 2e6, 0.05e6):
        env = _env(rate)
        o = int(np.flatnonzero(make_policy("fixed-split", TABLE, env).allowed)[0])
        lat, _ = evaluate(TABLE, env, np.full(len(TABLE.options), env.f_max_hz),
                          np.full(len(TABLE.options), env.p_max_w))
        same = [i for i, x in enumerate(TABLE.options)
                if x.pruning_ratio == 0.0 and (x.precision == "fp32" or x.split == 4)]
        assert lat[o] == pytest.approx(min(lat[same]))


def test_fixed_split_goes_deeper_when_the_nominal_link_is_slow() -> None:
    fast = int(np.flatnonzero(make_policy("fixed-split", TABLE, _env(50e6)).allowed)[0])
    slow = int(np.flatnonzero(make_policy("fixed-split", TABLE, _env(0.05e6)).allowed)[0])
    assert TABLE.options[slow].split > TABLE.options[fast].split


def test_privacy_floor_applies_to_every_policy() -> None:
    env = _env(privacy_min_split=2)
    for name in ("joint", "device-only", "fixed-split"):
        allowed = make_policy(name, TABLE, env).allowed
        assert (TABLE.split[allowed] >= 2).all()
    with pytest.raises(PolicyError, match="privacy"):
        make_policy("server-only", TABLE, env)


def test_unknown_policy_is_an_error() -> None:
    with pytest.raises(PolicyError, match="unknown policy 'greedy'"):
        make_policy("greedy", TABLE, _env())


@settings(max_examples=40, deadline=None)
@given(rate=st.floats(math.log10(2e4), math.log10(5e7)).map(lambda x: 10**x),
       deadline=st.floats(0.01, 0.3), budget=st.floats(0.5e-3, 0.1))
def test_joint_is_never_worse_than_a_baseline(rate: float, deadline: float,
                                              budget: float) -> None:
    env = _env(rate, deadline_s=deadline, energy_budget_j=budget)
    sol = solve_options(TABLE, env)
    joint = int(rank(TABLE, sol, make_policy("joint", TABLE, env).allowed)[0])
    for name in POLICY_NAMES[1:]:
        other = int(rank(TABLE, sol, make_policy(name, TABLE, env).allowed)[0])
        if sol.feasible[other]:
            assert sol.feasible[joint]
            assert TABLE.distortion[joint] <= TABLE.distortion[other] + TIE_ATOL
