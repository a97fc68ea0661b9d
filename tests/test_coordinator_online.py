"""The online controller driven by telemetry simulated from the system model."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from edgetok.agent.coordinator.config import ControllerConfig
from edgetok.agent.coordinator.model import Environment, evaluate, gain_from_rate, rate_bps
from edgetok.agent.coordinator.online import OnlineController
from edgetok.agent.coordinator.solver import solve_options
from edgetok.agent.coordinator.synthetic import synthetic_manifest
from edgetok.agent.coordinator.trials import MAX_TRIAL_BACKOFF
from edgetok.control import Decision, Telemetry

B = 20e6
N0 = 3.98e-20
P_MAX = 0.1
MANIFEST = synthetic_manifest(num_layers=4, ratios=(0.0, 0.25, 0.5), layer_ms=8.0)


def gain(rate: float) -> float:
    """Gain at which full power carries `rate` bit/s over the whole band."""
    return gain_from_rate(rate, P_MAX, B, N0)


def config(**kw: Any) -> ControllerConfig:
    """A Wi-Fi-like controller config; keyword arguments override top-level keys."""
    raw: dict[str, Any] = {
        "link": {"bandwidth_hz": B, "gain": gain(20e6), "noise_w_per_hz": N0, "p_max_w": P_MAX},
        "device": {"f_min_hz": 0.6e9, "f_max_hz": 1.5e9, "kappa": 2e-28},
        "server": {"slowdown": 1.0, "queue_ms": 2.0},
        "budget": {"deadline_ms": 60.0, "privacy_min_split": 1},
    }
    raw.update(kw)
    return ControllerConfig.model_validate(raw)


class Sim:
    """Gateways whose telemetry follows the true channel, scale and the current decision."""

    def __init__(self, ctl: OnlineController, noise: float = 0.0, seed: int = 0) -> None:
        self.ctl = ctl
        self.rng = np.random.default_rng(seed)
        self.noise = noise
        self.done: dict[str, int] = {}

    def report(self, gw: str, now: float, true_gain: float, scale: float = 1.0,
               bandwidth: float = B, **extra: Any) -> None:
        d = self.ctl.current(gw)
        p = d.tx_power_w if d and d.tx_power_w > 0 else P_MAX
        r = B * 0 + bandwidth * math.log2(1 + p * true_gain / (N0 * bandwidth))
        jitter = math.exp(self.noise * float(self.rng.standard_normal()))
        cpu = d.cpu_hz if d else 1.5e9
        head = {}
        if d is not None and d.split > 0:
            o = next(o for o in self.ctl.table.options if o.variant == d.variant)
            head[d.variant] = o.c_head * scale / cpu * 1000.0
        self.done[gw] = self.done.get(gw, 0) + 1
        self.ctl.observe(Telemetry(gateway=gw, ts=now, uplink_bps=r * jitter, tx_power_w=p,
                                   cpu_hz=cpu, head_ms=head, windows_done=self.done[gw],
                                   energy_mj=d.energy_mj if d else None, **extra), now)

    def run(self, gw: str, steps: range, true_gain: float, **kw: Any) -> list[Decision]:
        out = []
        for t in steps:
            self.report(gw, float(t), true_gain, **kw)
            d = self.ctl.decide(gw, float(t))
            if d is not None:
                out.append(d)
        return out


def test_first_decision_is_feasible_numbered_and_valid_for_the_bundle() -> None:
    ctl = OnlineController(config(), MANIFEST, epoch_ms=42)
    Sim(ctl).report("gw1", 0.0, gain(20e6))
    d = ctl.decide("gw1", 0.0)
    assert d is not None
    assert (d.epoch, d.seq, d.policy, d.reason) == (42, 1, "joint", "initial")
    assert d.feasible and d.split >= 1
    assert MANIFEST.variant(d.variant).split == d.split
    assert ctl.decide("gw1", 0.5) is None  # nothing moved, not yet periodic


def test_a_gateway_heard_again_after_being_forgotten_gets_newer_decisions() -> None:
    """A gateway forgotten (its Will after a blip, or silence) keeps running its last
    decision; the next ones must supersede it, or it would ignore them as old."""
    ctl = OnlineController(config(stale_after_s=10.0), MANIFEST, epoch_ms=42)
    sim = Sim(ctl)
    sim.report("gw1", 0.0, gain(20e6))
    sim.report("gw2", 0.0, gain(20e6))
    first = {d.gateway: d for d in ctl.step(0.0)}
    sim.report("gw2", 30.0, gain(20e6))
    ctl.step(30.0)
    assert "gw1" in ctl.gateways, "silent for 30 s: not yet past 4 × stale_after_s"
    sim.report("gw2", 41.0, gain(20e6))
    ctl.step(41.0)
    assert "gw1" not in ctl.gateways and "gw2" in ctl.gateways
    sim.report("gw1", 42.0, gain(20e6))
    again = {d.gateway: d for d in ctl.step(42.0)}
    assert again["gw1"].supersedes(first["gw1"])


def test_a_gateway_whose_solve_fails_is_forgotten_and_the_others_decided() -> None:
    """A report no bound caught (here a clock of 1e308 Hz) must not stop the round."""
    ctl = OnlineController(config(), MANIFEST)
    sim = Sim(ctl)
    sim.report("good", 0.0, gain(20e6))
    ctl.observe(Telemetry(gateway="bad", ts=0.0, cpu_hz=1e308,
                          head_ms={MANIFEST.variants[1].id: 1e-300}), 0.0)
    ctl.gateways["bad"].log_speed.update(1e308)  # a poisoned estimate, however it got in
    out = {d.gateway for d in ctl.step(0.0)}
    assert out == {"good"} and "bad" not in ctl.gateways and ctl.solve_errors == 1


def test_link_drop_moves_the_decision_toward_fewer_bytes() -> None:
    ctl = OnlineController(config(), MANIFEST)
    sim = Sim(ctl)
    sim.run("gw1", range(0, 10), gain(20e6))
    before = ctl.current("gw1")
    sim.run("gw1", range(10, 25), gain(0.3e6))
    after = ctl.current("gw1")
    assert before is not None and after is not None
    sent = {d: ctl.table.options[ctl.table.index(d.variant, d.precision)].s_bytes
            for d in (before, after)}
    assert sent[after] < sent[before]
    assert after.seq > before.seq
    assert after.feasible


def test_noise_does_not_make_it_flap() -> None:
    ctl = OnlineController(config(), MANIFEST)
    decisions = Sim(ctl, noise=0.15, seed=3).run("gw1", range(200), gain(5e6))
    variants = [(d.variant, d.precision) for d in decisions]
    swaps = sum(a != b for a, b in itertools.pairwise(variants))
    assert swaps <= 2


def test_compute_speed_is_estimated_from_head_latency() -> None:
    ctl = OnlineController(config(), MANIFEST)
    Sim(ctl).run("gw1", range(30), gain(20e6), scale=2.0)
    env, _ = ctl.environment("gw1", 30.0)
    assert env.compute_scale == pytest.approx(2.0, rel=1e-6)


def test_a_stale_compute_speed_relaxes_to_the_profile() -> None:
    """A gateway that has run no head for long (it was sent to the server) is planned at its
    profile speed again, or one slow spell would keep it off its own device for good."""
    ctl = OnlineController(config(stale_after_s=10.0), MANIFEST)
    Sim(ctl).run("gw1", range(5), gain(20e6), scale=3.0)
    assert ctl.environment("gw1", 5.0)[0].compute_scale == pytest.approx(3.0, rel=1e-6)
    ctl.observe(Telemetry(gateway="gw1", ts=20.0, link_bps=20e6), 20.0)  # no head ran
    half = ctl.environment("gw1", 4.0 + 15.0)[0].compute_scale
    assert half == pytest.approx(math.sqrt(3.0), rel=1e-6)  # halfway, in log terms
    assert ctl.environment("gw1", 40.0)[0].compute_scale == pytest.approx(1.0)


def test_the_servers_slowdown_is_learned_from_the_tails_it_ran() -> None:
    """Tails running 3x slower than profiled make every transmission 2 profiled tails
    dearer; once no tail has run for long, the configured slowdown is back."""
    ctl = OnlineController(config(stale_after_s=10.0), MANIFEST)
    Sim(ctl).report("gw1", 0.0, gain(20e6))
    t = ctl.table
    o = int(np.flatnonzero(t.transmits & (t.t_tail > 0))[0])
    env0, q0 = ctl.environment("gw1", 0.0)
    for i in range(40):
        ctl.observe_tail(t.options[o].variant, 3.0 * t.t_tail[o] * 1000.0, 0.1 * i)
    env, q = ctl.environment("gw1", 4.0)
    assert env0.slowdown == 1.0 and env.slowdown == pytest.approx(3.0)
    lat0, _ = evaluate(t, env0, env0.f_max_hz, P_MAX, q0)
    lat, _ = evaluate(t, env, env.f_max_hz, P_MAX, q)
    assert lat[o] - lat0[o] == pytest.approx(2 * t.t_tail[o], rel=1e-6)
    assert np.allclose(lat[~t.transmits], lat0[~t.transmits])
    assert ctl.snapshot(4.0)["server_slowdown"] == pytest.approx(3.0)
    assert ctl.environment("gw1", 40.0)[0].slowdown == pytest.approx(1.0)


def test_energy_queue_holds_the_long_term_average() -> None:
    budget = 10.0
    # Everything on the device (floor 4): the unpruned model costs ~18 mJ, ρ=0.25 ~8 mJ.
    free = OnlineController(config(budget={"deadline_ms": 100.0, "privacy_min_split": 4}),
                            MANIFEST)
    capped = OnlineController(config(budget={"deadline_ms": 100.0, "privacy_min_split": 4},
                                     average_energy_mj=budget), MANIFEST)
    means = {}
    for name, ctl in (("free", free), ("capped", capped)):
        sim = Sim(ctl)
        energy, distortion = [], []
        for t in range(400):
            sim.report("gw1", float(t), gain(1e6))
            ctl.decide("gw1", float(t))
            d = ctl.current("gw1")
            assert d is not None
            energy.append(d.energy_mj)
            distortion.append(d.distortion)
        means[name] = (float(np.mean(energy[100:])), float(np.mean(distortion[100:])))
    assert means["free"][0] > budget * 1.5
    assert means["capped"][0] <= budget * 1.05
    # It spends the budget on accuracy rather than always taking the cheapest variant.
    assert means["capped"][1] < ctl.table.distortion[ctl.table.index("r0.25-s4", "fp32")]


def test_gateways_on_one_cell_share_its_bandwidth() -> None:
    ctl = OnlineController(config(), MANIFEST)
    sim = Sim(ctl)
    for gw in ("a", "b", "c"):
        sim.run(gw, range(0, 3), gain(20e6), cell="ap1" if gw != "c" else "ap2")
    assert all(ctl.current(g).split < 4 for g in "abc")  # type: ignore[union-attr]
    assert ctl.environment("a", 3.0)[0].bandwidth_hz == pytest.approx(B / 2)
    assert ctl.environment("c", 3.0)[0].bandwidth_hz == pytest.approx(B)
    alone = OnlineController(config(bandwidth_sharing="none"), MANIFEST)
    sim = Sim(alone)
    for gw in ("a", "b"):
        sim.run(gw, range(0, 3), gain(20e6), cell="ap1")
    assert alone.environment("a", 3.0)[0].bandwidth_hz == pytest.approx(B)


def test_server_queueing_grows_with_load() -> None:
    ctl = OnlineController(config(budget={"deadline_ms": 200.0}, server_workers=1), MANIFEST)
    sim = Sim(ctl)
    sim.run("g0", range(3), gain(20e6), windows_per_s=5.0)
    one = float(ctl.environment("g0", 3.0)[1].max())
    for i in range(1, 30):
        sim.run(f"g{i}", range(3), gain(20e6), windows_per_s=5.0)
    many = float(ctl.environment("g0", 3.0)[1].max())
    assert many > one
    ctl.observe_server(queue_ms=500.0)
    assert float(ctl.environment("g0", 3.0)[1].min()) >= 0.5 * (1 - ctl.config.ewma_alpha) - 1e-9


def test_stale_gain_relaxes_to_nominal() -> None:
    ctl = OnlineController(config(stale_after_s=10.0), MANIFEST)
    Sim(ctl).run("gw1", range(5), gain(0.2e6))
    low = ctl.environment("gw1", 5.0)[0].gain
    assert low < gain(1e6)
    # No more uplink measurements: after 2 × stale_after_s the nominal gain is back.
    ctl.observe(Telemetry(gateway="gw1", ts=40.0), 40.0)
    assert ctl.environment("gw1", 40.0)[0].gain == pytest.approx(ctl.config.link.gain)


def test_fixed_split_keeps_its_variant() -> None:
    ctl = OnlineController(config(policy="fixed-split"), MANIFEST)
    sim = Sim(ctl)
    decisions = sim.run("gw1", range(10), gain(20e6)) + sim.run("gw1", range(10, 20), gain(1e6))
    assert len({d.variant for d in decisions}) == 1


def test_device_only_never_transmits() -> None:
    ctl = OnlineController(config(policy="device-only",
                                  budget={"deadline_ms": 100.0}), MANIFEST)
    for d in Sim(ctl).run("gw1", range(10), gain(20e6)):
        assert d.split == 4 and d.tx_power_w == 0.0
        assert not d.server_probes, "what a server probe measures is of no use to it"


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValidationError, match="extra"):
        config(colour="blue")
    with pytest.raises(ValidationError, match="ewma_alpha"):
        config(ewma_alpha=0.0)
    with pytest.raises(ValidationError, match="f_max_hz"):
        config(device={"f_min_hz": 2e9, "f_max_hz": 1e9, "kappa": 1e-28})
    assert all(f.description for f in ControllerConfig.model_fields.values())


def test_rate_model_agrees_with_the_simulated_measurement() -> None:
    ctl = OnlineController(config(gain_backoff_sigma=0.0), MANIFEST)
    Sim(ctl).run("gw1", range(5), gain(3e6))
    env, _ = ctl.environment("gw1", 5.0)
    assert float(rate_bps(P_MAX, env)) == pytest.approx(3e6, rel=1e-6)


def test_step_settles_a_shared_cell_in_one_round() -> None:
    ctl = OnlineController(config(budget={"deadline_ms": 60.0, "privacy_min_split": 0}),
                           MANIFEST)
    sim = Sim(ctl)
    for i in range(6):
        sim.report(f"g{i}", 0.0, gain(20e6), cell="ap")
    for t in range(1, 4):
        decisions = ctl.step(float(t))
        assert len({d.gateway for d in decisions}) == len(decisions)
        sending = [g for g in ctl.gateways if ctl.current(g).split < 4]  # type: ignore[union-attr]
        # Every transmitting gateway planned with the share it really gets.
        for g in sending:
            assert ctl.environment(g, float(t))[0].bandwidth_hz == pytest.approx(B / len(sending))
        for i in range(6):
            sim.report(f"g{i}", float(t), gain(20e6), cell="ap")


def test_latency_margin_is_for_planning_only() -> None:
    ctl = OnlineController(config(latency_margin=0.2, budget={"deadline_ms": 60.0}), MANIFEST)
    Sim(ctl).report("gw1", 0.0, gain(20e6))
    d = ctl.decide("gw1", 0.0)
    assert d is not None and d.feasible
    assert d.latency_ms <= 60.0 * 0.8 * (1 + 1e-9)


def test_plans_keep_back_the_gateways_fallback_reserve() -> None:
    """A transmitting decision leaves the gateway time to fall back within the deadline."""
    from edgetok.control import FALLBACK_MARGIN, FALLBACK_SLACK_S

    fast = synthetic_manifest(num_layers=4, ratios=(0.0, 0.5), layer_ms=1.0)
    ctl = OnlineController(config(policy="server-only",
                                  budget={"deadline_ms": 60.0, "privacy_min_split": 0}), fast)
    Sim(ctl).report("gw1", 0.0, gain(20e6))
    env, _ = ctl.environment("gw1", 0.0)
    reserve = ctl.fallback_reserve(env)
    table = ctl.table
    fb = table.options[ctl.fallback(env)]
    assert fb.split == table.num_layers
    want = FALLBACK_MARGIN * fb.c_head * env.compute_scale / env.f_max_hz + FALLBACK_SLACK_S
    for i, o in enumerate(table.options):
        expect = 0.0 if o.split == table.num_layers or want >= env.deadline_s else want
        assert reserve[i] == pytest.approx(expect)
    d = ctl.decide("gw1", 0.0)
    assert d is not None and d.split == 0 and d.feasible
    assert d.fallback_variant == fb.variant and d.fallback_cpu_hz == env.f_max_hz
    i = table.index(d.variant, d.precision)
    assert reserve[i] > 0
    assert d.latency_ms / 1000 + reserve[i] <= env.deadline_s * (1 + 1e-6)


def test_fallback_is_the_best_device_option_that_makes_the_deadline() -> None:
    """Least distortion among on-device options fast enough at f_max; else the fastest."""
    slow = synthetic_manifest(num_layers=4, ratios=(0.0, 0.5, 0.75), layer_ms=10.0)
    for deadline_ms in (1000.0, 30.0, 0.01):
        ctl = OnlineController(config(budget={"deadline_ms": deadline_ms}), slow)
        env, _ = ctl.environment("gw1", 0.0)
        table = ctl.table
        dev = [i for i, o in enumerate(table.options) if o.split == table.num_layers]
        run = {i: table.c_head[i] * env.compute_scale / env.f_max_hz for i in dev}
        fits = [i for i in dev if run[i] <= env.deadline_s]
        want = (min(fits, key=lambda i: (table.distortion[i], table.c_head[i])) if fits
                else min(dev, key=lambda i: table.c_head[i]))
        assert ctl.fallback(env) == want, deadline_ms


def test_latency_preference_ranks_transmissions_without_their_fallback_reserve() -> None:
    """prefer=latency: a server path faster than the device is chosen, even though the
    fallback reserve it must keep back would exceed the device's own run time."""
    slow_device = synthetic_manifest(num_layers=4, ratios=(0.0,), layer_ms=10.0,
                                     server_speedup=20.0)
    ctl = OnlineController(config(prefer="latency", server={"slowdown": 1.0, "queue_ms": 0.5},
                                  budget={"deadline_ms": 400.0, "privacy_min_split": 0}),
                           slow_device)
    Sim(ctl).report("gw1", 0.0, gain(20e6))
    env, queue = ctl.environment("gw1", 0.0)
    table = ctl.table
    reserve = ctl.fallback_reserve(env)
    sol = solve_options(table, env, queue, "latency")
    dev = next(i for i, o in enumerate(table.options) if o.split == table.num_layers)
    fast = int(np.argmin(np.where(table.transmits, sol.latency - reserve, np.inf)))
    # The premise: with the reserve folded in the server path looks slower than the device,
    # without it faster.
    assert sol.latency[fast] > sol.latency[dev] > sol.latency[fast] - reserve[fast]
    d = ctl.decide("gw1", 0.0)
    assert d is not None and d.feasible and d.split < table.num_layers


