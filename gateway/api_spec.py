"""The gateway API's operations, from which /openapi.json is generated."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgetok import __version__
from edgetok.gateway.models import Alive, Readiness, ResultsPage, Status, StreamsPage
from edgetok.openapi import (
    METRICS_AND_SPEC,
    Body,
    ErrorBody,
    Operation,
    Param,
    Reply,
    document,
)

MAX_LIMIT = 10_000
# Result ids are SQLite rowids; bounding them keeps every id a JSON-safe integer.
MAX_ID = 2**53 - 1

DESCRIPTION = (
    "Local HTTP API of an edgetok gateway: results of the split-inference pipeline, a live "
    "Server-Sent Events stream, status, health and Prometheus metrics. Bound to loopback "
    "without auth by default. Any other address needs a token, and with a token set every "
    "path but /healthz needs `Authorization: Bearer <token>`, on loopback too.")

BAD = Reply("Invalid query parameter.", ErrorBody)


def _stream_param(streams: Sequence[str]) -> Param:
    return Param("stream", {"type": "string", "enum": list(streams)},
                 "Only this stream (one of the configured stream names).")


def _since_id(what: str) -> Param:
    return Param("since_id", {"type": "integer", "minimum": 0, "maximum": MAX_ID}, what)


def operations(streams: Sequence[str]) -> list[Operation]:
    """Every GET endpoint; `streams` are the configured names (the `stream` enum)."""
    unknown = Reply("Unknown stream.", ErrorBody)
    return [
        Operation("/", "dashboard", "Live dashboard page (HTML).",
                  {200: Reply("The page.", Body("text/html"))},
                  params=[Param("access_token", {"type": "string"}, "The bearer token, for "
                                "browsers that cannot send the header (RFC 6750 2.3).")],
                  tag="ui"),
        Operation("/healthz", "healthz", "Liveness: the process and its event loop answer.",
                  {200: Reply("Alive.", Alive)}, tag="health", public=True),
        Operation("/readyz", "readyz", "Readiness: broker connected, bundle loaded, journal "
                  "has room, pipeline progressing.",
                  {200: Reply("Ready.", Readiness),
                   503: Reply("Not ready; `failing` names the checks.", Readiness)},
                  tag="health"),
        Operation("/v1/results", "listResults", "Stored results, oldest first.",
                  {200: Reply("A page of results.", ResultsPage), 400: BAD, 404: unknown},
                  params=[_stream_param(streams),
                          Param("since", {"type": "number"}, "Only windows ending at or after "
                                "this Unix time (seconds)."),
                          _since_id("Only results with a larger id (paging)."),
                          Param("limit", {"type": "integer", "minimum": 1,
                                          "maximum": MAX_LIMIT}, "Page size (default 100).")],
                  tag="results"),
        Operation("/v1/results/latest", "latestResults", "The newest result of every stream.",
                  {200: Reply("One result per stream that has any.", ResultsPage)},
                  tag="results"),
        Operation("/v1/results/stream", "streamResults", "Live results as Server-Sent "
                  "Events (event `result`, id = result id, data = a Result as JSON). A "
                  "reconnect with Last-Event-ID resumes from the results store.",
                  {200: Reply("An endless event stream.", Body("text/event-stream")),
                   400: BAD, 404: unknown},
                  params=[_stream_param(streams),
                          _since_id("Start after this result id (default: only new results)."),
                          Param("Last-Event-ID", {"type": "string", "pattern": "^[0-9]+$"},
                                "Resume after this result id.", where="header")],
                  tag="results"),
        Operation("/v1/streams", "listStreams", "Configured streams and their counters.",
                  {200: Reply("All streams.", StreamsPage)}, tag="results"),
        Operation("/v1/status", "status", "Decision, uplink, broker, journal and counters.",
                  {200: Reply("Status.", Status)}, tag="status"),
        *METRICS_AND_SPEC,
    ]


def spec(ops: Sequence[Operation], bearer: bool) -> dict[str, Any]:
    """The OpenAPI document of the gateway API."""
    return document("edgetok gateway", __version__, DESCRIPTION, ops, bearer)
