"""Local HTTP API of the gateway (aiohttp): results, live stream, status, health, metrics."""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web

from edgetok import __version__
from edgetok.aio import wait_event
from edgetok.gateway import api_spec
from edgetok.gateway.models import (
    Alive,
    BundleInfo,
    DecisionInfo,
    JournalInfo,
    MqttInfo,
    ResultsPage,
    Status,
    StreamInfo,
    StreamsPage,
    UplinkInfo,
)
from edgetok.mqttlink import check_tls
from edgetok.settings import ConfigError, all_problems, require_readable
from edgetok.web import (
    BindRefused,
    bearer_auth,
    check_bind,
    http_error,
    is_loopback,
    json_errors,
    metrics_response,
    model_response,
    readiness_response,
    start,
    tls_context,
)

if TYPE_CHECKING:
    from edgetok.gateway.config import GatewayConfig
    from edgetok.gateway.daemon import Gateway

__all__ = ["BindRefused", "build_app", "is_loopback", "preflight", "serve", "status_doc"]

log = logging.getLogger(__name__)

MAX_LIMIT = api_spec.MAX_LIMIT
MAX_ID = api_spec.MAX_ID
# Results read from SQLite per SSE batch: bounds the time one client holds the loop while it
# catches up from an old Last-Event-ID; it then continues in further batches.
SSE_BATCH = 200
# A comment line this often keeps proxies from closing an idle stream and lets us notice a
# client that went away.
SSE_KEEPALIVE_S = 15.0
# What EventSource waits before reconnecting after the stream ends (e.g. a gateway restart).
SSE_RETRY_MS = 2000

GATEWAY_KEY = web.AppKey("gateway", object)
FEED_KEY = web.AppKey("feed", object)
SPEC_KEY = web.AppKey("spec", dict)
PAGE_KEY = web.AppKey("page", str)