def _slow_device_controller(deadline_ms: float, **kw: Any) -> OnlineController:
    """prefer=latency on a device 20x slower than the server, after one report."""
    slow_device = synthetic_manifest(num_layers=4, ratios=(0.0,), layer_ms=10.0,
                                     server_speedup=20.0)
    ctl = OnlineController(config(prefer="latency", server={"slowdown": 1.0, "queue_ms": 0.5},
                                  budget={"deadline_ms": deadline_ms, "privacy_min_split": 0},
                                  **kw), slow_device)
    Sim(ctl).report("gw1", 0.0, gain(20e6))
    return ctl


def _on_the_server_with_the_sure_reserve(
) -> tuple[OnlineController, Decision, Environment, np.ndarray, int]:
    """The slow device's controller at a roomy deadline: its first decision (a server path
    with the sure reserve), environment, per-option queueing and that option's index."""
    from edgetok.control import FALLBACK_MARGIN

    ctl = _slow_device_controller(400.0)
    first = ctl.decide("gw1", 0.0)
    assert first is not None and first.split < ctl.table.num_layers
    assert first.fallback_margin == FALLBACK_MARGIN
    env, queue = ctl.environment("gw1", 0.0)
    return ctl, first, env, queue, ctl.table.index(first.variant, first.precision)


