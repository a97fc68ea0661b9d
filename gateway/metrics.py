"""Prometheus metrics of the gateway (filled in by the HTTP API work; hooks are stable)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgetok.gateway.daemon import Gateway
    from edgetok.gateway.models import Result


class GatewayMetrics:
    """Receives events from the daemon; exported at GET /metrics."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def on_result(self, result: Result) -> None:
        """A result was stored."""

    def on_deadletter(self, reason: str) -> None:
        """An input was rejected."""