class Feed:
    """Wakes SSE handlers when a result is stored, and ends them on shutdown."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.closed = False

    def notify(self, _result: object = None) -> None:
        """Wake everyone waiting; later waiters wait for the next result."""
        self._event.set()
        self._event = asyncio.Event()

    def close(self) -> None:
        """End every stream (the server is shutting down)."""
        self.closed = True
        self.notify()

    async def wait(self, limit_s: float) -> bool:
        """True if a result (or the shutdown) came within `limit_s`."""
        return await wait_event(self._event, limit_s)


def _gw(request: web.Request) -> Gateway:
    gw: Gateway = request.app[GATEWAY_KEY]
    return gw


def _int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise http_error(web.HTTPBadRequest, f"{name} must be an integer") from None
    if not lo <= v <= hi:
        raise http_error(web.HTTPBadRequest, f"{name} must be between {lo} and {hi}")
    return v


def _stream(request: web.Request) -> str | None:
    stream = request.query.get("stream")
    if stream is not None and stream not in _gw(request).streams:
        raise http_error(web.HTTPNotFound, f"unknown stream {stream!r}")
    return stream


async def results(request: web.Request) -> web.Response:
    """GET /v1/results?stream=&since=&since_id=&limit="""
    gw = _gw(request)
    stream = _stream(request)
    since = None
    if "since" in request.query:
        try:
            since = float(request.query["since"])
        except ValueError:
            since = math.nan
        if not math.isfinite(since):
            raise http_error(web.HTTPBadRequest, "since must be a Unix timestamp in seconds")
    limit = _int(request, "limit", 100, 1, MAX_LIMIT)
    since_id = _int(request, "since_id", 0, 0, MAX_ID)
    rows = gw.store.results(stream, since, since_id, limit)
    return model_response(ResultsPage(
        results=rows, next_since_id=rows[-1].id if len(rows) == limit else None))


async def latest(request: web.Request) -> web.Response:
    """GET /v1/results/latest: the newest result of every stream."""
    return model_response(ResultsPage(results=_gw(request).store.latest()))


async def stream_results(request: web.Request) -> web.StreamResponse:
    """GET /v1/results/stream: Server-Sent Events, one per stored result, id = result id.

    A reconnecting client sends Last-Event-ID and gets every result after it from the store,
    so nothing stored while it was away is missed. Without one, the stream starts at `since_id`
    or else with the next new result.
    """
    gw = _gw(request)
    feed: Feed = request.app[FEED_KEY]  # type: ignore[assignment]
    stream = _stream(request)
    resume = request.headers.get("Last-Event-ID", "").strip()
    if resume:
        try:
            last = int(resume)
        except ValueError:
            raise http_error(web.HTTPBadRequest, "Last-Event-ID must be a result id") from None
        if not 0 <= last <= MAX_ID:
            raise http_error(web.HTTPBadRequest, f"Last-Event-ID must be in 0..{MAX_ID}")
    else:
        newest = gw.store.db.execute("SELECT coalesce(max(id), 0) FROM results").fetchone()[0]
        last = _int(request, "since_id", int(newest), 0, MAX_ID)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    try:
        await resp.write(f"retry: {SSE_RETRY_MS}\n\n".encode())
        while not feed.closed:
            rows = gw.store.results(stream, None, last, SSE_BATCH)
            for r in rows:
                await resp.write(f"id: {r.id}\nevent: result\ndata: {r.model_dump_json()}"
                                 "\n\n".encode())
                last = r.id
            if len(rows) == SSE_BATCH:
                continue
            if not await feed.wait(SSE_KEEPALIVE_S):
                await resp.write(b": keepalive\n\n")
    except (ConnectionResetError, asyncio.CancelledError) as exc:
        log.debug("SSE client left: %s", type(exc).__name__)
        if isinstance(exc, asyncio.CancelledError):
            raise
    return resp


async def streams(request: web.Request) -> web.Response:
    """GET /v1/streams"""
    gw = _gw(request)
    counts = gw.store.result_counts()
    page = StreamsPage(streams=[StreamInfo(
        name=s.name, topics=s.topics, channels=s.channels, rate_hz=s.rate_hz, window=s.window,
        hop=s.hop_samples, deadline_ms=s.deadline_ms, open_windows=len(gw.buffers[s.name].open),
        results=counts.get(s.name, (0, None))[0], last_result_ts=counts.get(s.name, (0, None))[1])
        for s in gw.cfg.streams])
    return model_response(page)


def _decision(gw: Gateway) -> DecisionInfo:
    dec = gw.inferencer.decision
    v = gw.manifest.variant(dec.variant)
    known = {k: dec.extra[k] for k in ("predicted_latency_ms", "predicted_energy_mj",
                                       "feasible", "cpu_hz", "tx_power_w") if k in dec.extra}
    fallback: dict[str, Any] = {}
    if v.split < gw.manifest.num_layers:
        fb = gw.inferencer.fallback_of(dec)
        fallback = {"fallback_variant": fb.id, "fallback_margin": dec.fallback_margin,
                    "fallback_reserve_ms": round(gw.inferencer.fallback_reserve_s(fb) * 1e3, 3)}
    return DecisionInfo(variant=dec.variant, pruning_ratio=v.pruning_ratio, split=v.split,
                        precision=dec.precision, seq=dec.seq, source=dec.source, **known,
                        **fallback)


def status_doc(gw: Gateway) -> Status:
    """Everything an operator wants at a glance."""
    up = gw.inferencer.uplink
    control: dict[str, Any] = gw.control.status()
    return Status(
        gateway=gw.cfg.id, version=__version__, uptime_s=round(time.time() - gw.started),
        ready=gw.health.checks(), healthy=gw.health.healthy(),
        bundle=BundleInfo(id=gw.manifest.bundle_id, path=str(gw.cfg.bundle.path),
                          variants=len(gw.manifest.variants), labels=gw.manifest.labels,
                          open_sessions=gw.runtime.open_sessions),
        decision=_decision(gw),
        uplink=UplinkInfo(server_ok=up.server_ok, frames_sent=up.frames_sent,
                          bytes_sent=up.bytes_sent, fallbacks=up.fallbacks,
                          guarded=up.guarded, late_replies=up.replies_late,
                          server_probes=up.probes_sent, server_probe_bytes=up.probe_bytes,
                          server_probes_lost=up.probes_lost,
                          link_bps=gw.control.sensor.rate_bps()),
        mqtt=MqttInfo(connected=gw.session.connected.is_set(), connects=gw.session.connects,
                      last_error=gw.session.last_error),
        journal=JournalInfo(rows=gw.store.journal_rows, max_rows=gw.cfg.journal.max_rows,
                            inflight_windows=len(gw.inflight)),
        control=control, counters=dict(gw.counters),
        deadletters=gw.store.deadletter_counts(),
        head_ms={k: round(v, 3) for k, v in gw.inferencer.head_ms.items()})


async def status(request: web.Request) -> web.Response:
    """GET /v1/status"""
    return model_response(status_doc(_gw(request)))


async def healthz(_: web.Request) -> web.Response:
    """GET /healthz: the process is alive and its loop answers."""
    return model_response(Alive(status="alive"))


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: 200 when every readiness check passes, else 503 naming the failing ones."""
    return readiness_response(_gw(request).health.checks())


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus exposition from the gateway's own registry."""
    return metrics_response(request, _gw(request).metrics.registry)


