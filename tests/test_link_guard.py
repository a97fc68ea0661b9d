"""The gateway's link guard: sensed link rate, and windows kept off a link too slow for them."""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from harness import bundle_tokenizer, random_window, until

from edgetok.control import FALLBACK_MARGIN, FALLBACK_SLACK_S
from edgetok.frames import FrameHeader, TailReply, decode_frame
from edgetok.gateway import inference, qdisc
from edgetok.gateway.inference import SERVER_PROBE_BURST, Decision, Inferencer
from edgetok.gateway.linksense import LinkSensor, parse_iw_link
from edgetok.gateway.timing import RUN_SAMPLES
from edgetok.gateway.uplink import MIN_OVERHEAD_SAMPLES, OVERHEAD_GAP_S, UplinkState
from edgetok.models.runtime import Runtime

IW_LINK = """Connected to aa:bb:cc:dd:ee:ff (on wlan0)
\tSSID: plant-floor
\tfreq: 5180
\tsignal: -61 dBm
\ttx bitrate: 72.2 MBit/s MCS 7 short GI
"""


def _attr(kind: int, payload: bytes) -> bytes:
    """One rtattr, padded to 4 bytes as the kernel packs them."""
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _qdisc(ifindex: int, kind: bytes, options: bytes) -> bytes:
    return (struct.pack("=BxxxiIII", 0, ifindex, 0x80010000, 0xFFFFFFFF, 1)
            + _attr(qdisc.TCA_KIND, kind + b"\0") + _attr(qdisc.TCA_OPTIONS, options))


def test_parsers_read_iw_output_and_netlink_qdiscs() -> None:
    """iw's tx bitrate (Mbit/s) and the kernel's tbf rate (bytes/s) both come out in bit/s."""
    assert parse_iw_link(IW_LINK) == pytest.approx(72.2e6)
    assert parse_iw_link("Not connected.") is None
    parms = struct.pack("=BBHhHI", 0, 1, 0, 0, 0, 187_500) + bytes(12) + bytes(12)
    assert qdisc.tbf_rate(_qdisc(7, b"tbf", _attr(qdisc.TCA_TBF_PARMS, parms))) == (7, 1.5e6)
    # Over 4 GB/s the u32 field saturates and the 64-bit attribute carries the rate.
    big = struct.pack("=BBHhHI", 0, 1, 0, 0, 0, 0xFFFFFFFF) + bytes(24)
    rate64 = _attr(qdisc.TCA_TBF_PARMS, big) + _attr(qdisc.TCA_TBF_RATE64,
                                                     struct.pack("=Q", 5_000_000_000))
    assert qdisc.tbf_rate(_qdisc(3, b"tbf", rate64)) == (3, 40e9)
    assert qdisc.tbf_rate(_qdisc(7, b"fq_codel", b"")) is None
    assert qdisc.tbf_rate(_qdisc(7, b"tbf", _attr(qdisc.TCA_TBF_PARMS, b"\1\2"))) is None
    assert qdisc.tbf_rate(b"short") is None


def test_sensing_is_off_without_an_interface() -> None:
    """No interface, no sensing: the guard then relies on reply history alone."""
    sensor = LinkSensor("auto", None, 0.5)
    assert sensor.mode == "off" and sensor.rate_bps() is None


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a veth pair and tc")
@pytest.mark.asyncio
async def test_sensor_reads_the_tbf_rate_it_is_given() -> None:
    """A real veth end with a tbf qdisc: the sensor reads its rate, and follows a change."""
    a, b = f"etkls{os.getpid() % 10000}a", f"etkls{os.getpid() % 10000}b"
    _sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
    try:
        assert await LinkSensor("tc", a, 0.5).poll() is None  # no tbf yet
        for mbit in (3, 1, 40_000):  # 40 Gbit/s: past the u32 bytes/s field
            _sh("tc", "qdisc", "replace", "dev", a, "root", "tbf", "rate", f"{mbit}mbit",
                "burst", "300000", "latency", "400ms")
            sensor = LinkSensor("tc", a, 0.5)
            assert sensor.mode == "tc"
            assert await sensor.poll() == pytest.approx(mbit * 1e6)
            assert sensor.rate_bps() == pytest.approx(mbit * 1e6)
        # Only this interface's qdisc counts, not its peer's.
        _sh("tc", "qdisc", "replace", "dev", b, "root", "tbf", "rate", "7mbit", "burst",
            "3000", "latency", "400ms")
        assert await LinkSensor("tc", a, 0.5).poll() == pytest.approx(40e9)
        assert await LinkSensor("tc", b, 0.5).poll() == pytest.approx(7e6)
    finally:
        subprocess.run(["ip", "link", "del", a], check=False)  # noqa: ASYNC221


