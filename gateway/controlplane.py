"""Gateway side of the control plane: apply the coordinator's decisions, report telemetry."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque
from typing import TYPE_CHECKING

from edgetok.aio import wait_event
from edgetok.control import ControlError, Decision, Telemetry, decode_decision, encode_telemetry
from edgetok.gateway.actuators import Actuators
from edgetok.gateway.inference import Decision as Running
from edgetok.gateway.linksense import LinkSensor
from edgetok.models.bundle import BundleError

if TYPE_CHECKING:
    from edgetok.gateway.daemon import Gateway
    from edgetok.gateway.models import Result

log = logging.getLogger(__name__)

# Results kept for telemetry statistics: enough for a stable median at a few windows/s.
RECENT = 256
# A clock or transmit power that did not take (tc or iw failed or hung) is tried again this
# often until it does or a newer decision replaces it. Decisions are retained: the
# coordinator does not send one again, so dropping it would leave the old power in force.
ACTUATE_RETRY_S = 2.0


class ControlPlane:
    """Decisions in, telemetry out, and what was predicted versus measured."""

    def __init__(self, gw: Gateway, actuators: Actuators) -> None:
        self.gw = gw
        self.actuators = actuators
        a = actuators.s
        self.sensor = LinkSensor(a.link_sense, a.interface, a.link_sense_interval_s)
        gw.inferencer.link_rate = self.sensor.rate_bps
        gw.inferencer.set_clock = actuators.set_cpu
        gw.inferencer.airtime = actuators.airtime_s
        actuators.link_rate = self.sensor.rate_bps
        self.last: Decision | None = None
        self.pending: Decision | None = None  # the newest received, not applied yet
        self.actuation_due: Decision | None = None  # applied, but its clock or power not yet
        self._wake = asyncio.Event()  # a decision arrived
        self.rejected = 0
        self.reports_failed = 0  # telemetry reports that could not be built
        self.recent: deque[Result] = deque(maxlen=RECENT)
        self._bytes_mark = 0
        self._probes_mark = 0
        self._uplink_s = 0.0
        self._done_mark = 0
        self._cut_mark = 0
        self._t_mark = time.monotonic()
        self._window_done = asyncio.Event()  # wakes the head probe

    def on_result(self, r: Result) -> None:
        self.recent.append(r)
        if r.where in ("split", "server"):
            self._uplink_s += r.latency_ms.uplink / 1000
        if r.where != "device-fallback":
            self._window_done.set()

    def on_control(self, payload: bytes) -> None:
        """Validate a decision and hand it to the applier; bad ones are logged and counted.

        Applying it (warming sessions, tc or iw) waits its turn in its own task: the MQTT
        reader goes straight on to the downlink replies behind it.
        """
        gw = self.gw
        try:
            d = decode_decision(payload)
            if d.gateway != gw.cfg.id:
                raise ControlError(f"decision is for gateway {d.gateway!r}")
            if d.bundle != gw.manifest.bundle_id:
                raise ControlError(f"decision names bundle {d.bundle}, loaded is "
                                   f"{gw.manifest.bundle_id}")
            gw.manifest.variant(d.variant)
            if d.fallback_variant is not None and \
                    gw.manifest.variant(d.fallback_variant).split != gw.manifest.num_layers:
                raise ControlError(f"fallback {d.fallback_variant} is not an on-device variant")
        except (ControlError, BundleError) as exc:
            self.rejected += 1
            log.warning("ignoring control message: %s", exc)
            return
        if not d.supersedes(self.pending or self.last):
            return
        self.pending = d  # one that still waits is superseded: only the newest is applied
        self._wake.set()

    async def _applier(self) -> None:
        """Apply the newest decision received, and retry an actuation that did not take."""
        while True:
            await wait_event(self._wake, ACTUATE_RETRY_S if self.actuation_due else None)
            self._wake.clear()
            d, self.pending = self.pending, None
            try:
                if d is not None:
                    await self._apply(d)
                elif self.actuation_due is not None:
                    due = self.actuation_due
                    if await self.actuators.apply(due.cpu_hz, due.tx_power_w):
                        log.info("decision #%d: clock and transmit power in force", due.seq)
                        self.actuation_due = None
            except Exception:  # one bad decision must not take the control plane down
                log.exception("cannot apply decision #%d", d.seq if d else -1)

    async def _apply(self, d: Decision) -> None:
        """Warm the decision's sessions, switch to it, then set its clock and power."""
        gw = self.gw
        # Warm the sessions first, so the swap itself costs the next window nothing.
        loop = asyncio.get_running_loop()
        v = gw.manifest.variant(d.variant)
        parts = ["head"] if v.head else []
        if v.split == gw.manifest.num_layers and v.tail:
            parts.append("tail")  # on-device variants run their own tail
        for part in parts:
            await loop.run_in_executor(gw.inferencer.executor, gw.runtime.session,
                                       d.variant, part)
        running = Running(
            d.variant, d.precision, seq=d.seq, source=f"coordinator:{d.policy}",
            extra={"predicted_latency_ms": d.latency_ms, "predicted_energy_mj": d.energy_mj,
                   "feasible": d.feasible, "cpu_hz": d.cpu_hz, "tx_power_w": d.tx_power_w},
            fallback=d.fallback_variant, fallback_hz=d.fallback_cpu_hz,
            fallback_margin=d.fallback_margin, server_probes=d.server_probes)
        # The fallback must be warm too: the window that needs it is already late.
        await loop.run_in_executor(gw.inferencer.executor, gw.inferencer.warm,
                                   gw.inferencer.fallback_of(running))
        self.actuators.set_cpu(d.cpu_hz)  # one sysfs or cgroup write: before the swap
        self.last = d
        gw.inferencer.decision = running
        log.info("decision #%d: %s %s (cpu %.2f GHz, tx %.3f W, predicted %.1f ms)", d.seq,
                 d.variant, d.precision, d.cpu_hz / 1e9, d.tx_power_w, d.latency_ms)
        # Telemetry reports the power really in force meanwhile, so the coordinator is not
        # misled while this waits for tc or iw, or for a retry.
        ok = await self.actuators.apply(d.cpu_hz, d.tx_power_w)
        self.actuation_due = None if ok else d

    def measured(self) -> dict[str, float | None]:
        """Mean measured latency over recent results, for predicted-versus-measured."""
        if not self.recent:
            return {"latency_ms": None}
        return {"latency_ms": round(statistics.fmean(r.latency_ms.total for r in self.recent),
                                    3)}

    def telemetry(self) -> Telemetry:
        """One telemetry report covering the time since the previous one."""
        gw = self.gw
        up = gw.inferencer.uplink
        now = time.monotonic()
        sent = up.bytes_sent - self._bytes_mark
        bps = sent * 8 / self._uplink_s if sent and self._uplink_s > 0 else None
        done = gw.counters["results"]
        rate = (done - self._done_mark) / max(now - self._t_mark, 1e-3)
        self._bytes_mark, self._uplink_s = up.bytes_sent, 0.0
        self._done_mark, self._t_mark = done, now
        link = self.sensor.rate_bps()
        # Only when frames (windows' or server probes') went out since the last report (the
        # coordinator tells a fresh figure from a stale one by its arrival), and measured
        # against the sensed rate, so meaningless without it.
        probed, self._probes_mark = up.probes_sent - self._probes_mark, up.probes_sent
        fresh = bool(sent or probed) and link is not None
        ov, fl = up.overhead_s, up.floor_s
        overhead = round(ov * 1e3, 3) if fresh and ov is not None else None
        floor = round(fl * 1e3, 3) if fresh and fl is not None else None
        fallback = gw.inferencer.measured_fallback()
        cut = up.guarded + up.replies_cut
        cut_off, self._cut_mark = cut - self._cut_mark, cut
        return Telemetry(
            gateway=gw.cfg.id, ts=time.time(), uplink_bps=bps,
            tx_power_w=self.actuators.effective_tx_power_w(), link_bps=link,
            frame_overhead_ms=overhead, frame_floor_ms=floor,
            cpu_hz=self.actuators.effective_cpu_hz(),
            head_ms={k: round(v, 3) for k, v in gw.inferencer.take_fresh_head_ms().items()},
            fallback_variant=fallback[0] if fallback else None,
            fallback_ms=round(fallback[1], 3) if fallback else None, cut_off=cut_off,
            queue_depth=len(gw.inflight), windows_per_s=round(rate, 4), windows_done=done,
            latency_ms=self.measured()["latency_ms"],
            window_ms={k: round(v, 3) for k, v in gw.inferencer.take_fresh_window_ms().items()},
            deadline_ms=min(s.deadline_ms for s in gw.cfg.streams),
            applied_seq=self.last.seq if self.last else None, bundle=gw.manifest.bundle_id)

    async def run(self) -> None:
        """Sense the link and publish telemetry every interval."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.sensor.run())
            tg.create_task(self._applier())
            tg.create_task(self._report())
            if self.gw.cfg.head_probe_interval_s > 0 and \
                    self.gw.cfg.decision.follow_coordinator:
                tg.create_task(self._probe_heads())

    async def _probe_heads(self) -> None:
        """Time a head now and then when the decision runs none, and calibrate such probes
        while it runs one (Inferencer.probe_head).

        A probe runs right after a window is done, not on an idle gateway: a window's head
        runs just after its ingest and tokenizing, and on a CPU capped by a quota (a
        container, or the test bed's emulated clock) an idle head runs as a burst at full
        speed. Idle probes at 10% of a core read 1.5-10 ms against 15-29 ms for windows'
        heads, and sent the coordinator back and forth between device and server.
        """
        every = self.gw.cfg.head_probe_interval_s
        inf = self.gw.inferencer
        while True:
            await self._window_done.wait()
            self._window_done.clear()
            # Not while another window is in flight: it would queue behind the probe on the
            # single ORT thread.
            if self.gw.inflight:
                continue
            try:
                ms = await inf.probe_head(every)
            except Exception as exc:  # a measurement must never take the control plane down
                log.warning("head probe failed: %s", exc)
                continue
            if ms is not None:
                log.debug("head probe: %.2f ms", ms)

    async def _report(self) -> None:
        """Publish telemetry every interval (QoS 0: a lost report is superseded anyway)."""
        while True:
            await asyncio.sleep(self.gw.cfg.telemetry_interval_s)
            try:
                payload = encode_telemetry(self.telemetry())
            except Exception:
                # A figure the wire refuses (say a NaN from a clock step) must cost one report,
                # not the control plane's task group and with it the daemon.
                self.reports_failed += 1
                if self.reports_failed == 1:
                    log.exception("could not build a telemetry report; skipping it")
                continue
            await self.gw.session.publish(self.gw.topics.telemetry, payload, qos=0, wait_s=0)

    def status(self) -> dict[str, object]:
        d, cal = self.last, self.gw.inferencer.probe_calibration
        return {"decision": d.model_dump() if d else None, "rejected": self.rejected,
                "reports_failed": self.reports_failed,
                "actuation_due": self.actuation_due is not None,
                "measured": self.measured(), "actuators": self.actuators.status(),
                "head_probe": {"scale": round(cal.scale, 4), "calibrations": cal.samples},
                "link": self.sensor.status()}