async def openapi(request: web.Request) -> web.Response:
    """GET /openapi.json: the OpenAPI 3.1 document of this API."""
    return web.json_response(request.app[SPEC_KEY])


async def dashboard(request: web.Request) -> web.Response:
    """GET /: the live dashboard page (static; it polls the JSON endpoints)."""
    return web.Response(text=request.app[PAGE_KEY], content_type="text/html",
                        headers={"Cache-Control": "no-cache"})


HANDLERS = {"/": dashboard, "/healthz": healthz, "/readyz": readyz, "/v1/results": results,
            "/v1/results/latest": latest, "/v1/results/stream": stream_results,
            "/v1/streams": streams, "/v1/status": status, "/metrics": metrics,
            "/openapi.json": openapi}


def build_app(gw: Gateway, token: str | None) -> web.Application:
    """The aiohttp application, with bearer auth on everything but /healthz if a token is set."""
    app = web.Application(middlewares=[json_errors, bearer_auth(token, query_ok=("/",))])
    app[GATEWAY_KEY] = gw
    feed = Feed()
    app[FEED_KEY] = feed
    gw.metrics.listeners.append(feed.notify)

    async def close_feed(_: web.Application) -> None:
        feed.close()

    app.on_shutdown.append(close_feed)
    ops = api_spec.operations(sorted(gw.streams))
    assert {op.path for op in ops} == set(HANDLERS), "spec and routes must list the same paths"
    app[SPEC_KEY] = api_spec.spec(ops, bearer=bool(token))
    app[PAGE_KEY] = (resources.files("edgetok.gateway") / "dashboard.html").read_text()
    for path, handler in HANDLERS.items():
        app.router.add_get(path, handler)
    return app


def preflight(cfg: GatewayConfig) -> None:
    """Refuse an exposed API without a token, and unreadable TLS files, before anything runs;
    one ConfigError names every problem."""
    all_problems("gateway config", (
        lambda: check_bind(cfg.http.host, cfg.api_token(), "gateway"),
        lambda: check_tls(cfg.mqtt, "gateway config"), lambda: _http_tls(cfg)))


def _http_tls(cfg: GatewayConfig) -> None:
    """ConfigError unless the API's certificate and key can be read and loaded together."""
    cert, key = cfg.http.tls_cert, cfg.http.tls_key
    require_readable("gateway config", {"http.tls_cert": cert, "http.tls_key": key})
    try:
        tls_context(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("gateway config", [
            f"http.tls_cert/tls_key: cannot load {cert} with {key}: {exc}"]) from exc


async def serve(gw: Gateway) -> web.AppRunner:
    """Start the HTTP API; BindRefused if it would be exposed without a token."""
    settings = gw.cfg.http
    token = gw.cfg.api_token()
    check_bind(settings.host, token, "gateway")
    ctx = tls_context(settings.tls_cert, settings.tls_key)
    runner, gw.http_port = await start(build_app(gw, token), settings.host, settings.port, ctx)
    return runner