class Server:
    """The tail of a real split run, answering frames straight into the inferencer."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.frames = 0
        self.delay_s = 0.0  # how long the next replies take (a cold session, a busy server)
        self.silent = False  # a hung server: frames go out, no reply comes
        self.headers: list[FrameHeader] = []
        self.inferencer: Inferencer | None = None

    async def publish(self, frame: bytes, wait_s: float) -> bool:
        self.frames += 1
        header, feats = decode_frame(frame)
        self.headers.append(header)
        if self.silent:
            return True
        logits = self.runtime.run(header.variant, "tail", feats.astype(np.float32))
        reply = TailReply(gateway=header.gateway, stream=header.stream, window=header.window,
                          variant=header.variant, logits=logits.reshape(-1).tolist(),
                          tail_ms=0.1, server="test", received_ts=time.time())
        assert self.inferencer is not None
        asyncio.get_running_loop().call_later(self.delay_s, self.inferencer.on_reply, reply)
        return True


@pytest.fixture
def split_setup(tiny_bundle: Path) -> tuple[Inferencer, Server, str]:
    runtime = Runtime(tiny_bundle, threads=1)
    m = runtime.manifest
    split = next(v for v in m.variants if 0 < v.split < m.num_layers and v.pruning_ratio == 0)
    tok = bundle_tokenizer(m)
    server = Server(runtime)
    inf = Inferencer("gw1", runtime, {"imu": tok}, server.publish,
                     Decision(split.id, "fp32"))
    server.inferencer = inf
    return inf, server, split.id


@pytest.mark.asyncio
async def test_collapsed_sensed_link_goes_to_the_device_without_the_head(
        split_setup: tuple[Inferencer, Server, str]) -> None:
    """Sensed rate collapses: no frame, no head of the split variant, a device result."""
    inf, server, split = split_setup
    rate = {"bps": 50e6}
    inf.link_rate = lambda: rate["bps"]
    # The first run of a session is not timed (see the next test); the overhead is reported
    # from MIN_OVERHEAD_SAMPLES replies after the first, cold one.
    for seq in range(MIN_OVERHEAD_SAMPLES + 1):
        ok = await inf.infer(random_window(inf.manifest, seq), deadline_s=1.0)
    assert ok.where == "split" and server.frames == MIN_OVERHEAD_SAMPLES + 1
    assert inf.uplink.rtt_s, "a reply teaches the guard the round trip"
    # ... and the per-frame time beside the bits at the sensed rate and the server's tail.
    rtt = next(iter(inf.uplink.rtt_s.values()))
    assert inf.uplink.overhead_s is not None and 0 <= inf.uplink.overhead_s <= rtt
    heads = inf.run_ms.count((split, "head"))
    rate["bps"] = 100.0  # 100 bit/s: a frame of kilobytes would take minutes
    sent = server.frames
    r = await inf.infer(random_window(inf.manifest, 10), deadline_s=1.0)
    assert r.where == "device-fallback" and server.frames == sent
    assert inf.uplink.guarded == 1 and inf.uplink.fallbacks == 1
    assert inf.run_ms.count((split, "head")) == heads, "the split head must not have run"
    assert inf.uplink.server_ok, "a slow link is not a dead server"
    # The link recovers: the next window goes out again at once, no probe wait.
    rate["bps"] = 50e6
    r = await inf.infer(random_window(inf.manifest, 11), deadline_s=1.0)
    assert r.where == "split" and server.frames == sent + 1


@pytest.mark.asyncio
async def test_coordinator_fallback_variant_is_used(
        split_setup: tuple[Inferencer, Server, str]) -> None:
    """A decision's fallback_variant, not the same ratio's device variant, runs on fallback."""
    inf, _, split = split_setup
    m = inf.manifest
    other = next(v for v in m.variants if v.split == m.num_layers and v.pruning_ratio > 0)
    inf.decision = Decision(split, "fp32", fallback=other.id)
    inf.link_rate = lambda: 50e6
    await inf.infer(random_window(inf.manifest, 1), deadline_s=1.0)
    inf.link_rate = lambda: 100.0
    r = await inf.infer(random_window(inf.manifest, 2), deadline_s=1.0)
    assert r.where == "device-fallback" and r.variant.id == other.id
    assert r.label in m.labels


@pytest.mark.asyncio
async def test_fallback_runs_at_the_fallback_clock_and_restores_it(
        split_setup: tuple[Inferencer, Server, str]) -> None:
    """The clock is raised for a fallback run and set back to the decision's after it."""
    inf, _, split = split_setup
    clocks: list[float] = []
    inf.set_clock = clocks.append
    inf.decision = Decision(split, "fp32", fallback_hz=2.0e9, extra={"cpu_hz": 1.0e9})
    inf.link_rate = lambda: 50e6
    await inf.infer(random_window(inf.manifest, 1), deadline_s=1.0)
    assert clocks == []
    inf.link_rate = lambda: 100.0
    for seq in (2, 3):  # (a session's first run is not timed)
        r = await inf.infer(random_window(inf.manifest, seq), deadline_s=1.0)
    assert r.where == "device-fallback" and clocks == [2.0e9, 1.0e9] * 2
    # The raised-clock run times size the reserve, but are not reported as head times at
    # the decision's clock (the coordinator would read a faster device into them).
    assert r.variant.id not in inf.head_ms
    assert (r.variant.id, "head") in inf.boosted_ms


