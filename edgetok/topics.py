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


def filter_problem(f: str) -> str | None:
    """What makes `f` an invalid MQTT topic filter (MQTT 5 sections 4.7, 4.8.2), or None."""
    # A broker answers an invalid filter by dropping the connection (mosquitto: Malformed
    # Packet), and a reconnect sends it again: better refused when the config is checked.
    if not f:
        return "empty"
    if "\0" in f:
        return "contains a NUL character"
    try:
        size = len(f.encode())
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if size > 65535:
        return f"{size} bytes long, over MQTT's 65535"
    if f.startswith("$share/"):
        group, _, rest = f[len("$share/"):].partition("/")
        if not group or "+" in group or "#" in group:
            return "a shared subscription needs a share name without '+' or '#'"
        if not rest:
            return "a shared subscription needs a filter after its share name"
        f = rest
    levels = f.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be alone in the last level"
        if "+" in level and level != "+":
            return "'+' must be alone in its level"
    return None