def _lean_deadline_ms() -> tuple[float, str]:
    """A deadline whose planning share (0.9) the server path the slow device's controller
    chooses meets with the lean fallback reserve, not with the sure one, while the sure
    reserve still fits in it (a reserve that does not is no reserve at all); and that
    option's variant."""
    from edgetok.control import LEAN_FALLBACK_MARGIN

    probe = _slow_device_controller(400.0)
    roomy = probe.decide("gw1", 0.0)
    assert roomy is not None and roomy.split < probe.table.num_layers
    env, queue = probe.environment("gw1", 0.0)
    i = probe.table.index(roomy.variant, roomy.precision)
    sure = float(probe.fallback_reserve(env)[i])
    lean = float(probe.fallback_reserve(env, margin=LEAN_FALLBACK_MARGIN)[i])
    bare = float(solve_options(probe.table, env, queue, "latency").latency[i]) - sure
    low, high = max(bare + lean, sure), bare + sure
    assert low < high
    return (low + high) / 2 / 0.9 * 1e3, roomy.variant


def test_a_server_path_the_sure_reserve_shuts_out_is_planned_with_the_lean_one() -> None:
    """Where the sure fallback reserve leaves the server's reply no time but the lean one
    does, the server path is chosen with the lean reserve and the decision says so; where
    the sure one fits, it is kept; with lean_fallback off, the device runs."""
    from edgetok.control import FALLBACK_MARGIN, LEAN_FALLBACK_MARGIN

    tight_ms, variant = _lean_deadline_ms()
    ctl = _slow_device_controller(tight_ms)
    table = ctl.table
    env, _ = ctl.environment("gw1", 0.0)
    dev = next(i for i, o in enumerate(table.options) if o.split == table.num_layers)
    # The premise: the device alone makes the deadline.
    assert table.c_head[dev] * env.compute_scale / env.f_max_hz < env.deadline_s
    d = ctl.decide("gw1", 0.0)
    assert d is not None and d.feasible and d.variant == variant
    assert d.fallback_margin == LEAN_FALLBACK_MARGIN
    sure_only = _slow_device_controller(tight_ms, lean_fallback=False).decide("gw1", 0.0)
    assert sure_only is not None and sure_only.split == table.num_layers
    assert sure_only.fallback_margin is None  # nothing to fall back from
    roomy = _slow_device_controller(400.0).decide("gw1", 0.0)
    assert roomy is not None and roomy.variant == variant
    assert roomy.fallback_margin == FALLBACK_MARGIN


def test_a_decision_that_moves_to_the_lean_reserve_is_republished() -> None:
    """The same option, planned with the lean reserve after the sure one, is news to the
    gateway: its cutoff moves."""
    from edgetok.control import FALLBACK_MARGIN, LEAN_FALLBACK_MARGIN

    tight_ms, variant = _lean_deadline_ms()
    ctl = _slow_device_controller(400.0)
    first = ctl.decide("gw1", 0.0)
    assert first is not None and first.fallback_margin == FALLBACK_MARGIN
    Sim(ctl).report("gw1", 1.0, gain(20e6), deadline_ms=tight_ms)
    d = ctl.decide("gw1", 1.0)
    assert d is not None and d.seq > first.seq and d.variant == variant
    assert d.fallback_margin == LEAN_FALLBACK_MARGIN


def test_the_reserve_is_planned_from_the_fallback_run_the_gateway_measured() -> None:
    """The gateway sizes its reserve from its own runs of the fallback; reported, they size
    the plan's too, at once: a run slower than the coordinator's speed estimate says moves a
    server path the sure reserve no longer leaves room for to the lean one. A figure for
    another variant than the planned fallback is not that run."""
    from edgetok.control import FALLBACK_MARGIN, FALLBACK_SLACK_S, LEAN_FALLBACK_MARGIN

    ctl, first, env, queue, i = _on_the_server_with_the_sure_reserve()
    fb = ctl.fallback(env)
    modelled = float(ctl.table.c_head[fb]) * env.compute_scale / env.f_max_hz
    bare = float(solve_options(ctl.table, env, queue, "latency").latency[i]) \
        - float(ctl.fallback_reserve(env)[i])
    # A run whose sure reserve (still under the planning deadline, or none would be kept)
    # leaves the reply no room, while its lean one does.
    room = env.deadline_s - FALLBACK_SLACK_S
    low = (room - bare) / FALLBACK_MARGIN
    high = min(room / FALLBACK_MARGIN, (room - bare) / LEAN_FALLBACK_MARGIN)
    assert modelled < low < high
    run_s = (low + high) / 2

    other = _slow_device_controller(400.0)
    other.decide("gw1", 0.0)
    Sim(other).report("gw1", 1.0, gain(20e6), fallback_variant="not-the-fallback",
                      fallback_ms=run_s * 1e3)
    assert other.decide("gw1", 1.0) is None, "another variant's run moved the plan"

    Sim(ctl).report("gw1", 1.0, gain(20e6), fallback_variant=ctl.table.options[fb].variant,
                    fallback_ms=run_s * 1e3)
    _, measured = ctl.environment("gw1", 1.0)
    assert measured[i] - queue[i] == pytest.approx(FALLBACK_MARGIN * (run_s - modelled),
                                                   rel=1e-3)
    d = ctl.decide("gw1", 1.0)
    assert d is not None and d.variant == first.variant and d.seq > first.seq
    assert d.fallback_margin == LEAN_FALLBACK_MARGIN


def test_a_slow_spell_that_ended_is_left_behind_after_a_few_fast_reports() -> None:
    """A gateway whose first head reports came in a boot storm (50x its profile) and whose
    later ones are back at 4x: three fast reports in a row restart the estimate at their
    level, where clipped steps alone would take dozens. One fast report is not enough, nor
    are reports only a quota grid's step faster."""
    cpu = 1.5e9

    def report(ctl: OnlineController, t: float, scale: float) -> float:
        o = next(o for o in ctl.table.options if 0 < o.split < ctl.table.num_layers)
        ms = o.c_head * scale / cpu * 1000.0
        ctl.observe(Telemetry(gateway="a", ts=t, cpu_hz=cpu, head_ms={o.variant: ms}), t)
        return ctl.environment("a", t)[0].compute_scale

    ctl, clipped = (OnlineController(config(**kw), MANIFEST)
                    for kw in ({}, {"speed_fall_reports": 0}))
    for c in (ctl, clipped):
        for t in range(3):
            report(c, float(t), 50.0)
    assert report(ctl, 3.0, 4.0) > 20.0, "one fast report moved the estimate"
    assert report(ctl, 4.0, 4.0) > 20.0
    assert report(ctl, 5.0, 4.0) == pytest.approx(4.0, rel=0.05)
    assert min(report(clipped, float(t), 4.0) for t in range(3, 6)) > 20.0, "it lingers"
    # Settled, and then fast reports off a CPU quota's grid (38 ms where 48 is usual): not
    # a step, however small the spread has become (a restart would put it at 3.17).
    for t in range(6, 30):
        report(ctl, float(t), 4.0)
    assert min(report(ctl, float(t), 3.17) for t in range(30, 33)) > 3.25