@pytest.mark.asyncio
async def test_the_fallback_reserve_is_sized_from_what_ran_here_before_the_profile(
        split_setup: tuple[Inferencer, Server, str]) -> None:
    """Before a fallback has run at the raised clock, runs of the same variant at the
    decision's clock (windows or probes) size the reserve, scaled to the raised clock; the
    profile only when nothing ran. A 10% gateway's profile said 9.5 ms where its runs took
    45: the reserve let the server keep the time its fallback needed."""
    inf, _, split = split_setup
    inf.set_clock = lambda hz: None
    inf.decision = Decision(split, "fp32", fallback_hz=1.0e9, extra={"cpu_hz": 1.0e9})
    fb = inf.fallback_of(inf.decision)
    assert fb.head and not fb.tail

    def reserve_of(run_ms: float) -> float:
        return run_ms / 1000 * FALLBACK_MARGIN + FALLBACK_SLACK_S

    profiled = inf.fallback_reserve_s(fb)
    assert profiled < reserve_of(45.0)
    assert inf.measured_fallback() is None, "the profile is not news to the coordinator"
    for ms in (44.0, 45.0, 46.0):
        inf.run_ms.add((fb.id, "head"), ms)
    assert inf.fallback_reserve_s(fb) == pytest.approx(reserve_of(45.0))
    assert inf.measured_fallback() == (fb.id, pytest.approx(45.0))  # for the telemetry
    # Raised to twice the decision's clock for a fallback: half the time.
    inf.decision = Decision(split, "fp32", fallback_hz=2.0e9, extra={"cpu_hz": 1.0e9})
    assert inf.fallback_reserve_s(fb) == pytest.approx(reserve_of(22.5))
    # Once the fallback has run at its own clock, those runs say it.
    inf.boosted_ms.add((fb.id, "head"), 30.0)
    assert inf.fallback_reserve_s(fb) == pytest.approx(reserve_of(30.0))
    assert inf.measured_fallback() == (fb.id, pytest.approx(30.0))
    # On the device its windows run that variant: the coordinator learns the run a server
    # path would keep back for from them, and the slower fallbacks from before (30 ms at
    # the raised clock) do not stand: the newer runs, scaled to that clock, say it.
    inf.decision = Decision(fb.id, "fp32", fallback_hz=2.0e9, extra={"cpu_hz": 1.0e9})
    assert inf.fallback_of(inf.decision).id == fb.id
    for _ in range(RUN_SAMPLES):
        inf.run_ms.add((fb.id, "head"), 20.0)
    assert inf.measured_fallback() == (fb.id, pytest.approx(10.0))
    inf.boosted_ms.add((fb.id, "head"), 30.0)  # a fallback again: now the newer
    assert inf.measured_fallback() == (fb.id, pytest.approx(30.0))


