"""Local HTTP API of the edge server: health, readiness, status, metrics and its OpenAPI spec."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from edgetok import __version__
from edgetok.mqttlink import check_tls
from edgetok.openapi import METRICS_AND_SPEC, Operation, Reply, document
from edgetok.settings import all_problems
from edgetok.web import (
    Alive,
    Readiness,
    bearer_auth,
    check_bind,
    json_errors,
    metrics_response,
    model_response,
    readiness_response,
    start,
)

if TYPE_CHECKING:
    from edgetok.agent.config import ServerConfig
    from edgetok.agent.server import TailServer

SERVER_KEY = web.AppKey("server", object)
SPEC_KEY = web.AppKey("spec", dict)


class ServerMqtt(BaseModel):
    """The broker connection."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    connected: bool = Field(description="Connected right now.")
    connects: int = Field(description="Successful connects since start.")


class ServerStatus(BaseModel):
    """GET /v1/status of the edge server."""

    # New keys from the server's status() pass through (and are allowed by the schema), so
    # adding a counter never turns /v1/status into a 500.
    model_config = ConfigDict(frozen=True, extra="allow")

    server: str = Field(description="Server id.")
    version: str = Field(description="edgetok version.")
    group: str = Field(description="Shared-subscription group.")
    uptime_s: int = Field(description="Seconds since start.")
    bundles: list[str] = Field(description="Bundle ids this server runs tails for.")
    sessions: dict[str, list[str]] = Field(
        description="Open ONNX sessions by bundle, as 'variant/part', least recently used "
                    "first. A coordinating server opens a tail when it decides on it.")
    mqtt: ServerMqtt = Field(description="Broker connection.")
    counters: dict[str, int] = Field(description="Frames, replies, expired frames, errors.")
    busy_s: float = Field(description="Seconds spent computing tails.")
    queue_depth: int = Field(description="Frames waiting for a worker.")
    queue_wait_ms: float | None = Field(None, description="Smoothed queue wait (ms).")
    coordinator: dict[str, Any] | None = Field(None, description="The coordinator's view of "
                                               "every gateway, when it runs here.")


OPERATIONS = [
    Operation("/healthz", "healthz", "Liveness: the process and its event loop answer.",
              {200: Reply("Alive.", Alive)}, tag="health", public=True),
    Operation("/readyz", "readyz", "Readiness: broker connected, bundles loaded, queue has "
              "room, workers progressing.",
              {200: Reply("Ready.", Readiness),
               503: Reply("Not ready; `failing` names the checks.", Readiness)}, tag="health"),
    Operation("/v1/status", "status", "Counters, bundles and the coordinator's view.",
              {200: Reply("Status.", ServerStatus)}, tag="status"),
    *METRICS_AND_SPEC,
]


def _srv(request: web.Request) -> TailServer:
    srv: TailServer = request.app[SERVER_KEY]
    return srv


async def healthz(_: web.Request) -> web.Response:
    """GET /healthz: alive."""
    return model_response(Alive(status="alive"))


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: 200 when every check passes, else 503 naming the failing ones."""
    return readiness_response(_srv(request).health.checks())


async def status(request: web.Request) -> web.Response:
    """GET /v1/status: counters, bundles and the coordinator's view."""
    return model_response(ServerStatus.model_validate(_srv(request).status()))


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus exposition from the server's own registry."""
    return metrics_response(request, _srv(request).metrics.registry)


async def openapi(request: web.Request) -> web.Response:
    """GET /openapi.json: the OpenAPI 3.1 document of this API."""
    return web.json_response(request.app[SPEC_KEY])


HANDLERS = {"/healthz": healthz, "/readyz": readyz, "/v1/status": status,
            "/metrics": metrics, "/openapi.json": openapi}


def build_app(srv: TailServer, token: str | None = None) -> web.Application:
    """The aiohttp application; with a token, everything but /healthz needs it."""
    app = web.Application(middlewares=[json_errors, bearer_auth(token)])
    app[SERVER_KEY] = srv
    assert {op.path for op in OPERATIONS} == set(HANDLERS), "spec and routes must match"
    app[SPEC_KEY] = document("edgetok server", __version__, "Local HTTP API of an edgetok "
                             "edge server (tail service and coordinator).", OPERATIONS,
                             bearer=bool(token))
    for path, handler in HANDLERS.items():
        app.router.add_get(path, handler)
    return app


def preflight(cfg: ServerConfig) -> None:
    """Refuse to expose the API beyond loopback without a token, and unreadable broker TLS
    files, before anything starts."""
    all_problems("server config", (
        lambda: check_bind(cfg.http.host, cfg.api_token(), "server"),
        lambda: check_tls(cfg.mqtt, "server config")))


async def serve_http(srv: TailServer) -> web.AppRunner:
    """Start the server's HTTP API; records the bound port on `srv.http_port`."""
    token = srv.cfg.api_token()
    check_bind(srv.cfg.http.host, token, "server")
    runner, srv.http_port = await start(build_app(srv, token), srv.cfg.http.host,
                                        srv.cfg.http.port)
    return runner