def test_a_device_sent_there_by_a_slow_fallback_run_returns_when_its_runs_are_faster(
        ) -> None:
    """A fallback run so slow that even the lean reserve leaves the reply no room sends the
    gateway to its device; there its windows run that fallback, and once it reports them
    faster, the server path comes back. (The gateway reported its fallback only while
    transmitting: a 10% gateway whose first probe read 58 ms ran its device for the rest
    of an e2e round at 39, run 37.)"""
    from edgetok.control import FALLBACK_MARGIN, FALLBACK_SLACK_S

    # As at 10% of a core in e2e: the fallback takes about 1.5x the server path.
    manifest = synthetic_manifest(num_layers=4, ratios=(0.0,), layer_ms=5.0, server_speedup=2.0)
    ctl = OnlineController(config(prefer="latency", server={"slowdown": 1.0, "queue_ms": 0.5},
                                  budget={"deadline_ms": 1000.0, "privacy_min_split": 0}),
                         manifest)
    sim = Sim(ctl)
    sim.run("gw1", range(0, 20), gain(5e6))  # the link's estimate settles
    path = ctl.current("gw1")
    assert path is not None and path.split < ctl.table.num_layers
    env, queue = ctl.environment("gw1", 19.0)
    i, fb = ctl.table.index(path.variant, path.precision), ctl.fallback(env)
    bare = float(solve_options(ctl.table, env, queue, "latency").latency[i]) \
        - float(ctl.fallback_reserve(env)[i])
    modelled = float(ctl.table.c_head[fb]) * env.compute_scale / env.f_max_hz
    # A deadline under which, with the lean reserve, the modelled run leaves the reply room
    # (`low` > modelled) and a slower run does not, while its sure reserve, short of the
    # deadline, is still kept (`high` > `low`: one past the deadline is no reserve at all).
    s = FALLBACK_SLACK_S
    least, most = (modelled + bare + s) / 0.9, (bare + s - s / FALLBACK_MARGIN) / (
        0.9 - 1 / FALLBACK_MARGIN)
    assert least < most
    deadline_s = (least + most) / 2
    low, high = 0.9 * deadline_s - bare - s, (deadline_s - s) / FALLBACK_MARGIN
    name = ctl.table.options[fb].variant
    sim.report("gw1", 20.0, gain(5e6), deadline_ms=deadline_s * 1e3, fallback_variant=name,
               fallback_ms=modelled * 1e3)
    first = ctl.decide("gw1", 20.0, force=True) or ctl.current("gw1")
    assert first is not None and first.variant == path.variant and first.feasible
    sim.report("gw1", 21.0, gain(5e6), fallback_variant=name, fallback_ms=(low + high) / 2e-3)
    d = ctl.decide("gw1", 21.0, force=True)  # (a 4% move: due at the periodic re-solve)
    assert d is not None and d.split == ctl.table.num_layers and d.variant == name
    for t in map(float, range(22, 28)):
        sim.report("gw1", t, gain(5e6), fallback_variant=name, fallback_ms=modelled * 1e3)
        ctl.decide("gw1", t)
    back = ctl.current("gw1")
    assert back is not None and back.variant == path.variant and back.feasible


def test_replies_the_gateway_cut_off_under_the_sure_reserve_get_the_lean_one_at_once(
        ) -> None:
    """A gateway that reports replies cut off under the sure reserve of the option in force
    has that option re-solved with the lean one at the next step, not after its windows'
    residual has crept up over several reports, and kept on it for a while. A report from
    an older option's windows, or none cut off, changes nothing."""
    from edgetok.control import FALLBACK_MARGIN, LEAN_FALLBACK_MARGIN

    ctl, first, _, _, _ = _on_the_server_with_the_sure_reserve()
    sim = Sim(ctl)
    sim.report("gw1", 1.0, gain(20e6), applied_seq=first.seq, cut_off=0)
    assert ctl.decide("gw1", 1.0) is None
    sim.report("gw1", 2.0, gain(20e6), applied_seq=first.seq - 1, cut_off=3)
    assert ctl.decide("gw1", 2.0) is None, "cut off under an older option"
    sim.report("gw1", 3.0, gain(20e6), applied_seq=first.seq, cut_off=2)
    d = ctl.decide("gw1", 3.0)
    assert d is not None and d.variant == first.variant and d.reason == "cut-off"
    assert d.fallback_margin == LEAN_FALLBACK_MARGIN
    # It holds for stale_after_s, though the model fits the sure reserve with room to spare
    # here (released at the next solve, the reserve flipped every few seconds); then the
    # sure one comes back.
    ctl.decide("gw1", 10.0, force=True)
    held = ctl.current("gw1")
    assert held is not None and held.fallback_margin == LEAN_FALLBACK_MARGIN
    ctl.decide("gw1", 3.0 + ctl.config.stale_after_s + 1.0)
    back = ctl.current("gw1")
    assert back is not None and back.fallback_margin == FALLBACK_MARGIN


def test_a_reply_its_windows_say_the_sure_reserve_cuts_off_gets_the_lean_one() -> None:
    """The gateway cuts a reply off by what its windows take, not by the model: a server
    path that fits the sure reserve on the model by 2% but whose windows run a tenth of the
    deadline over their plan is moved to the lean reserve."""
    from edgetok.control import FALLBACK_MARGIN, LEAN_FALLBACK_MARGIN

    probe = _slow_device_controller(400.0)
    roomy = probe.decide("gw1", 0.0)
    assert roomy is not None and roomy.split < probe.table.num_layers
    env, queue = probe.environment("gw1", 0.0)
    i = probe.table.index(roomy.variant, roomy.precision)
    planned = float(solve_options(probe.table, env, queue, "latency").latency[i])
    deadline_ms = planned / 0.9 * 1.02 * 1e3
    ctl = _slow_device_controller(deadline_ms)
    first = ctl.decide("gw1", 0.0)
    assert first is not None and first.variant == roomy.variant
    assert first.fallback_margin == FALLBACK_MARGIN
    sim = Sim(ctl)
    for t in map(float, range(1, 10)):
        d = ctl.current("gw1")
        assert d is not None
        sim.report("gw1", t, gain(20e6), applied_seq=d.seq,
                   window_ms={d.variant: first.latency_ms + 0.1 * deadline_ms})
        ctl.decide("gw1", t)
    last = ctl.current("gw1")
    assert last is not None and last.variant == first.variant and last.feasible
    assert last.fallback_margin == LEAN_FALLBACK_MARGIN


def test_a_lean_reserve_goes_back_to_the_sure_one_only_with_room_to_spare() -> None:
    """Windows that fit the sure cutoff again, but only just, keep the lean reserve in force
    (within LEAN_RELEASE_FRAC of the planning deadline); with room to spare, the sure one
    comes back. Without that band the reserve flipped every few seconds at 10% of a core."""
    from edgetok.agent.coordinator.online import LEAN_RELEASE_FRAC
    from edgetok.control import FALLBACK_MARGIN, LEAN_FALLBACK_MARGIN

    probe = _slow_device_controller(400.0)
    roomy = probe.decide("gw1", 0.0)
    assert roomy is not None
    env, queue = probe.environment("gw1", 0.0)
    i = probe.table.index(roomy.variant, roomy.precision)
    planned = float(solve_options(probe.table, env, queue, "latency").latency[i])
    ctl = _slow_device_controller(planned / 0.9 / 0.7 * 1e3)  # the model fits in 70%
    first = ctl.decide("gw1", 0.0)
    assert first is not None and first.variant == roomy.variant
    assert first.fallback_margin == FALLBACK_MARGIN
    env, _ = ctl.environment("gw1", 0.0)
    deadline_ms, sure_ms = env.deadline_s * 1e3, float(ctl.fallback_reserve(env)[i]) * 1e3
    sim = Sim(ctl)

    def windows_over_plan(share: float, reports: int = 20) -> float:
        """Windows whose expected latency plus the sure reserve is `share` of the planning
        deadline; the share the coordinator then sees."""
        t0 = max(ctl.gateways["gw1"].solved_ts, 0.0) + 1.0
        over = share * deadline_ms - sure_ms - first.latency_ms
        for t in map(float, range(int(t0), int(t0) + reports)):
            d = ctl.current("gw1")
            assert d is not None
            sim.report("gw1", t, gain(20e6), applied_seq=d.seq,
                       window_ms={d.variant: first.latency_ms + over})
            ctl.decide("gw1", t)
        seen = ctl.snapshot(t)["gateways"]["gw1"]["residual_ms"]["transmit"]
        return (first.latency_ms + seen + sure_ms) / deadline_ms

    assert windows_over_plan(1.05) > 1.0
    d = ctl.current("gw1")
    assert d is not None and d.variant == first.variant
    assert d.fallback_margin == LEAN_FALLBACK_MARGIN
    assert 1 - LEAN_RELEASE_FRAC < windows_over_plan(0.95) < 1.0
    d = ctl.current("gw1")
    assert d is not None and d.fallback_margin == LEAN_FALLBACK_MARGIN, "released at once"
    assert windows_over_plan(0.8) < 1 - LEAN_RELEASE_FRAC
    d = ctl.current("gw1")
    assert d is not None and d.variant == first.variant
    assert d.fallback_margin == FALLBACK_MARGIN


