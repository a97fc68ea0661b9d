"""Run one closed window through tokenizer, head, uplink and tail, or fall back on-device."""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from edgetok.aio import within
from edgetok.control import FALLBACK_MARGIN, FALLBACK_SLACK_S, GUARD_MARGIN
from edgetok.frames import FrameHeader, Precision, TailReply, encode_frame
from edgetok.gateway.models import Latency, Result, VariantRef, Where
from edgetok.gateway.timing import RUN_SAMPLES, FreshMedians, ProbeCalibration, RunTimes
from edgetok.gateway.uplink import MIN_OVERHEAD_SAMPLES, UplinkState, link_key
from edgetok.gateway.windows import ClosedWindow
from edgetok.models.bundle import Variant
from edgetok.models.runtime import Part, Runtime
from edgetok.tokenizers import Tokenizer

log = logging.getLogger(__name__)

# After the server misses a deadline, only every PROBE_INTERVAL_S do we try it again; the
# other windows go straight to the device instead of each waiting out a full deadline.
PROBE_INTERVAL_S = 2.0
# While windows run heads here, a head probe calibrates the probes once per this many probe
# intervals (one extra head per 10 s at the default 2 s interval).
CALIBRATE_EVERY = 5
# The calibration compares a probe with the median of at least this many window heads of
# the decision's variant at its clock.
CALIBRATION_MIN_RUNS = 4
# Server probes sent back to back while the uplink has too few replies for an overhead
# figure: the first reply is dropped as cold, then MIN_OVERHEAD_SAMPLES make one.
SERVER_PROBE_BURST = MIN_OVERHEAD_SAMPLES + 1
# A server probe sends the window's tokens at the smallest precision: its result is thrown
# away, and its bits are taken off its round trip at the sensed rate whatever their number.
SERVER_PROBE_PRECISION: Precision = "int8"
# Each wait between server probes is drawn from server_probe_every_s times 1 ± this: gateways
# that start together (a fleet after a power cut, every e2e round) would otherwise probe
# the server together for good (e2e run 51: 12 of 16 gateways in the same second, every 5 s).
SERVER_PROBE_JITTER = 0.5
# Lost server probes remembered, so that their replies, if they come after all, are not
# counted as windows' late replies; a bound, not a tuning knob.
LOST_PROBES_REMEMBERED = 16
# FALLBACK_MARGIN and FALLBACK_SLACK_S (edgetok.control) size the time kept back from the
# server for an on-device run; the coordinator plans with the same rule.
Publish = Callable[[bytes, float], Awaitable[bool]]
LinkRate = Callable[[], float | None]


@dataclass
class Decision:
    """The variant and precision in force, and who set them."""

    variant: str
    precision: Precision
    seq: int = 0
    source: str = "config"
    extra: dict[str, object] = field(default_factory=dict)
    fallback: str | None = None  # on-device variant for a fallback; None: the same ratio's
    fallback_hz: float | None = None  # clock for a fallback run; None: leave it
    fallback_margin: float | None = None  # reserve / fallback run time; None: FALLBACK_MARGIN
    server_probes: bool = True  # whether server probes are of use (the coordinator's word)


class InferenceError(RuntimeError):
    """A window's model output is unusable; `reason` is a short stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax of a 1-D array."""
    z = np.exp(logits - logits.max())
    return np.asarray(z / z.sum())


