"""Local HTTP API of the gateway (aiohttp): results, streams, status and health."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import ssl
import time
from typing import TYPE_CHECKING

from aiohttp import web

from edgetok import __version__
from edgetok.gateway.models import ResultsPage, StreamInfo, StreamsPage

if TYPE_CHECKING:
    from edgetok.gateway.daemon import Gateway

log = logging.getLogger(__name__)

MAX_LIMIT = 10_000
GATEWAY_KEY = web.AppKey("gateway", object)


class BindRefused(RuntimeError):
    """The API would be exposed beyond loopback without a bearer token."""


def is_loopback(host: str) -> bool:
    """True for loopback addresses and 'localhost'."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _gw(request: web.Request) -> Gateway:
    return request.app[GATEWAY_KEY]


def _bad(msg: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=f'{{"error": "{msg}"}}', content_type="application/json")


def _int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise _bad(f"{name} must be an integer") from None
    if not lo <= v <= hi:
        raise _bad(f"{name} must be between {lo} and {hi}")
    return v


async def results(request: web.Request) -> web.Response:
    """GET /v1/results?stream=&since=&since_id=&limit="""
    gw = _gw(request)
    stream = request.query.get("stream")
    if stream is not None and stream not in gw.streams:
        raise web.HTTPNotFound(text=f'{{"error": "unknown stream {stream!r}"}}',
                               content_type="application/json")
    since = None
    if "since" in request.query:
        try:
            since = float(request.query["since"])
        except ValueError:
            raise _bad("since must be a Unix timestamp in seconds") from None
    limit = _int(request, "limit", 100, 1, MAX_LIMIT)
    since_id = _int(request, "since_id", 0, 0, 2**62)
    rows = gw.store.results(stream, since, since_id, limit)
    page = ResultsPage(results=rows, next_since_id=rows[-1].id if len(rows) == limit else None)
    return web.json_response(text=page.model_dump_json())


async def latest(request: web.Request) -> web.Response:
    """GET /v1/results/latest: the newest result of every stream."""
    return web.json_response(text=ResultsPage(results=_gw(request).store.latest())
                             .model_dump_json())


async def streams(request: web.Request) -> web.Response:
    """GET /v1/streams"""
    gw = _gw(request)
    counts = gw.store.result_counts()
    page = StreamsPage(streams=[StreamInfo(
        name=s.name, topics=s.topics, channels=s.channels, rate_hz=s.rate_hz, window=s.window,
        hop=s.hop_samples, deadline_ms=s.deadline_ms, open_windows=len(gw.buffers[s.name].open),
        results=counts.get(s.name, (0, None))[0], last_result_ts=counts.get(s.name, (0, None))[1])
        for s in gw.cfg.streams])
    return web.json_response(text=page.model_dump_json())


def status_doc(gw: Gateway) -> dict[str, object]:
    """Everything an operator wants at a glance."""
    dec = gw.inferencer.decision
    up = gw.inferencer.uplink
    return {
        "gateway": gw.cfg.id, "version": __version__, "uptime_s": round(time.time() - gw.started),
        "ready": gw.ready,
        "bundle": {"id": gw.manifest.bundle_id, "path": str(gw.cfg.bundle.path),
                   "variants": len(gw.manifest.variants), "labels": gw.manifest.labels,
                   "open_sessions": gw.runtime.open_sessions},
        "decision": {"variant": dec.variant, "precision": dec.precision, "seq": dec.seq,
                     "source": dec.source, **dec.extra},
        "uplink": {"server_ok": up.server_ok, "frames_sent": up.frames_sent,
                   "bytes_sent": up.bytes_sent, "fallbacks": up.fallbacks,
                   "late_replies": up.replies_late},
        "mqtt": {"connected": gw.session.connected.is_set(), "connects": gw.session.connects,
                 "last_error": gw.session.last_error},
        "journal": {"rows": gw.store.journal_rows, "max_rows": gw.cfg.journal.max_rows,
                    "inflight_windows": len(gw.inflight)},
        "control": gw.control.status(),
        "counters": dict(gw.counters),
        "deadletters": gw.store.deadletter_counts(),
        "head_ms": {k: round(v, 3) for k, v in gw.inferencer.head_ms.items()},
    }


async def status(request: web.Request) -> web.Response:
    """GET /v1/status"""
    return web.json_response(status_doc(_gw(request)))


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process is alive and its loop answers."""
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: 200 when the broker is connected and the bundle loaded, else 503."""
    checks = _gw(request).ready
    failing = [k for k, ok in checks.items() if not ok]
    return web.json_response({"ready": not failing, "failing": failing, "checks": checks},
                             status=503 if failing else 200)


def build_app(gw: Gateway, token: str | None) -> web.Application:
    """The aiohttp application, with bearer auth on everything but /healthz if a token is set."""

    @web.middleware
    async def auth(request: web.Request, handler):
        if token and request.path != "/healthz":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                raise web.HTTPUnauthorized(text='{"error": "bearer token required"}',
                                           content_type="application/json",
                                           headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    app = web.Application(middlewares=[auth])
    app[GATEWAY_KEY] = gw
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/results", results)
    app.router.add_get("/v1/results/latest", latest)
    app.router.add_get("/v1/streams", streams)
    app.router.add_get("/v1/status", status)
    return app


async def serve(gw: Gateway) -> web.AppRunner:
    """Start the HTTP API; BindRefused if it would be exposed without a token."""
    settings = gw.cfg.http
    token = gw.cfg.api_token()
    if not is_loopback(settings.host) and not token:
        raise BindRefused(f"refusing to serve the API on {settings.host}: set a bearer token "
                          "(EDGETOK_API_TOKEN or the 'api_token' credential) or bind to "
                          "127.0.0.1")
    ctx = None
    if settings.tls_cert and settings.tls_key:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    runner = web.AppRunner(build_app(gw, token), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, ssl_context=ctx)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    gw.http_port = sockets[0].getsockname()[1] if sockets else settings.port
    log.info("HTTP API on %s://%s:%d", "https" if ctx else "http", settings.host, gw.http_port)
    return runner