def test_a_reserve_past_the_plans_share_of_the_deadline_is_still_planned() -> None:
    """The gateway keeps its reserve unless it reaches past the real deadline. One between
    the plan's share of the deadline (0.9) and the deadline is kept there, so the plan keeps
    it too: planned as none, the server path looked free while the gateway cut every reply
    off and ran its fallback."""
    from edgetok.control import FALLBACK_MARGIN, FALLBACK_SLACK_S, LEAN_FALLBACK_MARGIN

    ctl, first, env, queue, i = _on_the_server_with_the_sure_reserve()
    fb = ctl.fallback(env)
    without = queue[i] - float(ctl.fallback_reserve(env)[i])
    sure_s = 0.95 * 0.4  # past the planning deadline (0.36 s), short of the real one
    run_s = (sure_s - FALLBACK_SLACK_S) / FALLBACK_MARGIN
    Sim(ctl).report("gw1", 1.0, gain(20e6), fallback_variant=ctl.table.options[fb].variant,
                    fallback_ms=run_s * 1e3)
    env, queue = ctl.environment("gw1", 1.0)
    assert sure_s > env.deadline_s
    assert queue[i] - without == pytest.approx(sure_s, rel=1e-3)
    d = ctl.decide("gw1", 1.0)
    assert d is not None and d.variant == first.variant
    assert d.fallback_margin == LEAN_FALLBACK_MARGIN


def test_frame_overhead_is_charged_per_frame_not_to_the_rate() -> None:
    # A 10 Mbit/s link whose replies also spend 8 ms per frame off the wire. Read as goodput,
    # the overhead would look like a slow link, costing big frames far more than small ones.
    ctl = OnlineController(config(), MANIFEST)
    t = ctl.table
    ctl.observe(Telemetry(gateway="a", ts=0.0, link_bps=10e6, frame_overhead_ms=8.0,
                          uplink_bps=1e6, tx_power_w=P_MAX), 0.0)
    env, queue = ctl.environment("a", 0.0)
    alone = OnlineController(config(), MANIFEST)  # no fleet to borrow an overhead from
    alone.observe(Telemetry(gateway="b", ts=0.0, tx_power_w=P_MAX, link_bps=10e6), 0.0)
    env_b, plain = alone.environment("b", 0.0)
    assert env.gain == pytest.approx(env_b.gain)  # the rate is the sensed one, not goodput
    tx = t.transmits
    assert np.allclose(queue[tx] - plain[tx], 0.008)
    lat_a, _ = evaluate(t, env, env.f_max_hz, P_MAX, queue)
    lat_b, _ = evaluate(t, env_b, env.f_max_hz, P_MAX, plain)
    assert np.allclose(lat_a[tx] - lat_b[tx], 0.008)
    assert np.allclose(lat_a[~tx], lat_b[~tx])  # on-device options send nothing
    # Goodput alone (no overhead reported) goes back to charging everything to the rate.
    ctl.observe(Telemetry(gateway="a", ts=1.0, uplink_bps=1e6, tx_power_w=P_MAX), 1.0)
    _, after = ctl.environment("a", 1.0)
    assert np.allclose(after[tx], plain[tx])


def _newcomer_ranks(rate: float, deadline_ms: float = 1000.0) -> tuple[int, int, int]:
    """A gateway's first report (its gain still carries the 6 dB prior): the fastest option
    at the gain's mean, the fastest at the backed-off gain, and the option decided."""
    ctl = OnlineController(config(prefer="latency", budget={"deadline_ms": deadline_ms}),
                           TIED)
    ctl.observe(Telemetry(gateway="a", ts=0.0, link_bps=rate, tx_power_w=P_MAX), 0.0)
    fastest = []
    for expected in (True, False):
        env, queue = ctl.environment("a", 0.0, expected=expected)
        lat, _ = evaluate(ctl.table, env, env.f_max_hz, P_MAX, queue)
        fastest.append(int(np.argmin(lat - ctl.fallback_reserve(env))))
    assert ctl.decide("a", 0.0) is not None
    return fastest[0], fastest[1], int(ctl.gateways["a"].option or 0)