class Inferencer:
    """Turns closed windows into results using the current decision."""

    def __init__(self, gateway: str, runtime: Runtime, tokenizers: dict[str, Tokenizer],
                 publish_frame: Publish, decision: Decision,
                 calibration_path: Path | None = None) -> None:
        """`calibration_path`: where the head probes' calibration is kept across restarts."""
        self.gateway = gateway
        self.runtime = runtime
        self.manifest = runtime.manifest
        self.tokenizers = tokenizers
        self.publish_frame = publish_frame
        self.decision = decision
        self.uplink = UplinkState()
        # One ORT worker: heads run one at a time, as on a small device, and a session is
        # never created concurrently.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort")
        self.run_ms = RunTimes()
        # Fallback runs at a raised clock are kept apart: telemetry reports head times at the
        # decision's clock, and the coordinator reads compute speed from them.
        self.boosted_ms = RunTimes(reported=False)
        self.last_head_mono = -float("inf")  # when a head last ran at the decision's clock
        self._last_tokens: np.ndarray | None = None  # a real input for a head probe
        self.probe_calibration = ProbeCalibration(calibration_path, self.manifest.bundle_id)
        self.last_probe_ms: float | None = None  # the last probe's own time, unscaled
        self._calibrated_mono = -float("inf")
        # Windows' own heads (never probes) since the decision's variant and clock last
        # changed: what a calibrating probe is compared with.
        self._window_heads: deque[float] = deque(maxlen=RUN_SAMPLES)
        self._window_key: tuple[str, object] | None = None
        self._ran: set[tuple[str, Part]] = set()  # sessions past their first run
        # Window close to result (ms) of the windows finished since telemetry last took
        # them, by the decision's variant: how each path really does against its plan.
        self._fresh_windows = FreshMedians()
        # The uplink rate sensed now (gateway/linksense.py) and the CPU clock setter; the
        # control plane plugs both in when it has them.
        self.link_rate: LinkRate = lambda: None
        self.set_clock: Callable[[float], None] | None = None
        # Emulated radio: seconds to hold a frame of n bytes before sending (0 on a real one).
        self.airtime: Callable[[int], float] = lambda n: 0.0
        self._radio_free = 0.0  # monotonic time the emulated radio finishes its last frame
        # Server probes while windows run on the device (`probe_server_after`); 0: none.
        self.server_probe_every_s = 0.0
        self._server_probe: asyncio.Task[None] | None = None
        self._next_server_probe = -float("inf")
        self._server_probe_wait_s: float | None = None  # drawn at each probe; None: the period
        self._probing: dict[tuple[str, int], asyncio.Future[TailReply]] = {}
        self._lost_probes: deque[tuple[str, int]] = deque(maxlen=LOST_PROBES_REMEMBERED)
        # Open the fallback now: the first window that needs it is already late, and must
        # not also pay for creating a session.
        self.warm(self.fallback_of(decision))

    def warm(self, variant: Variant) -> None:
        """Open the sessions an on-device run of `variant` needs (call from the ORT thread
        or before the loop runs: sessions are never created concurrently)."""
        for part in ("head", "tail"):
            if getattr(variant, part):
                self.runtime.session(variant.id, part)

    def fallback_of(self, dec: Decision) -> Variant:
        """The on-device variant a window of `dec` falls back to."""
        if dec.fallback is not None:
            return self.manifest.variant(dec.fallback)
        return self.manifest.device_variant(self.manifest.variant(dec.variant).pruning_ratio)

    def on_reply(self, reply: TailReply) -> None:
        """Resolve the window awaiting this downlink reply (late replies are counted)."""
        key = (reply.stream, reply.window)
        probe = self._probing.pop(key, None)
        if probe is not None and not probe.done():
            probe.set_result(reply)
            return
        if key in self._lost_probes and key not in self.uplink.pending:
            return  # a probe's, after it stopped waiting: not a window's late reply
        fut = self.uplink.pending.pop(key, None)
        if fut is None or fut.done():
            self.uplink.late_reply(key)
            return
        fut.set_result(reply)

    @property
    def head_ms(self) -> dict[str, float]:
        """Head latency by variant id (ms): the median of its recent runs."""
        return self.run_ms.heads()

    def take_fresh_head_ms(self) -> dict[str, float]:
        """For telemetry: the median head time of each variant run since the last call."""
        return self.run_ms.take_fresh_heads()

    def take_fresh_window_ms(self) -> dict[str, float]:
        """For telemetry: the median latency of the windows finished since the last call, by
        the variant of the decision they ran under; then forget them."""
        return self._fresh_windows.take()

    async def probe_head(self, every_s: float) -> float | None:
        """Time one head on the last window's tokens if one is due; the time reported (ms).

        A decision that runs no head here (the server runs the whole model) leaves the
        coordinator's idea of this device's speed as it was when it moved away, perhaps in a
        slow spell; a probe of the on-device variant at most every `every_s` lets it see the
        device is fast again. It is reported as the calibration scales it. While windows
        run heads here, a probe of their variant every CALIBRATE_EVERY intervals, beside
        their recent median, calibrates the probes instead (reported: None). None also when
        there is nothing to run yet.
        """
        tokens = self._last_tokens
        own = self.manifest.variant(self.decision.variant)
        if tokens is None:
            return None
        if own.head:
            await self._calibrate(own.id, tokens, every_s)
            return None
        variant = self.fallback_of(self.decision)
        if time.monotonic() - self.last_head_mono < every_s or not variant.head:
            return None
        _, ms, first = await self._timed(variant.id, "head", tokens)
        if first:
            return None
        self.last_probe_ms = ms
        ms *= self.probe_calibration.scale
        self._record(variant.id, "head", ms)
        return ms

    async def _calibrate(self, variant: str, tokens: np.ndarray, every_s: float) -> None:
        """If due, time a head of `variant` beside its windows' recent median (same clock)."""
        now = time.monotonic()
        if (now - self._calibrated_mono < every_s * CALIBRATE_EVERY
                or self._window_key != self._head_key(variant)
                or len(self._window_heads) < CALIBRATION_MIN_RUNS):
            return
        window_ms = statistics.median(self._window_heads)
        self._calibrated_mono = now
        _, ms, first = await self._timed(variant, "head", tokens)
        if not first and self._window_key == self._head_key(variant):  # clock unchanged
            self.last_probe_ms = ms
            self.probe_calibration.update(window_ms, ms)

    async def _timed(self, variant: str, part: Part, x: np.ndarray
                     ) -> tuple[np.ndarray, float, bool]:
        """Run one session on the ORT thread: its output, its time (ms), and whether it was
        the session's first run."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        out = await loop.run_in_executor(self.executor, self.runtime.run, variant, part, x)
        ms = (time.perf_counter() - t0) * 1000
        first = (variant, part) not in self._ran
        self._ran.add((variant, part))
        return out, ms, first

    async def _run(self, variant: str, part: Part, x: np.ndarray, boosted: bool = False
                   ) -> tuple[np.ndarray, float]:
        out, ms, first = await self._timed(variant, part, x)
        # ORT's first run of a session allocates its buffers (3x a later run here): folded
        # in, it would make the device look slow to the coordinator for minutes.
        if not first:
            self._record(variant, part, ms, boosted)
            if part == "head" and not boosted:
                key = self._head_key(variant)
                if key != self._window_key:
                    self._window_heads.clear()
                    self._window_key = key
                self._window_heads.append(ms)
        return out, ms

    def _head_key(self, variant: str) -> tuple[str, object]:
        """A head's variant and the decision's clock: calibrate like against like."""
        return variant, self.decision.extra.get("cpu_hz")

    def _record(self, variant: str, part: Part, ms: float, boosted: bool = False) -> None:
        (self.boosted_ms if boosted else self.run_ms).add((variant, part), ms)
        if part == "head" and not boosted:
            self.last_head_mono = time.monotonic()

    async def _fallback(self, variant: Variant, tokens: np.ndarray) -> tuple[np.ndarray, float]:
        """An on-device run of the fallback, at the decision's fallback clock if it has one."""
        dec, clocks = self.decision, self._boost_clocks()
        if clocks is None or self.set_clock is None:
            return await self._device(variant, tokens)
        boost, back = clocks
        self.set_clock(boost)
        try:
            return await self._device(variant, tokens, boosted=True)
        finally:
            if self.decision is dec:  # a newer decision has set its own clock
                self.set_clock(back)

    def _boost_clocks(self) -> tuple[float, float] | None:
        """(fallback clock, decision clock to return to) when a fallback runs at a clock of
        its own: the decision names one, we can set clocks, and we know the way back."""
        dec = self.decision
        back = dec.extra.get("cpu_hz")
        if dec.fallback_hz is None or self.set_clock is None or not isinstance(back, int | float):
            return None
        return dec.fallback_hz, float(back)

    def _skip_server(self, variant: Variant, precision: Precision, cutoff: float
                     ) -> Literal["down", "link", "probe"] | None:
        """Why this window should not even try the server; "probe" or None to try it.

        "down": a recent reply timed out and the next probe is not due. "link": the head plus
        the frame's round trip overruns the cutoff. The frame's bits at the sensed link rate
        are physics, and skip for sure. The rest of a predicted round trip is reply history,
        which may be stale (one cold reply must not shut the server out for good), so when
        only history says late, a due probe still goes out ("probe").
        """
        up, now = self.uplink, time.monotonic()
        if not up.server_ok and now < up.next_probe:
            return "down"
        key = link_key(variant.id, precision)
        bits = up.frame_bits.get(key) or 8.0 * variant.profile.feature_bytes.get(precision, 0)
        rate = self.link_rate()
        head_s = (self.run_ms.get((variant.id, "head")) or 0.0) / 1000 if variant.head else 0.0
        budget = cutoff - now
        if rate is not None and (head_s + bits / rate) * (1 + GUARD_MARGIN) > budget:
            return "link"
        rtt = up.predict(key, bits, rate)
        if rtt is None:
            return None
        if (head_s + rtt) * (1 + GUARD_MARGIN) <= budget:
            return None
        return "link" if now < up.next_probe else "probe"

    async def _device(self, variant: Variant, tokens: np.ndarray, boosted: bool = False
                      ) -> tuple[np.ndarray, float]:
        """Run the whole model of `variant` (split = L) on the device."""
        x, ms = (await self._run(variant.id, "head", tokens, boosted) if variant.head
                 else (tokens, 0.0))
        if variant.tail:
            x, ms2 = await self._run(variant.id, "tail", x, boosted)
            ms += ms2
        return x, ms

    def fallback_reserve_s(self, fallback: Variant) -> float:
        """Time to keep back from the server for an on-device run of `fallback`: the
        decision's margin (sure or lean, edgetok.control) times the run's time
        (`fallback_run_ms`), plus FALLBACK_SLACK_S."""
        margin = self.decision.fallback_margin or FALLBACK_MARGIN
        return self.fallback_run_ms(fallback)[0] / 1000 * margin + FALLBACK_SLACK_S

    def fallback_run_ms(self, fallback: Variant) -> tuple[float, bool]:
        """How long an on-device run of `fallback` takes at the fallback clock (ms), and
        whether that was measured here: its own runs at that clock, unless its runs (or
        probes) at the decision's clock are newer; those scaled to the fallback clock; else
        (not measured) the bundle's profile.

        Runs at the decision's clock come before the profile: a 10% gateway whose fallback
        had never run at a raised clock sized its reserve from the profile, 24 ms, while
        its probes of the same variant at the same clock took 45 (e2e run 31): a server
        that failed to answer would have left the fallback too little time. And the newer
        come first: two fallbacks at the start of a round (47 and 58 ms) stood for the rest
        of it while the windows ran the same variant on the device in 30-50 ms, and shut
        the server path, whose lean reserve they overran (e2e run 42, pi-link-50).
        """
        both: tuple[Part, Part] = ("head", "tail")
        parts = [p for p in both if getattr(fallback, p)]
        clocks = self._boost_clocks()
        boosted = self._run_ms(self.boosted_ms, fallback.id, parts) if clocks else None
        scaled = self._run_ms(self.run_ms, fallback.id, parts)
        if scaled is not None and clocks is not None and clocks[0] > 0:
            scaled *= clocks[1] / clocks[0]  # measured at the decision's clock
        est = scaled if scaled is not None and (
            boosted is None or self._newest(fallback.id, parts) is self.run_ms) else boosted
        if est is not None:
            return est, True
        # Not run yet here: the bundle's profile is the best guess, ...
        est = fallback.profile.head_ms_1t + fallback.profile.tail_ms_1t
        clock = self.decision.fallback_hz or self.decision.extra.get("cpu_hz")
        if isinstance(clock, int | float) and clock > 0:
            # ... slowed to the clock in force when that is below the profiling clock.
            est *= max(1.0, self.manifest.reference_hz / clock)
        return est, False

    def measured_fallback(self) -> tuple[str, float] | None:
        """For telemetry: the decision's fallback and its run time (ms), as a reserve for it
        would be sized here, once measured here; None otherwise.

        The coordinator plans each transmission with this reserve: from its own speed
        estimate, which follows the probes slowly, it went on planning the sure reserve
        for 10 s of a 10% gateway's start while the gateway, sizing it from its 45-50 ms
        fallback runs, kept every window off the server (e2e run 34, pi-link-50).
        It is reported on the device too, where that run is the windows' own: reported only
        while transmitting, the figure froze at the slow probe that had sent a 10% gateway
        to its device (58 ms), and the server path stayed shut for the rest of the round
        while its windows took 39 (e2e run 37, pi-link-50).
        """
        fallback = self.fallback_of(self.decision)
        ms, measured = self.fallback_run_ms(fallback)
        return (fallback.id, ms) if measured and ms > 0 else None

    def _newest(self, variant: str, parts: list[Part]) -> RunTimes:
        """Of the boosted runs and those at the decision's clock, the one `variant` ran in
        last (the boosted on a tie)."""
        def last(times: RunTimes) -> float:
            return max(times.last((variant, p)) for p in parts)
        return self.run_ms if last(self.run_ms) > last(self.boosted_ms) else self.boosted_ms

    @staticmethod
    def _run_ms(times: RunTimes, variant: str, parts: list[Part]) -> float | None:
        """The sum of `variant`'s recent run times over `parts`; None unless all have run."""
        runs = [times.get((variant, p)) for p in parts]
        return sum(r for r in runs if r is not None) if all(r is not None for r in runs) \
            else None

    async def infer(self, win: ClosedWindow, deadline_s: float) -> Result:
        """The result of one window; never raises for a server or link failure."""
        t_start = time.monotonic()
        queue_ms = (t_start - win.closed_mono) * 1000
        deadline_mono = win.closed_mono + deadline_s
        tokens = self.tokenizers[win.stream].tokenize([win.data]).model_input()
        self._last_tokens = tokens
        dec = self.decision
        variant = self.manifest.variant(dec.variant)
        L = self.manifest.num_layers
        head_ms = uplink_ms = tail_ms = 0.0
        where: Where
        logits: np.ndarray | None = None
        if variant.split == L:
            logits, head_ms = await self._device(variant, tokens)
            where = "device"
            self.probe_server_after(win, tokens, deadline_s)
        else:
            fallback = self.fallback_of(dec)
            reserve = self.fallback_reserve_s(fallback)
            if reserve >= deadline_mono - time.monotonic():
                # A fallback could not make the deadline anyway: give the server all of it.
                reserve = 0.0
            cutoff = deadline_mono - reserve
            skip = self._skip_server(variant, dec.precision, cutoff)
            reply: TailReply | None = None
            if skip in (None, "probe"):
                feats = tokens
                if variant.head:
                    feats, head_ms = await self._run(variant.id, "head", tokens)
                reply, uplink_ms = await self._remote(win, variant, dec.precision, feats, cutoff,
                                                      probe=skip == "probe", until=deadline_mono)
            if reply is not None and reply.error is None:
                logits = np.asarray(reply.logits, dtype=np.float32)[None, :]
                tail_ms = reply.tail_ms
                uplink_ms = max(uplink_ms - tail_ms, 0.0)
                where = "server" if variant.split == 0 else "split"
            else:
                if reply is not None:
                    log.warning("server refused window %s/%d: %s", win.stream, win.seq,
                                reply.error)
                self.uplink.fallbacks += 1
                self.uplink.guarded += skip == "link"
                logits, fb_ms = await self._fallback(fallback, tokens)
                head_ms += fb_ms
                variant = fallback
                where = "device-fallback"
        assert logits is not None
        flat = np.asarray(logits, dtype=np.float64).reshape(-1)
        if flat.size != len(self.manifest.labels) or not np.isfinite(flat).all():
            # A NaN score would be stored as null and break every reader of the result.
            raise InferenceError("bad_output", f"{flat.size} logits from {variant.id}, "
                                 f"finite: {bool(np.isfinite(flat).all())}")
        probs = softmax(flat)
        labels = self.manifest.labels
        total_ms = (time.monotonic() - win.closed_mono) * 1000
        # A fallback counts under the variant that sent the window to the server: that
        # choice cost its wait as well as the fallback.
        self._fresh_windows.add(dec.variant, total_ms)
        return Result(
            gateway=self.gateway, stream=win.stream, window=win.seq, start_ts=win.start_ts,
            end_ts=win.end_ts, label=labels[int(probs.argmax())],
            scores={lab: round(float(p), 6) for lab, p in zip(labels, probs, strict=True)},
            where=where,
            variant=VariantRef(id=variant.id, pruning_ratio=variant.pruning_ratio,
                               split=variant.split, precision=dec.precision),
            latency_ms=Latency(queue=round(queue_ms, 3), head=round(head_ms, 3),
                               uplink=round(uplink_ms, 3), tail=round(tail_ms, 3),
                               total=round(total_ms, 3)),
            created_ts=time.time())

    async def _remote(self, win: ClosedWindow, variant: Variant, precision: Precision,
                      feats: np.ndarray, deadline_mono: float, probe: bool = False,
                      until: float | None = None) -> tuple[TailReply | None, float]:
        """Send a frame and await its reply until `deadline_mono` (the cutoff); (None,
        waited) on failure.

        `probe`: the guard's reply history advised against this frame. Its reply, like the
        first after an outage, replaces that history rather than being averaged into it.
        `until`: the window's own deadline, when later than the cutoff: a reply cut off
        before it is counted as the reserve's doing if it comes by then."""
        up = self.uplink
        now = time.monotonic()
        if not up.server_ok and now < up.next_probe:
            return None, 0.0
        up.next_probe = now + PROBE_INTERVAL_S
        if deadline_mono <= now:
            return None, 0.0
        key = (win.stream, win.seq)
        t0 = time.monotonic()
        try:
            reply, rtt_s, left_s, hold = await self._exchange(win, variant, precision, feats,
                                                              deadline_mono)
        except TimeoutError:
            if until is not None and until > deadline_mono:
                up.cut(key, until)
            if up.server_ok:
                log.warning("no reply for %s/%d within its deadline; falling back on-device",
                            win.stream, win.seq)
            up.server_ok = False
            return None, (time.monotonic() - t0) * 1000
        fresh = probe or not up.server_ok  # a probe's reply, or the first after an outage
        if not up.server_ok:
            log.info("edge server answers again; resuming split inference")
        up.server_ok = True
        self._learn_reply(link_key(variant.id, precision), reply, rtt_s, left_s, hold, fresh)
        return reply, rtt_s * 1000

    async def _exchange(self, win: ClosedWindow, variant: Variant, precision: Precision,
                        feats: np.ndarray, deadline_mono: float, server_probe: bool = False
                        ) -> tuple[TailReply, float, float, float]:
        """Send one frame of `feats` and await its reply until `deadline_mono`: the reply,
        its round trip from the encoded frame, the time the frame took to leave and its
        radio hold (s); TimeoutError when it could not leave or no reply came in time. A
        `server_probe`'s frame says so, and is counted apart from the windows'."""
        up = self.uplink
        pending = self._probing if server_probe else up.pending
        remaining = deadline_mono - time.monotonic()
        header = FrameHeader(
            gateway=self.gateway, bundle=self.manifest.bundle_id, variant=variant.id,
            stream=win.stream, window=win.seq, start_ts=win.start_ts, end_ts=win.end_ts,
            deadline_ts=time.time() + remaining, sent_ts=time.time(), precision=precision,
            shape=tuple(feats.shape), extra={"probe": True} if server_probe else {})
        frame = encode_frame(header, feats)
        up.frame_bits[link_key(variant.id, precision)] = 8.0 * len(frame)
        key = (win.stream, win.seq)
        fut: asyncio.Future[TailReply] = asyncio.get_running_loop().create_future()
        pending[key] = fut
        t0 = time.monotonic()
        try:
            hold = self.airtime(len(frame))
            if hold > 0:  # frames queue for the emulated radio, one after the other
                self._radio_free = max(t0, self._radio_free) + hold
                hold = self._radio_free - t0
                await asyncio.sleep(hold)
                if time.monotonic() >= deadline_mono:  # still on the air at the cutoff
                    raise TimeoutError
            left_s = time.monotonic() - t0
            if not await self.publish_frame(frame, remaining):
                raise TimeoutError
            if server_probe:
                up.probes_sent += 1
                up.probe_bytes += len(frame)
            else:
                up.frames_sent += 1
                up.bytes_sent += len(frame)
            reply = await within(fut, max(deadline_mono - time.monotonic(), 0.0))
        except TimeoutError:
            pending.pop(key, None)
            raise
        return reply, time.monotonic() - t0, left_s, hold

    def _learn_reply(self, link_key: str, reply: TailReply, rtt_s: float, left_s: float,
                     hold_s: float, fresh: bool) -> None:
        """Fold a good reply's round trip into the link guard and the per-frame overhead."""
        if reply.error is not None:
            return
        up, rate = self.uplink, self.link_rate()
        up.learn(link_key, rtt_s, rate, fresh=fresh)
        up.learn_overhead(rtt_s, reply.tail_ms / 1000, up.frame_bits[link_key], rate, left_s,
                          hold_s)

    def probe_server_after(self, win: ClosedWindow, tokens: np.ndarray, deadline_s: float
                           ) -> None:
        """After a window done on the device, send its tokens to the server if a probe is
        due, in the background; the reply is learned from and thrown away.

        On its device a gateway sends no frame, so the coordinator would know the server
        path only from the model (and the fleet) until it tried it with real windows: at the
        start of each e2e round, the model planned that path at 2.2 ms, its windows took
        15-17, and joint ran them there for 1.5-4.7 s (runs 46-47). A probe measures the
        path's per-frame overhead and round trip without putting a window at risk. Due
        every `server_probe_every_s` while the link rate is sensed (the overhead is
        measured against it), back to back (SERVER_PROBE_BURST) while there is no overhead
        figure yet; one at a time, at the same bounded pace when the server does not answer.
        Each wait is drawn around the period (SERVER_PROBE_JITTER).
        """
        every = self.server_probe_every_s
        now = time.monotonic()
        if (every <= 0 or not self.decision.server_probes or self._server_probe is not None
                or now < self._next_server_probe or self.link_rate() is None):
            return
        up = self.uplink
        wait = self._server_probe_wait_s or every
        if up.overhead_s is not None and now - up.last_overhead_mono < wait:
            return
        variant = self._probe_variant()
        if variant is None:
            return
        self._server_probe_wait_s = every * random.uniform(1 - SERVER_PROBE_JITTER,
                                                           1 + SERVER_PROBE_JITTER)
        self._next_server_probe = now + self._server_probe_wait_s
        self._server_probe = asyncio.get_running_loop().create_task(
            self._probe_server(win, variant, tokens, deadline_s))
        self._server_probe.add_done_callback(self._server_probe_done)

    def _probe_variant(self) -> Variant | None:
        """What a server probe sends: the whole model on the server (split 0, no head run
        here) at the pruning ratio nearest the decision's; None if the bundle has none."""
        ratio = self.manifest.variant(self.decision.variant).pruning_ratio
        remote = [v for v in self.manifest.variants if v.split == 0 and v.tail]
        return min(remote, key=lambda v: abs(v.pruning_ratio - ratio)) if remote else None

    async def _probe_server(self, win: ClosedWindow, variant: Variant, tokens: np.ndarray,
                            deadline_s: float) -> None:
        """Send server probes of `tokens` until the uplink has an overhead figure (at most
        SERVER_PROBE_BURST), or one if it has; a lost one ends them."""
        up = self.uplink
        L = self.manifest.num_layers
        for _ in range(SERVER_PROBE_BURST):
            try:
                reply, rtt_s, left_s, hold = await self._exchange(
                    win, variant, SERVER_PROBE_PRECISION, tokens,
                    time.monotonic() + deadline_s, server_probe=True)
            except TimeoutError:
                up.probes_lost += 1
                self._lost_probes.append((win.stream, win.seq))
                return
            self._learn_reply(link_key(variant.id, SERVER_PROBE_PRECISION), reply, rtt_s, left_s,
                              hold, fresh=False)
            on_device = self.manifest.variant(self.decision.variant).split == L
            if reply.error is not None or up.overhead_s is not None or not on_device:
                return

    def _server_probe_done(self, task: asyncio.Task[None]) -> None:
        """Clear the probe under way; log what went wrong with it, if anything."""
        self._server_probe = None
        if not task.cancelled() and task.exception() is not None:
            # A measurement must never take a window down; it is only logged.
            log.warning("server probe failed: %s", task.exception())

    def close(self) -> None:
        if self._server_probe is not None:
            self._server_probe.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)
