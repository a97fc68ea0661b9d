"""`edgetok server`: runs tails for frames taken from a shared uplink subscription."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from edgetok import __version__
from edgetok.agent.config import ServerConfig
from edgetok.agent.coordinator.online import OnlineController
from edgetok.agent.http import serve_http
from edgetok.agent.metrics import ServerHealth, ServerMetrics
from edgetok.aio import stop_on_signals
from edgetok.control import ControlError, decode_telemetry, encode_decision
from edgetok.frames import FrameError, TailReply, decode_frame
from edgetok.models.bundle import BundleError
from edgetok.models.runtime import Runtime
from edgetok.mqttlink import InMessage, MqttSession
from edgetok.topics import Topics, gateway_of, telemetry_filter, uplink_share_filter

log = logging.getLogger(__name__)

# Frames queued for the tail workers; when full, the MQTT pump waits, so the broker holds
# the backlog instead of this process.
QUEUE_DEPTH = 256
# How often the coordinator checks whether any gateway's decision is due.
COORDINATOR_TICK_S = 0.5


class TailServer:
    """One edge-server process."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.runtimes: dict[str, Runtime] = {}
        for path in cfg.bundles:
            rt = Runtime(path, threads=cfg.threads, max_sessions=cfg.max_sessions,
                         share_weights=cfg.share_weights)
            self.runtimes[rt.manifest.bundle_id] = rt
        self.queue: asyncio.Queue[tuple[InMessage, float]] = asyncio.Queue(maxsize=QUEUE_DEPTH)
        self.executor = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="tail")
        self.stopping = asyncio.Event()
        self.counters = {"frames": 0, "replies": 0, "expired": 0, "errors": 0}
        self.busy_s = 0.0
        self.started = time.time()
        self.controller: OnlineController | None = None
        subs = [uplink_share_filter(cfg.mqtt.prefix, cfg.group)]
        if cfg.coordinator is not None:
            manifest = next(iter(self.runtimes.values())).manifest
            self.controller = OnlineController(cfg.coordinator, manifest)
            self.coordinated_bundle = manifest.bundle_id
            subs += [telemetry_filter(cfg.mqtt.prefix), f"{cfg.mqtt.prefix}/+/status"]
        self.telemetry_rejected = 0
        self.session = MqttSession(
            cfg.mqtt, cfg.mqtt.client_id or f"edgetok-srv-{cfg.id}",
            password=cfg.mqtt_password(), subscriptions=subs, manual_ack=False,
            on_message=self._route)
        self.http_port = cfg.http.port
        self.queue_wait_ms: float | None = None
        self.decisions = 0
        self.metrics = ServerMetrics(self)
        self.health = ServerHealth(self)

    async def _route(self, msg: InMessage) -> None:
        if self.controller is not None and msg.topic.endswith("/status"):
            self._on_status(msg)
            return
        if self.controller is not None and msg.topic.endswith("/telemetry"):
            try:
                t = decode_telemetry(msg.payload)
                if t.gateway != gateway_of(msg.topic, self.cfg.mqtt.prefix):
                    # The topic is what the broker's ACL vouches for, not the payload.
                    raise ControlError(f"report names gateway {t.gateway!r}")
                self.controller.observe(t, time.time())
            except ValueError as exc:  # ControlError, or a topic not under our prefix
                self.telemetry_rejected += 1
                log.warning("ignoring telemetry on %s: %s", msg.topic, exc)
            return
        await self.queue.put((msg, time.monotonic()))

    def _on_status(self, msg: InMessage) -> None:
        """Forget a gateway that went offline or stopped, so it no longer shares the cell."""
        assert self.controller is not None
        try:
            state = json.loads(msg.payload).get("state")
            gateway = gateway_of(msg.topic, self.cfg.mqtt.prefix)
        except (ValueError, AttributeError):
            return
        if state in ("offline", "stopped"):
            self.controller.forget(gateway)
            log.info("gateway %s is %s; the coordinator forgets it", gateway, state)

    async def _coordinate(self) -> None:
        """Re-solve every gateway that is due and publish changed decisions, retained."""
        assert self.controller is not None
        while True:
            await asyncio.sleep(COORDINATOR_TICK_S)
            if self.queue_wait_ms is not None:
                self.controller.observe_server(self.queue_wait_ms)
            for d in self.controller.step(time.time()):
                topic = Topics(self.cfg.mqtt.prefix, d.gateway).control
                d = d.model_copy(update={"bundle": self.coordinated_bundle})
                if d.split < self.controller.table.num_layers:
                    # Before the gateway hears of it: else its first frame pays for opening
                    # the session (~40 ms), misses a tight deadline, and teaches its link
                    # guard that this server is slow.
                    await asyncio.get_running_loop().run_in_executor(
                        self.executor, self._warm_tail, self.runtimes[d.bundle], d.variant)
                if await self.session.publish(topic, encode_decision(d), qos=1, retain=True,
                                              wait_s=1.0):
                    self.decisions += 1

    def _warm_tail(self, rt: Runtime, variant: str) -> None:
        """Open a variant's tail session and run it once on zeros (ORT's first run also
        allocates), unless it is open already; a failure is only logged, as the first real
        frame will report it."""
        try:
            v = rt.manifest.variant(variant)
            if v.tail and not rt.is_open(variant, "tail"):
                rt.run(variant, "tail", np.zeros((1, *v.feature_shape), dtype=v.feature_dtype))
        except Exception as exc:  # best effort: it must never stop the coordinator's loop
            log.warning("could not warm the tail of %s: %s", variant, exc)

    def _tail(self, rt: Runtime, variant: str, feats: np.ndarray) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        v = rt.manifest.variant(variant)
        out = rt.run(variant, "tail", feats) if v.tail else feats
        return out, (time.perf_counter() - t0) * 1000

    async def _handle(self, msg: InMessage, waited_s: float = 0.0) -> None:
        """Run one frame's tail and reply to the gateway whose uplink topic it came on."""
        self.counters["frames"] += 1
        received = time.time()
        try:
            header, feats = decode_frame(msg.payload)
            sender = gateway_of(msg.topic, self.cfg.mqtt.prefix)
            if header.gateway != sender:
                # Replies go to the topic's gateway, which the broker's ACL vouches for; a
                # header naming another (or a wildcard) would answer for someone else.
                raise FrameError(f"header names gateway {header.gateway!r}")
        except (FrameError, ValueError) as exc:
            self.counters["errors"] += 1
            log.warning("dropping frame on %s: %s", msg.topic, exc)
            return
        # Deadline and send time are both the gateway's clock; the budget left between them
        # is timed here from arrival, so a server clock ahead of the gateway's drops nothing.
        if waited_s > header.deadline_ts - header.sent_ts:
            # The gateway has already fallen back; answering would only cost bandwidth.
            self.counters["expired"] += 1
            return
        reply = TailReply(gateway=header.gateway, stream=header.stream, window=header.window,
                          variant=header.variant, logits=[], tail_ms=0.0, server=self.cfg.id,
                          received_ts=received)
        rt = self.runtimes.get(header.bundle)
        if rt is None:
            reply = _with_error(reply, f"server has no bundle {header.bundle}")
        else:
            try:
                loop = asyncio.get_running_loop()
                out, ms = await loop.run_in_executor(self.executor, self._tail, rt,
                                                     header.variant, feats)
                self.busy_s += ms / 1000
                self.metrics.on_tail(ms / 1000)
                if self.controller is not None and header.bundle == self.coordinated_bundle:
                    self.controller.observe_tail(header.variant, ms, time.time())
                reply = TailReply(
                    gateway=reply.gateway, stream=reply.stream, window=reply.window,
                    variant=reply.variant, logits=[float(x) for x in out.reshape(-1)],
                    tail_ms=round(ms, 3), server=reply.server, received_ts=received)
            except (BundleError, ValueError, RuntimeError) as exc:
                self.counters["errors"] += 1
                reply = _with_error(reply, f"{type(exc).__name__}: {exc}")
        topics = Topics(self.cfg.mqtt.prefix, header.gateway)
        if await self.session.publish(topics.downlink, reply.encode(), qos=1, wait_s=5.0):
            self.counters["replies"] += 1

    async def _worker(self) -> None:
        while True:
            msg, t_in = await self.queue.get()
            wait = (time.monotonic() - t_in) * 1000
            self.queue_wait_ms = wait if self.queue_wait_ms is None else (
                0.8 * self.queue_wait_ms + 0.2 * wait)
            try:
                await self._handle(msg, wait / 1000)
            except Exception:  # a bad frame must not kill the worker
                self.counters["errors"] += 1
                log.exception("tail worker failed on a frame from %s", msg.topic)

    def status(self) -> dict[str, object]:
        """What /v1/status reports."""
        return {
            "server": self.cfg.id, "version": __version__, "group": self.cfg.group,
            "uptime_s": round(time.time() - self.started), "bundles": sorted(self.runtimes),
            "sessions": {b: rt.session_names for b, rt in sorted(self.runtimes.items())},
            "mqtt": {"connected": self.session.connected.is_set(),
                     "connects": self.session.connects},
            "counters": self.counters, "busy_s": round(self.busy_s, 3),
            "queue_depth": self.queue.qsize(),
            "queue_wait_ms": None if self.queue_wait_ms is None else round(self.queue_wait_ms, 3),
            "coordinator": None if self.controller is None else {
                "policy": self.controller.config.policy, "decisions": self.decisions,
                "telemetry_rejected": self.telemetry_rejected,
                **self.controller.snapshot(time.time())}}

    async def run(self) -> None:
        """Serve until `stopping` is set."""
        # Bind first: a taken port is a plain start-up error, before any task exists.
        runner = await serve_http(self)
        async with asyncio.TaskGroup() as tg:
            mqtt_task = tg.create_task(self.session.run())
            workers = [tg.create_task(self._worker()) for _ in range(self.cfg.workers)]
            if self.controller is not None:
                workers.append(tg.create_task(self._coordinate()))
            workers.append(tg.create_task(self.health.run()))  # READY=1, WATCHDOG=1
            await self.stopping.wait()
            self.health.stopping()
            for w in workers:
                w.cancel()
            await runner.cleanup()
            await self.session.close()
            await mqtt_task
        self.executor.shutdown(wait=False, cancel_futures=True)


def _with_error(reply: TailReply, error: str) -> TailReply:
    return TailReply(gateway=reply.gateway, stream=reply.stream, window=reply.window,
                     variant=reply.variant, logits=[], tail_ms=0.0, server=reply.server,
                     received_ts=reply.received_ts, error=error)


async def run_server(cfg: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT."""
    from edgetok.agent.http import preflight

    preflight(cfg)  # an exposed API without a token is refused before anything starts
    srv = TailServer(cfg)
    stop_on_signals(srv.stopping)
    await srv.run()
    return 0


def main(config: Path) -> int:
    """Entry point for `edgetok server`."""
    from edgetok.agent.config import load

    return asyncio.run(run_server(load(config)))