@pytest.mark.asyncio
async def test_a_lean_reserve_waits_longer_for_the_server_than_a_sure_one(
        split_setup: tuple[Inferencer, Server, str]) -> None:
    """A decision planned with the lean reserve (1.0x the fallback's run) keeps a reply
    that a sure one (1.5x) gives up on: with a 200 ms fallback and a 600 ms deadline the
    cutoffs are 290 and 390 ms, and the reply comes at about 330."""
    inf, server, split = split_setup
    fb = inf.fallback_of(inf.decision)
    for _ in range(3):
        inf.run_ms.add((fb.id, "head"), 200.0)
    lean = Decision(split, "fp32", fallback_margin=1.0)
    sure = Decision(split, "fp32", fallback_margin=FALLBACK_MARGIN)
    inf.decision = lean
    assert inf.fallback_reserve_s(fb) == pytest.approx(0.2 + FALLBACK_SLACK_S)
    inf.decision = Decision(split, "fp32")  # no margin named: the sure one
    assert inf.fallback_reserve_s(fb) == pytest.approx(0.2 * FALLBACK_MARGIN + FALLBACK_SLACK_S)
    await inf.infer(random_window(inf.manifest, 0), deadline_s=1.0)  # sessions' first runs
    server.delay_s = 0.33
    inf.decision = lean
    r = await inf.infer(random_window(inf.manifest, 1), deadline_s=0.6)
    assert r.where == "split" and r.latency_ms.total < 600
    inf.uplink = UplinkState()  # forget that reply's round trip: the frame must go out
    inf.decision = sure
    r = await inf.infer(random_window(inf.manifest, 2), deadline_s=0.6)
    assert r.where == "device-fallback" and server.frames == 3
    assert inf.uplink.guarded == 0  # sent, and given up at the sure cutoff
    # Its reply still came before the deadline: the reserve cut it off, and telemetry says
    # so. One that comes after the deadline (a stalled server's backlog) is only late.
    await until(lambda: inf.uplink.replies_late == 1)
    assert inf.uplink.replies_cut == 1
    inf.uplink = UplinkState()
    server.delay_s = 0.8
    r = await inf.infer(random_window(inf.manifest, 3), deadline_s=0.6)
    assert r.where == "device-fallback"
    await until(lambda: inf.uplink.replies_late == 1)
    assert inf.uplink.replies_cut == 0


@pytest.mark.asyncio
async def test_no_frame_overhead_without_a_sensed_rate(
        split_setup: tuple[Inferencer, Server, str]) -> None:
    """Without a rate to take the bits off, the round trip cannot be split: none is kept."""
    inf, server, _ = split_setup
    r = await inf.infer(random_window(inf.manifest, 1), deadline_s=1.0)
    assert r.where == "split" and server.frames == 1
    assert inf.uplink.rtt_s and inf.uplink.overhead_s is None


