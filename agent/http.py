"""Local HTTP API of the edge server: health, readiness and status."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from edgetok.agent.server import TailServer

SERVER_KEY = web.AppKey("server", object)


def _srv(request: web.Request) -> TailServer:
    return request.app[SERVER_KEY]


async def healthz(_: web.Request) -> web.Response:
    """GET /healthz: alive."""
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: 200 when connected to the broker, else 503 with the reasons."""
    ok = _srv(request).session.connected.is_set()
    return web.json_response({"ready": ok, "failing": [] if ok else ["broker_connected"]},
                             status=200 if ok else 503)


async def status(request: web.Request) -> web.Response:
    """GET /v1/status: counters, bundles and the coordinator's view."""
    srv = _srv(request)
    return web.json_response(srv.status())


def build_app(srv: TailServer) -> web.Application:
    app = web.Application()
    app[SERVER_KEY] = srv
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/status", status)
    return app


async def serve_http(srv: TailServer) -> web.AppRunner:
    """Start the server's HTTP API; records the bound port on `srv.http_port`."""
    runner = web.AppRunner(build_app(srv), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, srv.cfg.http.host, srv.cfg.http.port)
    await site.start()
    sockets = getattr(site._server, "sockets", None) or []
    srv.http_port = sockets[0].getsockname()[1] if sockets else srv.cfg.http.port
    return runner



