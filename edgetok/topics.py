"""MQTT topic names shared by gateway and server (see DESIGN.md, MQTT topics)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "edgetok"


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names for one gateway id under one prefix."""

    prefix: str
    gateway: str

    @property
    def status(self) -> str:
        return f"{self.prefix}/{self.gateway}/status"

    def results(self, stream: str) -> str:
        return f"{self.prefix}/{self.gateway}/results/{stream}"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}/{self.gateway}/deadletter"

    @property
    def uplink(self) -> str:
        return f"{self.prefix}/uplink/{self.gateway}"

    @property
    def downlink(self) -> str:
        return f"{self.prefix}/{self.gateway}/downlink"

    @property
    def telemetry(self) -> str:
        return f"{self.prefix}/{self.gateway}/telemetry"

    @property
    def control(self) -> str:
        return f"{self.prefix}/{self.gateway}/control"


def uplink_share_filter(prefix: str, group: str) -> str:
    """Shared-subscription filter that spreads every gateway's frames over a server group."""
    return f"$share/{group}/{prefix}/uplink/+"


def telemetry_filter(prefix: str) -> str:
    """Filter matching every gateway's telemetry."""
    return f"{prefix}/+/telemetry"


def gateway_of(topic: str, prefix: str) -> str:
    """Gateway id from an uplink or per-gateway topic; ValueError if it is not ours."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != prefix:
        raise ValueError(f"topic {topic!r} is not under prefix {prefix!r}")
    return parts[2] if parts[1] == "uplink" else parts[1]
