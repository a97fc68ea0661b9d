"""HTTP plumbing shared by the gateway's and the server's APIs: bind policy, auth, TLS, errors."""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import Literal

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from pydantic import BaseModel, ConfigDict, Field

from edgetok.settings import ConfigError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# How long a graceful HTTP shutdown waits for open requests (an SSE client, a slow scrape)
# before cancelling them: long enough for a normal request, short enough that systemd's stop
# timeout is spent on draining windows rather than on idle connections.
SHUTDOWN_TIMEOUT_S = 3.0

# The query parameter a browser may use to pass the bearer token when it cannot set a header
# (RFC 6750 section 2.3); accepted only on the routes a server lists, i.e. the dashboard page.
TOKEN_QUERY = "access_token"


class Alive(BaseModel):
    """GET /healthz: the process answers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    status: Literal["alive"] = Field(description="Always 'alive'; the 200 is the answer.")


class Readiness(BaseModel):
    """GET /readyz: 200 when every check passes, else 503 listing the failing ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ready: bool = Field(description="True when every check passes.")
    failing: list[str] = Field(description="Names of the failing checks.")
    checks: dict[str, bool] = Field(description="Every check and whether it passes.")

    @classmethod
    def of(cls, checks: dict[str, bool]) -> Readiness:
        """The readiness document for these checks."""
        return cls(ready=all(checks.values()), failing=[k for k, ok in checks.items() if not ok],
                   checks=checks)


def readiness_response(checks: dict[str, bool]) -> web.Response:
    """The /readyz answer: the status code is the contract (200 ready, 503 not)."""
    doc = Readiness.of(checks)
    return model_response(doc, status=200 if doc.ready else 503)


class BindRefused(ConfigError):
    """The API would be exposed beyond loopback without a bearer token (a config problem)."""


def is_loopback(host: str) -> bool:
    """True for loopback addresses and 'localhost'."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None, what: str) -> None:
    """Raise BindRefused unless `host` is loopback or a bearer token is configured."""
    if not is_loopback(host) and not token:
        raise BindRefused(f"{what} config", [
            f"http.host = {host}: refusing to serve the HTTP API beyond loopback without a "
            "bearer token; set EDGETOK_API_TOKEN or the systemd credential 'api_token', or "
            "bind to 127.0.0.1"])


def error_body(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON error response {"error": message}."""
    return web.json_response({"error": message}, status=status, headers=headers)


def http_error(cls: type[web.HTTPException], message: str) -> web.HTTPException:
    """An aiohttp HTTP exception with a JSON {"error": message} body, ready to raise."""
    return cls(text=json.dumps({"error": message}), content_type="application/json")


def model_response(model: BaseModel, status: int = 200) -> web.Response:
    """Serialise a pydantic model: the same model the OpenAPI document describes."""
    return web.Response(text=model.model_dump_json(), status=status,
                        content_type="application/json")


def metrics_response(request: web.Request, registry: CollectorRegistry) -> web.Response:
    """Prometheus exposition of `registry`, in the format the scraper's Accept header asks."""
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encoder(registry), headers={"Content-Type": content_type})


def bearer_auth(token: str | None, public: Collection[str] = ("/healthz",),
                query_ok: Collection[str] = ()) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Middleware: with a token, every path but `public` needs `Authorization: Bearer`."""
    expected = f"Bearer {token}".encode() if token else b""

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token and request.path not in public:
            given = request.headers.get("Authorization", "").encode()
            if request.path in query_ok and TOKEN_QUERY in request.query:
                given = f"Bearer {request.query[TOKEN_QUERY]}".encode()
            # Constant-time comparison: the token must not leak through response timing.
            if not hmac.compare_digest(given, expected):
                return error_body(401, "bearer token required",
                                  {"WWW-Authenticate": 'Bearer realm="edgetok"'})
        return await handler(request)

    return auth


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's plain-text errors (404, 405) into the API's JSON error shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow",
                                                                         "www-authenticate")}
        return error_body(exc.status, exc.reason, headers)


def tls_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """A server-side TLS context from a PEM certificate and key, or None for plain HTTP."""
    if cert is None or key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def start(app: web.Application, host: str, port: int,
                ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port; returns the runner (to clean up) and the bound port."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    bound = port
    for addr in runner.addresses:  # port 0 asks the kernel for a free one
        if isinstance(addr, tuple) and len(addr) >= 2:
            bound = int(addr[1])
            break
    log.info("HTTP API on %s://%s:%d", "https" if ssl_context else "http", host, bound)
    return runner, bound