def test_options_are_ranked_at_the_gains_mean_and_kept_feasible_at_its_backoff() -> None:
    """A newcomer's link is uncertain, so the deadline is checked at its gain backed off;
    but the option that is fastest for the median window is the one at the mean (ranked at
    the backoff, a 10% gateway ran its device for 5-8 s of every e2e round at 0.5 Mbit/s
    where the server was 1.2x faster)."""
    tx = OnlineController(config(), TIED).table.transmits
    ranks = {float(r): _newcomer_ranks(float(r)) for r in np.geomspace(1e5, 1e8, 31)}
    split = [r for r, (mean, backed, _) in ranks.items() if tx[mean] and not tx[backed]]
    assert split, "the premise: a rate where the mean and the backoff disagree"
    rate = split[len(split) // 2]
    mean_best, _, chosen = ranks[rate]
    assert tx[chosen] and ranks[rate][2] == mean_best
    # Where both agree, nothing changes: the device when it is faster either way.
    assert any(not tx[m] and not tx[b] and not tx[c] for m, b, c in ranks.values())
    # A deadline the transmitting option meets at the mean but not backed off, even with
    # the lean fallback reserve: not taken.
    ctl = OnlineController(config(prefer="latency"), TIED)
    ctl.observe(Telemetry(gateway="a", ts=0.0, link_bps=rate, tx_power_w=P_MAX), 0.0)
    env, queue = ctl.environment("a", 0.0)
    queue = queue - ctl.fallback_reserve(env) + ctl.fallback_reserve(env, margin=1.0)
    backed = evaluate(ctl.table, env, env.f_max_hz, P_MAX, queue)[0][mean_best]
    tight = float(backed) * 1e3 * 0.95 / (1 - ctl.config.latency_margin)
    assert not tx[_newcomer_ranks(rate, deadline_ms=tight)[2]]


def test_a_frame_floor_is_hidden_by_a_longer_airtime_not_added_to_it() -> None:
    """A gateway whose frames wait 16 ms to leave whatever their size (a 10% CPU quota
    refilling) pays that wait inside a longer frame's airtime: a frame is planned at
    max(airtime, floor) + overhead, not airtime + floor + overhead (e2e run 18, Pi trace)."""
    ctl = OnlineController(config(), MANIFEST)
    t = ctl.table
    ctl.observe(Telemetry(gateway="a", ts=0.0, link_bps=10e6, frame_overhead_ms=2.5,
                          frame_floor_ms=16.0, tx_power_w=P_MAX), 0.0)
    env, queue = ctl.environment("a", 0.0)
    alone = OnlineController(config(), MANIFEST)
    alone.observe(Telemetry(gateway="b", ts=0.0, tx_power_w=P_MAX, link_bps=10e6), 0.0)
    plain = alone.environment("b", 0.0)[1]
    airtime = t.bits / rate_bps(P_MAX, env)  # at the planned (backed-off) rate
    tx = t.transmits
    short, long_ = tx & (airtime < 0.014), tx & (airtime > 0.018)
    assert short.any() and long_.any(), "the premise: frames on both sides of the floor"
    extra = queue - plain
    assert np.allclose(extra[short], 0.0025 + 0.016 - airtime[short])
    assert np.allclose(extra[long_], 0.0025)
    # So a short frame takes the floor and a long one its airtime, plus the overhead.
    lat, _ = evaluate(t, env, env.f_max_hz, P_MAX, queue)
    base, _ = evaluate(t, env, env.f_max_hz, P_MAX, plain)
    assert np.allclose((lat - base + airtime)[short], 0.016 + 0.0025)
    # No floor reported (older gateways, real radios): one overhead per frame, as before.
    ctl.observe(Telemetry(gateway="a", ts=1.0, link_bps=10e6, frame_overhead_ms=2.5,
                          tx_power_w=P_MAX), 1.0)
    assert np.allclose((ctl.environment("a", 1.0)[1] - plain)[tx], 0.0025)


def test_goodput_is_not_read_as_the_link_rate_while_a_sensed_rate_awaits_its_overhead(
        ) -> None:
    """A gateway reports its overhead only from a few replies on; the reports before carry
    the goodput of its first frames (0.4 Mbit/s on a 50 Mbit/s link in e2e run 20). The
    gain stays the sensed rate's and the overhead the last one known."""
    ctl = OnlineController(config(), MANIFEST)
    ctl.observe(Telemetry(gateway="a", ts=0.0, link_bps=50e6, frame_overhead_ms=3.0,
                          uplink_bps=20e6, tx_power_w=P_MAX), 0.0)
    ctl.observe(Telemetry(gateway="a", ts=1.0, link_bps=50e6, uplink_bps=0.4e6,
                          tx_power_w=P_MAX), 1.0)
    sensed = OnlineController(config(), MANIFEST)
    for ts in (0.0, 1.0):
        sensed.observe(Telemetry(gateway="a", ts=ts, link_bps=50e6, tx_power_w=P_MAX), ts)
    env, queue = ctl.environment("a", 1.0)
    env_s, queue_s = sensed.environment("a", 1.0)
    assert env.gain == pytest.approx(env_s.gain)
    tx = ctl.table.transmits
    assert np.allclose(queue[tx] - queue_s[tx], 0.003)


def test_a_newcomer_borrows_the_fleets_frame_overhead_until_it_has_its_own() -> None:
    """The broker's hops are the same for every gateway of a server: one that has sent no
    frame yet plans with the median of the others' fresh overheads, not with none."""
    ctl = OnlineController(config(), MANIFEST)
    tx = ctl.table.transmits
    for gw, ms in (("a", 2.0), ("b", 3.0), ("c", 40.0)):  # c: a slow gateway, an outlier
        ctl.observe(Telemetry(gateway=gw, ts=0.0, link_bps=10e6, frame_overhead_ms=ms,
                              tx_power_w=P_MAX), 0.0)
    ctl.observe(Telemetry(gateway="new", ts=0.0, link_bps=10e6, tx_power_w=P_MAX), 0.0)
    alone = OnlineController(config(), MANIFEST)
    alone.observe(Telemetry(gateway="new", ts=0.0, link_bps=10e6, tx_power_w=P_MAX), 0.0)
    borrowed = ctl.environment("new", 1.0)[1] - alone.environment("new", 1.0)[1]
    assert np.allclose(borrowed[tx], 0.003)  # (the model charges it to transmissions only)
    # Its own first measurement wins at once ...
    ctl.observe(Telemetry(gateway="new", ts=2.0, link_bps=10e6, frame_overhead_ms=10.0,
                          tx_power_w=P_MAX), 2.0)
    own = ctl.environment("new", 2.0)[1] - alone.environment("new", 2.0)[1]
    assert np.allclose(own[tx], 0.010)
    # ... and stale figures, the fleet's included, count for nothing.
    late = 10 * ctl.config.stale_after_s
    gone = ctl.environment("new", late)[1] - alone.environment("new", late)[1]
    assert np.allclose(gone[tx], 0.0)


def test_a_stale_frame_overhead_relaxes_so_the_server_is_tried_again() -> None:
    ctl = OnlineController(config(), MANIFEST)
    tx = ctl.table.transmits
    ctl.observe(Telemetry(gateway="a", ts=0.0, link_bps=10e6, frame_overhead_ms=40.0,
                          tx_power_w=P_MAX), 0.0)
    stale = ctl.config.stale_after_s
    fresh = ctl.environment("a", stale)[1]
    half = ctl.environment("a", 1.5 * stale)[1]
    gone = ctl.environment("a", 2 * stale)[1]
    assert np.allclose(fresh[tx] - gone[tx], 0.040)
    assert np.allclose(half[tx] - gone[tx], 0.020)


def _planned_gain_after_recovery(rise_reports: int, fall_reports: int = 3) -> list[float]:
    """Planned gain at the last report of a 0.3 Mbit/s spell, then over the 6 reports after
    the link recovers to 20 Mbit/s."""
    ctl = OnlineController(config(gain_rise_reports=rise_reports,
                                  gain_fall_reports=fall_reports), MANIFEST)
    sim = Sim(ctl)
    sim.run("gw1", range(0, 10), gain(20e6))
    sim.run("gw1", range(10, 20), gain(0.3e6))
    out = [ctl.environment("gw1", 19.0)[0].gain]
    for t in range(20, 26):
        sim.run("gw1", range(t, t + 1), gain(20e6))
        out.append(ctl.environment("gw1", float(t))[0].gain)
    return out


def test_a_recovered_link_is_planned_at_its_new_level_within_a_few_reports() -> None:
    """The step back up must not count as fading: three reports above the planning band and
    the estimate restarts there. Left to the Ewma, the step's own variance keeps the plan
    far below the recovered link for many more reports."""
    quick, slow = _planned_gain_after_recovery(3)[1:], _planned_gain_after_recovery(0, 0)[1:]
    true = gain(20e6)
    assert quick[2] > 0.3 * true, "planned at the new level after the third report"
    assert slow[2] < 0.01 * true and slow[5] < 0.1 * true
    assert all(q >= s for q, s in zip(quick, slow, strict=True))


@pytest.mark.parametrize("rise_reports", [3, 0])
@pytest.mark.parametrize("fall_reports", [3, 0])
def test_a_better_link_never_lowers_the_planned_gain(rise_reports: int, fall_reports: int
                                                     ) -> None:
    """Each report of the recovered link is above the estimate; the step widens its spread,
    which alone would plan the link below the slow spell's level for a report or two (and
    send a gateway from the server to its device just as the link came back)."""
    plans = _planned_gain_after_recovery(rise_reports, fall_reports)
    assert all(b >= a * (1 - 1e-9) for a, b in itertools.pairwise(plans)), plans


def test_fading_around_one_level_is_not_a_step() -> None:
    """Independent 8 dB fading: runs of three reports beyond mean ± 3σ are rare."""
    from edgetok.agent.coordinator.estimates import Ewma, StepDetector

    rng = np.random.default_rng(7)
    est, step = Ewma(0.3), StepDetector(3, 3, 3.0)
    sigma = 8.0 * math.log(10) / 10
    seen = [step.update(est, float(x), 0.8) for x in rng.normal(0.0, sigma, 2000)]
    assert seen.count(1) <= 4 and seen.count(-1) <= 4, "at most 0.2% of reports each way"
    steps = [step.update(est, 6 * sigma) for _ in range(3)]
    assert steps == [0, 0, 1], "a real step of 6σ is a rise at its third report"
    assert est.mean == pytest.approx(6 * sigma)
    var = est.var
    steps = [step.update(est, -6 * sigma, 0.8) for _ in range(3)]
    assert steps == [0, 0, -1], "and a drop of 12σ that stays is a fall at its third"
    assert est.mean == pytest.approx(-6 * sigma) and est.var == pytest.approx(var)


def test_a_link_that_drops_and_stays_is_planned_at_its_new_level_within_a_few_reports(
        ) -> None:
    """A drop from 50 to 0.5 Mbit/s adds its own step to the gain's spread: planned at the
    mean less 2σ, the new link reads an order of magnitude worse than it is for many
    reports (e2e run 17's Pi trace sat on its device for 15 s where the server was still
    1.5x faster)."""
    planned = {}
    for reports in (3, 0):
        ctl = OnlineController(config(gain_fall_reports=reports), MANIFEST)
        sim = Sim(ctl, noise=0.05, seed=3)
        sim.run("gw1", range(30), gain(50e6))
        sim.run("gw1", range(30, 35), gain(0.5e6))
        planned[reports] = ctl.environment("gw1", 35.0)[0].gain
    true = gain(0.5e6)
    assert 0.3 * true < planned[3] <= true, "about the new level, less its usual spread"
    assert planned[0] < 0.1 * true, "without: far below it still"


def test_one_slow_head_report_barely_moves_the_compute_speed() -> None:
    """A busy moment on the gateway (one report at 3x its usual head time) moves the plan's
    compute scale by alpha·2σ at most; unclipped it moved by 3^alpha (1.39x), enough to
    tip a near tie between device and server for a couple of windows."""
    scales = {}
    for clip in (2.0, 0.0):
        ctl = OnlineController(config(speed_clip_sigma=clip), MANIFEST)
        sim = Sim(ctl, noise=0.1, seed=5)
        sim.run("gw1", range(30), gain(20e6), scale=1.0)
        before = ctl.environment("gw1", 30.0)[0].compute_scale
        sim.report("gw1", 30.0, gain(20e6), scale=3.0)
        scales[clip] = ctl.environment("gw1", 30.0)[0].compute_scale / before
    assert scales[2.0] < 1.15 < 1.3 < scales[0.0]


def test_a_lasting_slowdown_is_still_followed_with_clipping() -> None:
    ctl = OnlineController(config(), MANIFEST)
    sim = Sim(ctl, noise=0.05, seed=6)
    sim.run("gw1", range(30), gain(20e6), scale=1.0)
    sim.run("gw1", range(30, 40), gain(20e6), scale=2.0)
    assert ctl.environment("gw1", 40.0)[0].compute_scale == pytest.approx(2.0, rel=0.1)



# Every option equally accurate: latency alone decides between device and server.
TIED = synthetic_manifest(num_layers=4, ratios=(0.0,), int8_loss=0.0, fp16_loss=0.0)


def _near_tie(worse: float) -> float:
    """The per-frame overhead (ms) at which the best transmitting option plans `worse`
    (relative) above the best on-device one, by latency, on a 10 Mbit/s link."""
    device, server = _plans(None)
    assert server < device, "the synthetic link must favour the server without overhead"
    return (1 + worse) * device - server


def _run_near_tie(first_ms: float, true_ms: float, seconds: int = 60,
                  windows: Callable[[Decision], float] | None = None, probes: bool = False,
                  **kw: Any) -> list[Decision]:
    """The decisions step() publishes over `seconds` for a gateway whose first frames
    measured `first_ms` of per-frame overhead and whose later frames measure `true_ms`;
    reports every second, with the overhead only while it transmits (as a real gateway: no
    frame, no figure) and from the report after the one that moved it, or in every report
    with server `probes`. `windows`: the latency (ms) the gateway's windows measure under a
    decision, reported if given."""
    ctl = OnlineController(config(prefer="latency", **kw), TIED)
    out: list[Decision] = []
    overhead: float | None = first_ms
    for t in map(float, range(seconds)):
        d = ctl.current("a")
        head = {}
        if d is not None and d.split > 0:
            o = ctl.table.options[ctl.table.index(d.variant, d.precision)]
            head[d.variant] = o.c_head / d.cpu_hz * 1000.0
        measured = {d.variant: windows(d)} if d is not None and windows else {}
        ctl.observe(Telemetry(gateway="a", ts=t, link_bps=10e6, tx_power_w=P_MAX,
                              cpu_hz=d.cpu_hz if d else 1.5e9, head_ms=head,
                              frame_overhead_ms=overhead, window_ms=measured,
                              applied_seq=d.seq if d else None), t)
        out += ctl.step(t)  # as the server calls it: a second pass re-solves its cell
        d = ctl.current("a")
        overhead = true_ms if probes or (d is not None and d.split < TIED.num_layers) \
            else None
    assert out[0].split == TIED.num_layers, "the first plan is the device"
    return out


def _explore(decisions: list[Decision]) -> list[Decision]:
    return [d for d in decisions if d.reason == "explore"]


AFTER = ControllerConfig.model_fields["explore_after_s"].default
STALE = ControllerConfig.model_fields["stale_after_s"].default


def test_a_near_tie_held_by_one_slow_overhead_is_tried_and_kept_when_it_was_slow_once(
        ) -> None:
    """On its device a gateway sends no frame, so one early, slow overhead figure (the broker
    and server warming up) would hold it there until the figure went stale: 30 s, and as
    long again to relax. A trial re-measures it; the server is then planned as it is."""
    decisions = _run_near_tie(_near_tie(0.05), _near_tie(-0.2))
    trials = _explore(decisions)
    assert len(trials) == 1 and trials[0].split < TIED.num_layers
    assert AFTER <= trials[0].ts < STALE
    kept = decisions[decisions.index(trials[0]):]
    assert {_ref(d) for d in kept} == {_ref(trials[0])}, "kept, never undone"


def test_a_gateway_that_probes_the_server_moves_on_its_measurements_without_a_trial(
        ) -> None:
    """With server probes, a gateway on its device reports the server path's overhead as it
    is: the early slow figure is replaced at the next report, and the server is chosen on
    it at once, where without probes it waited explore_after_s for a trial."""
    decisions = _run_near_tie(_near_tie(0.05), _near_tie(-0.2), probes=True)
    assert not _explore(decisions)
    moved = [d for d in decisions if d.split < TIED.num_layers]
    assert moved and moved[0].ts <= 2.0 and moved[0].server_probes, decisions
    assert {_ref(d) for d in decisions[decisions.index(moved[0]):]} == {_ref(moved[0])}


@pytest.mark.parametrize("worse", [0.05, 0.12])
def test_a_trial_that_confirms_the_old_figure_goes_back_to_the_device(worse: float) -> None:
    """Not held on the server by the switching margin that would keep any option in force:
    the re-solve that ends a trial compares against the option it left. Within the switching
    margin (5%) or past it (12%), the trial stands until its frames report, then goes back."""
    ms = _near_tie(worse)
    decisions = _run_near_tie(ms, ms)
    trials = _explore(decisions)
    assert trials
    after = [d for d in decisions if d.ts > trials[0].ts]
    assert after and after[0].split == TIED.num_layers and after[0].reason != "forced", \
        "not undone by step()'s second pass before the gateway even ran it"
    assert after[0].ts - trials[0].ts >= 1.0
    assert decisions[-1].split == TIED.num_layers


def test_trials_that_keep_going_back_are_spaced_out() -> None:
    """Near a true tie, each trial that goes back doubles the wait for the next, up to
    MAX_TRIAL_BACKOFF times explore_after_s. (Estimates that never go stale here: the
    relaxation to the priors would otherwise send the gateway to the server on its own.)"""
    ms = _near_tie(0.12)
    trials = _explore(_run_near_tie(ms, ms, seconds=300, stale_after_s=1e4))
    gaps = [b.ts - a.ts for a, b in itertools.pairwise(trials)]
    assert len(gaps) >= 3 and gaps[0] >= 2 * AFTER and gaps[1] >= 4 * AFTER, gaps
    resolve = ControllerConfig.model_fields["resolve_interval_s"].default
    assert max(gaps) <= MAX_TRIAL_BACKOFF * AFTER + 2 * resolve, "still tried now and then"


@pytest.mark.parametrize(("worse", "kw"), [(0.3, {}), (0.05, {"explore_margin": 0.0})])
def test_no_trial_when_the_server_plans_clearly_worse_or_trials_are_off(
        worse: float, kw: dict[str, Any]) -> None:
    ms = _near_tie(worse)
    decisions = _run_near_tie(ms, _near_tie(-0.2), **kw)
    # (Once stale, the overhead relaxes to none, and the server is tried anyway.)
    assert all(d.split == TIED.num_layers for d in decisions if d.ts < STALE)


def _plans(overhead_ms: float | None) -> tuple[float, float]:
    """The latency (ms) the best on-device and the best transmitting option plan, as the
    latency preference ranks them, on a 10 Mbit/s link with `overhead_ms` per frame."""
    ctl = OnlineController(config(prefer="latency"), TIED)
    ctl.observe(Telemetry(gateway="a", ts=0.0, link_bps=10e6, tx_power_w=P_MAX,
                          frame_overhead_ms=overhead_ms), 0.0)
    env, queue = ctl.environment("a", 0.0)
    sol = solve_options(ctl.table, env, queue, "latency")
    env, queue = ctl.environment("a", 0.0, expected=True)  # the latency options rank by
    seen = (evaluate(ctl.table, env, sol.f, sol.p, queue)[0] - ctl.fallback_reserve(env)) * 1e3
    tx = ctl.table.transmits
    ok = ctl.policy.allowed  # (the privacy floor keeps the whole model off the server)
    return float(seen[~tx & ok].min()), float(seen[tx & ok].min())


def _measuring(device_ms: float, transmit_ms: float) -> Callable[[Decision], float]:
    return lambda d: device_ms if d.split == TIED.num_layers else transmit_ms


def test_a_path_slower_than_its_plan_loses_the_tie_it_wins_on_paper() -> None:
    """The plans say the device, by 5%; its windows take half as long again as planned
    (a quota slowing the head more than its probes show: e2e run 24 at 25% of a core), the
    server's take what was planned. The gateway moves to the server after one trial measured
    it, and stays; without window reports the trial goes back to the device."""
    ms = _near_tie(0.05)
    device, transmit = _plans(ms)
    assert device < transmit, "the premise: the device wins on paper"
    decisions = _run_near_tie(ms, ms, seconds=120, windows=_measuring(1.5 * device, transmit))
    trials = _explore(decisions)
    assert trials and trials[0].ts < STALE
    assert all(d.split < TIED.num_layers for d in decisions if d.ts >= trials[0].ts), \
        "kept on the server, even once the device's figure is stale (switching margin)"
    plain = _run_near_tie(ms, ms)
    assert [d.split < TIED.num_layers for d in plain if d.ts < STALE] == [False, True, False]


def test_what_both_paths_pay_alike_does_not_move_the_choice() -> None:
    """Tokenizing and storing a result cost both paths: 3 ms more than planned on each leaves
    the device, which plans 5% faster, where it is; a trial goes back as soon as its
    windows have measured the server (not at the next periodic re-solve)."""
    ms = _near_tie(0.05)
    device, transmit = _plans(ms)
    decisions = _run_near_tie(ms, ms, windows=_measuring(device + 3.0, transmit + 3.0))
    early = [d for d in decisions if d.ts < STALE]
    assert [d.split < TIED.num_layers for d in early] == [False, True, False]
    trial, back = early[1:]
    assert trial.reason == "explore" and trial.latency_ms == pytest.approx(transmit + 3.0,
                                                                           rel=0.02)
    assert back.ts - trial.ts <= 3.0 and back.latency_ms == pytest.approx(device + 3.0,
                                                                          rel=0.02)


def test_a_paths_residual_is_learned_from_the_decision_in_force() -> None:
    """Only windows of the decision in force count, and not in its first report (windows of
    the option before it, cold paths); a path never measured takes the other's residual."""
    ctl = OnlineController(config(prefer="latency"), TIED)

    def report(t: float, window_ms: dict[str, float], applied: int | None) -> None:
        ctl.observe(Telemetry(gateway="a", ts=t, link_bps=10e6, tx_power_w=P_MAX,
                              frame_overhead_ms=1.0, window_ms=window_ms,
                              applied_seq=applied, **_heads(ctl, ctl.current("a"))), t)

    def residual(t: float) -> dict[str, float]:
        return dict(ctl.snapshot(t)["gateways"]["a"]["residual_ms"])

    report(0.0, {}, None)
    d = ctl.decide("a", 0.0)
    assert d is not None
    report(1.0, {d.variant: d.latency_ms + 50.0}, None)  # not applied yet
    report(2.0, {d.variant: d.latency_ms + 50.0}, d.seq)  # its first report
    report(3.0, {"r0.00-s0": d.latency_ms + 50.0}, d.seq)  # not the decision's variant
    assert residual(3.0) == {"device": 0.0, "transmit": 0.0}
    report(4.0, {d.variant: d.latency_ms + 4.0}, d.seq)
    # The model is trusted as much as one report at first: a path just opened is cold.
    alpha = ctl.config.ewma_alpha
    assert residual(4.0) == {"device": pytest.approx(alpha * 4.0, abs=0.1),
                             "transmit": pytest.approx(alpha * 4.0, abs=0.1)}
    for t in (5.0, 6.0, 7.0, 8.0, 9.0, 10.0):
        report(t, {d.variant: d.latency_ms + 4.0}, d.seq)
    assert residual(10.0) == {"device": pytest.approx(4.0, abs=0.5),
                              "transmit": pytest.approx(4.0, abs=0.5)}
    assert ctl.gateways["a"].residual.est.keys() == {bool(d.split < TIED.num_layers)}


def test_no_residual_before_the_estimates_it_sits_on() -> None:
    """Windows on the server path before the gateway has reported its per-frame overhead
    are not compared with a plan that lacks it: the residual would take the overhead in and
    keep it once the overhead itself arrived (e2e run 25, cpu-25%)."""
    ctl = OnlineController(config(prefer="latency"), TIED)
    ctl.observe(Telemetry(gateway="a", ts=0.0, link_bps=1e9, tx_power_w=P_MAX), 0.0)
    d = ctl.decide("a", 0.0)
    assert d is not None and d.split < TIED.num_layers, "a fast link: the server"
    for t in (1.0, 2.0, 3.0):
        ctl.observe(Telemetry(gateway="a", ts=t, link_bps=1e9, tx_power_w=P_MAX,
                              window_ms={d.variant: d.latency_ms + 5.0}, applied_seq=d.seq), t)
    assert not ctl.gateways["a"].residual.est
    ctl.observe(Telemetry(gateway="a", ts=4.0, link_bps=1e9, tx_power_w=P_MAX,
                          frame_overhead_ms=5.0, window_ms={d.variant: d.latency_ms + 5.0},
                          applied_seq=d.seq), 4.0)
    assert ctl.snapshot(4.0)["gateways"]["a"]["residual_ms"]["transmit"] == pytest.approx(
        0.0, abs=0.3), "the overhead explains the 5 ms"


def test_a_stale_paths_residual_relaxes_to_the_path_measured_since() -> None:
    """A path left after a slow spell is not held to it for ever: once stale, what set it
    apart fades into the residual of the path measured since."""
    ctl = OnlineController(config(prefer="latency"), TIED)
    tx = ctl.table.transmits

    def run(t0: int, t1: int, bps: float, extra_ms: float) -> Decision:
        """Reports every second at `bps`; the windows of the path this link favours take
        `extra_ms` over their plan (those of the other, planned on the link before, none)."""
        for t in map(float, range(t0, t1)):
            d = ctl.current("a")
            windows, applied = {}, None
            path = d is not None and tx[ctl.gateways["a"].option]
            if d is not None and path == (bps > 1e6):
                env, queue = ctl.environment("a", t, expected=True)
                plan = evaluate(ctl.table, env, d.cpu_hz, d.tx_power_w or P_MAX, queue)[0] \
                    - ctl.fallback_reserve(env)
                windows = {d.variant: float(plan[ctl.gateways["a"].option]) * 1e3 + extra_ms}
                applied = d.seq
            ctl.observe(Telemetry(gateway="a", ts=t, link_bps=bps, tx_power_w=P_MAX,
                                  frame_overhead_ms=1.0 if bps > 1e6 else None,
                                  window_ms=windows, applied_seq=applied, **_heads(ctl, d)),
                        t)
            ctl.step(t)
        d = ctl.current("a")
        assert d is not None
        return d

    assert tx[ctl.table.index(*_ref(run(0, 10, 1e9, 4.0)))], "a fast link: the server"
    assert not tx[ctl.table.index(*_ref(run(10, 30, 1e4, 0.0)))], "a dead link: the device"
    residual = ctl.snapshot(30.0)["gateways"]["a"]["residual_ms"]
    assert residual["transmit"] == pytest.approx(4.0, abs=0.5)
    assert residual["device"] == pytest.approx(0.0, abs=0.5)
    last_tx = ctl.gateways["a"].residual.ts[True]
    later = ctl.snapshot(last_tx + 1.5 * STALE)["gateways"]["a"]["residual_ms"]
    assert later["transmit"] == pytest.approx((residual["transmit"] + residual["device"]) / 2,
                                              abs=0.05)


def _ref(d: Decision) -> tuple[str, str]:
    return d.variant, d.precision


def test_windows_far_faster_than_planned_still_give_a_valid_decision() -> None:
    """A residual below zero (a gateway faster than its profile) may take an option's
    expected latency below zero; the decision still validates, and still ranks by it."""
    ms = _near_tie(0.05)
    decisions = _run_near_tie(ms, ms, windows=_measuring(0.01, 0.01))
    assert decisions and all(d.latency_ms >= 0.0 for d in decisions)


def _heads(ctl: OnlineController, d: Decision | None) -> dict[str, Any]:
    """The clock and head time a gateway running `d` reports, at the profile's speed."""
    if d is None or d.split == 0:
        return {}
    o = ctl.table.options[ctl.table.index(d.variant, d.precision)]
    return {"cpu_hz": d.cpu_hz, "head_ms": {d.variant: o.c_head / d.cpu_hz * 1000.0}}


def test_a_decision_is_republished_when_only_its_expected_latency_moved() -> None:
    """The gateway shows the prediction beside what it measures. A decision made before
    anything was measured (2.4 ms in e2e run 26, for windows that took 6.3) is republished
    once its path's residual moves the expected latency, on the same option and knobs; the
    windows of the gateway still on the older one keep teaching the residual."""
    ctl = OnlineController(config(prefer="latency"), TIED)
    dead = {"link_bps": 1e4, "tx_power_w": P_MAX}  # the device is the only sensible path
    ctl.observe(Telemetry(gateway="a", ts=0.0, **dead), 0.0)
    first = ctl.decide("a", 0.0)
    assert first is not None and first.split == TIED.num_layers
    measured = first.latency_ms * 2.6  # as in run 26
    out: list[Decision] = []
    applied, pending = first, None  # the gateway applies a decision a report late
    for t in map(float, range(1, 20)):
        ctl.observe(Telemetry(gateway="a", ts=t, window_ms={first.variant: measured},
                              applied_seq=applied.seq, **_heads(ctl, first), **dead), t)
        est = ctl.gateways["a"].residual.est.get(False)
        assert (est.count - 1 if est else 0) == t - 1, \
            "only the option's first report is skipped, not a republished decision's"
        applied, pending = pending or applied, None
        new = ctl.step(t)
        pending = new[-1] if new else None
        out += new
    assert out, "republished"
    assert {(*_ref(d), d.cpu_hz, d.tx_power_w) for d in out} == {
        (*_ref(first), first.cpu_hz, first.tx_power_w)}, "nothing for the gateway to re-apply"
    assert [d.seq for d in out] == list(range(first.seq + 1, first.seq + 1 + len(out)))
    frac = ctl.config.republish_latency_frac
    assert out[-1].latency_ms == pytest.approx(measured, rel=frac)
    assert len(out) <= 3, "not on every report: only past republish_latency_frac"