@pytest.mark.asyncio
async def test_one_slow_reply_does_not_shut_the_server_out(
        split_setup: tuple[Inferencer, Server, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Reply history says the server is too slow, the sensed link says it is not: the guard
    keeps windows off it only until a probe is due, and the probe's fast reply replaces the
    slow history at once (averaged in, it would still keep the next window off)."""
    inf, server, _ = split_setup
    monkeypatch.setattr(inference, "PROBE_INTERVAL_S", 1.0)
    inf.runtime.session(inf.decision.variant, "head")  # opened, as on a decision
    inf.link_rate = lambda: 50e6  # the frame's bits take microseconds: only history is slow
    server.delay_s = 0.6  # one slow spell, such as a tail session opened on first use
    r = await inf.infer(random_window(inf.manifest, 1), deadline_s=1.0)
    assert r.where == "split" and server.frames == 1
    server.delay_s = 0.0
    r = await inf.infer(random_window(inf.manifest, 2), deadline_s=0.4)
    assert r.where == "device-fallback" and server.frames == 1 and inf.uplink.guarded == 1
    await asyncio.sleep(inf.uplink.next_probe - time.monotonic() + 0.05)  # a probe is due
    r = await inf.infer(random_window(inf.manifest, 3), deadline_s=0.4)
    assert r.where == "split" and server.frames == 2, "a due probe goes out despite history"
    r = await inf.infer(random_window(inf.manifest, 4), deadline_s=0.4)
    assert r.where == "split" and server.frames == 3, "the probe's reply replaced the history"
    assert inf.uplink.guarded == 1


@pytest.mark.asyncio
async def test_telemetry_gets_only_the_heads_that_ran_since_it_last_asked(
        split_setup: tuple[Inferencer, Server, str]) -> None:
    """A head time reported again and again would be folded into the coordinator's speed
    estimate again and again, long after the device changed."""
    inf, _, split = split_setup
    inf.link_rate = lambda: 50e6
    await inf.infer(random_window(inf.manifest, 1), deadline_s=1.0)
    assert inf.take_fresh_head_ms() == {}, "a session's first run is not its speed"
    assert (split, "head") not in inf.run_ms
    await inf.infer(random_window(inf.manifest, 2), deadline_s=1.0)
    assert set(inf.take_fresh_head_ms()) == {split}
    assert inf.take_fresh_head_ms() == {}, "nothing ran since"
    inf.link_rate = lambda: 100.0  # guarded: the split head does not run, the fallback does
    for seq in (3, 4):
        r = await inf.infer(random_window(inf.manifest, seq), deadline_s=1.0)
    assert r.where == "device-fallback"
    assert set(inf.take_fresh_head_ms()) == {r.variant.id}
    assert split in inf.head_ms, "the status page keeps every head's last figure"


@pytest.mark.asyncio
async def test_telemetry_gets_window_latencies_by_the_decision_they_ran_under(
        split_setup: tuple[Inferencer, Server, str]) -> None:
    """The coordinator compares each path's windows with its plan: a window that fell back
    counts under the split that sent it to the server (that choice cost the wait too), and
    each report carries only its own windows."""
    inf, _, split = split_setup
    inf.link_rate = lambda: 50e6
    served = [await inf.infer(random_window(inf.manifest, seq), deadline_s=1.0)
              for seq in (1, 2, 3)]
    assert [r.where for r in served] == ["split"] * 3
    fresh = inf.take_fresh_window_ms()
    assert fresh == {split: pytest.approx(sorted(r.latency_ms.total for r in served)[1],
                                          abs=1e-3)}
    assert inf.take_fresh_window_ms() == {}, "nothing ran since"
    inf.link_rate = lambda: 100.0  # guarded: every window falls back
    r = await inf.infer(random_window(inf.manifest, 4), deadline_s=1.0)
    assert r.where == "device-fallback" and r.variant.id != split
    assert inf.take_fresh_window_ms() == {split: pytest.approx(r.latency_ms.total, abs=1e-3)}


def test_overheads_from_before_a_gap_in_replies_are_dropped() -> None:
    """A gateway back from its device (a coordinator's trial of the server) reports the
    overhead of its new replies, not a median still set by its first, warming-up ones; and
    the first reply after a start or a gap, which pays for cold paths, is not kept."""
    up = UplinkState()
    up.learn_overhead(0.030, 0.001, 0.0, 8e6)
    assert not up.overheads_s, "the first reply is cold"
    for n in range(1, 11):
        up.learn_overhead(0.011, 0.001, 0.0, 8e6)
        assert (up.overhead_s is None) == (n < MIN_OVERHEAD_SAMPLES), "a median of enough"
    assert up.overhead_s == pytest.approx(0.010)
    up.learn_overhead(0.004, 0.001, 0.0, 8e6)
    assert up.overhead_s == pytest.approx(0.010), "one new reply among recent ones"
    up.last_overhead_mono -= OVERHEAD_GAP_S + 1  # as if it had been away that long
    up.learn_overhead(0.004, 0.001, 0.0, 8e6)
    assert not up.overheads_s, "the first reply after a gap is cold too"
    for _ in range(MIN_OVERHEAD_SAMPLES):
        up.learn_overhead(0.004, 0.001, 0.0, 8e6)
    assert up.overhead_s == pytest.approx(0.003)
    assert len(up.overheads_s) == MIN_OVERHEAD_SAMPLES


def test_a_frame_that_leaves_late_moves_its_wait_from_the_overhead_to_the_floor() -> None:
    """Held 1 ms for its airtime but gone only after 16: the 15 ms are a wait a longer
    hold would have hidden, so they are the floor's, not the per-frame overhead's."""
    up = UplinkState()
    bits, rate = 8000.0, 8e6  # 1 ms of airtime
    for _ in range(1 + MIN_OVERHEAD_SAMPLES):  # (the first reply is cold: not kept)
        up.learn_overhead(0.0185, 0.0, bits, rate, left_s=0.016, hold_s=0.001)
    assert up.overhead_s == pytest.approx(0.0025)
    assert up.floor_s == pytest.approx(0.016)
    # On time (within LATE_SLACK_S), the wait is the hold itself: no floor, as before.
    on_time = UplinkState()
    for _ in range(1 + MIN_OVERHEAD_SAMPLES):
        on_time.learn_overhead(0.0185, 0.0, bits, rate, left_s=0.0015, hold_s=0.001)
    assert on_time.overhead_s == pytest.approx(0.0175) and on_time.floor_s == 0.0


@pytest.mark.asyncio
async def test_a_busy_loop_during_the_radio_hold_is_measured_as_the_floor(
        split_setup: tuple[Inferencer, Server, str]) -> None:
    """The loop stalls for 30 ms inside a 1 ms radio hold (as a throttled CPU stalls it):
    the real frame path reports the stall as its floor and keeps it off the overhead."""
    inf, server, _ = split_setup
    inf.link_rate = lambda: 50e6
    stall_s = 0.030

    def hold_with_a_stall(nbytes: int) -> float:
        asyncio.get_running_loop().call_soon(time.sleep, stall_s)
        return 0.001

    inf.airtime = hold_with_a_stall
    for seq in range(4):
        r = await inf.infer(random_window(inf.manifest, seq), deadline_s=1.0)
        assert r.where == "split"
    assert server.frames == 4
    floor, overhead = inf.uplink.floor_s, inf.uplink.overhead_s
    assert floor is not None and overhead is not None
    assert floor >= stall_s and overhead < stall_s / 2


@pytest.fixture
def device_setup(tiny_bundle: Path) -> tuple[Inferencer, Server]:
    """An inferencer whose decision runs windows on the device, with server probes every
    10 s and a sensed link."""
    runtime = Runtime(tiny_bundle, threads=1)
    m = runtime.manifest
    server = Server(runtime)
    inf = Inferencer("gw1", runtime, {"imu": bundle_tokenizer(m)}, server.publish,
                     Decision(m.device_variant(0.0).id, "fp32"))
    inf.server_probe_every_s = 10.0
    inf.link_rate = lambda: 50e6
    server.inferencer = inf
    return inf, server


@pytest.mark.asyncio
async def test_server_probes_measure_the_server_path_while_windows_stay_on_the_device(
        device_setup: tuple[Inferencer, Server]) -> None:
    """On its device a gateway sends no frame, so the server path's overhead was known only
    from the model until windows were risked on it. A window done here sends its tokens as
    probes, back to back until there is an overhead figure, and then none until one is due;
    the window's own result is the device's, and no probe counts as a window's frame."""
    inf, server = device_setup
    r = await inf.infer(random_window(inf.manifest, 1), deadline_s=1.0)
    assert r.where == "device"
    await until(lambda: inf._server_probe is None and inf.uplink.probes_sent > 0)
    up = inf.uplink
    assert up.probes_sent == server.frames == SERVER_PROBE_BURST, "cold reply, then three"
    assert up.overhead_s is not None and up.overhead_s >= 0
    assert up.frames_sent == up.bytes_sent == 0 and up.probe_bytes > 0
    assert all(h.extra == {"probe": True} and h.window == r.window and h.variant.endswith("-s0")
               for h in server.headers), "the whole model on the server: no head ran here"
    assert up.rtt_s, "the link guard learned the server path's round trip too"
    r = await inf.infer(random_window(inf.manifest, 2), deadline_s=1.0)
    await asyncio.sleep(0.05)
    assert r.where == "device" and server.frames == SERVER_PROBE_BURST, "none due yet"
    assert up.replies_late == 0 and not up.pending
    # The next is due after a wait drawn around the period, so gateways that started
    # together do not keep probing the server together.
    waits = set()
    for seq in range(3, 8):
        inf.uplink.last_overhead_mono = inf._next_server_probe = -float("inf")
        await inf.infer(random_window(inf.manifest, seq), deadline_s=1.0)
        await until(lambda: inf._server_probe is None)
        assert inf._server_probe_wait_s is not None
        waits.add(inf._server_probe_wait_s)
    assert len(waits) == 5 and all(5.0 <= w <= 15.0 for w in waits), waits


@pytest.mark.asyncio
async def test_no_server_probe_without_a_sensed_rate_or_the_coordinators_word(
        device_setup: tuple[Inferencer, Server]) -> None:
    """Without a sensed rate the overhead cannot be taken from a round trip; with a policy
    that never transmits (device-only), what a probe measures is of no use."""
    inf, server = device_setup
    inf.link_rate = lambda: None
    await inf.infer(random_window(inf.manifest, 1), deadline_s=1.0)
    inf.link_rate = lambda: 50e6
    inf.decision = Decision(inf.decision.variant, "fp32", server_probes=False)
    await inf.infer(random_window(inf.manifest, 2), deadline_s=1.0)
    await asyncio.sleep(0.05)
    assert server.frames == 0 and inf.uplink.probes_sent == 0


@pytest.mark.asyncio
async def test_a_lost_server_probe_costs_no_window_and_waits_out_the_interval(
        device_setup: tuple[Inferencer, Server]) -> None:
    """A hung server: the probe waits a deadline and ends; the windows go on on the device
    and the next probe waits for its interval instead of following every window."""
    inf, server = device_setup
    server.silent = True
    r = await inf.infer(random_window(inf.manifest, 1), deadline_s=0.2)
    assert r.where == "device"
    await until(lambda: inf._server_probe is None and inf.uplink.probes_lost == 1)
    assert server.frames == 1 and inf.uplink.probes_sent == 1
    assert inf.uplink.server_ok and not inf._probing, "a probe is not a window's verdict"
    late = TailReply(gateway="gw1", stream="imu", window=1, variant=server.headers[0].variant,
                     logits=[0.0], tail_ms=0.1, server="test", received_ts=time.time())
    inf.on_reply(late)  # the hung server answers after all
    assert inf.uplink.replies_late == 0, "a probe's late reply is not a window's"
    r = await inf.infer(random_window(inf.manifest, 2), deadline_s=0.2)
    await asyncio.sleep(0.05)
    assert r.where == "device" and server.frames == 1
