"""Edge-server config: broker, bundles, tail workers, HTTP and coordinator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator

from edgetok.agent.coordinator.online import ControllerConfig
from edgetok.settings import MqttSettings, Strict, load_toml, read_secret
from edgetok.topics import filter_problem


def _resolve(v: list[Path], info: Any) -> list[Path]:
    base = (info.context or {}).get("base_dir")
    return [p if p.is_absolute() or base is None else (Path(base) / p).resolve() for p in v]


class ServerHttp(Strict):
    """The server's local HTTP API (health, status)."""

    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8090, ge=0, le=65535, description="TCP port (0 picks a free one).")
    token: SecretStr | None = Field(None, description="Bearer token; required to bind beyond "
                                    "loopback. Prefer EDGETOK_API_TOKEN or the systemd "
                                    "credential 'api_token'.")


class ServerConfig(Strict):
    """Everything `edgetok server` needs."""

    id: str = Field("server-1", description="Server id, reported in every reply.")
    group: str = Field("tail", description="Shared-subscription group: servers in one group "
                       "split the gateways' frames between them.")
    mqtt: MqttSettings = Field(default_factory=lambda: MqttSettings(session_expiry_s=0),
                               description="Broker connection.")
    bundles: list[Path] = Field(min_length=1, description="Bundle directories this server can "
                                "run tails for (matched by bundle id in each frame).")
    workers: int = Field(2, ge=1, le=64, description="Tail computations run at once.")
    threads: int = Field(1, ge=0, le=64, description="ONNX Runtime intra-op threads per session.")
    max_sessions: int = Field(32, ge=1, description="Open ONNX sessions kept per bundle.")
    share_weights: bool = Field(
        True, description="Sessions of one pruning ratio share one mapped, pre-packed copy of "
        "its weights (ONNX Runtime's C API); false: each session loads its own copy through "
        "the Python API, as a fallback should the C API misbehave.")
    http: ServerHttp = Field(default_factory=lambda: ServerHttp(),
                             description="HTTP API.")
    coordinator: ControllerConfig | None = Field(
        None, description="Coordinator settings; omit to run the tail service alone. Enable it "
        "on exactly one server per broker: every coordinator publishes decisions.")

    _abs = field_validator("bundles")(_resolve)

    @field_validator("group")
    @classmethod
    def _group_ok(cls, v: str) -> str:
        # The group is one level of `$share/<group>/...`: a '/' or a wildcard in it would
        # make the subscription invalid, and the broker drop the server for it.
        problem = "contains '/'" if "/" in v else filter_problem(f"$share/{v}/x")
        if problem:
            raise ValueError(f"{v!r} cannot be a shared-subscription group: {problem}")
        return v

    def mqtt_password(self) -> str | None:
        return read_secret("mqtt_password", "EDGETOK_MQTT_PASSWORD", self.mqtt.password)

    def api_token(self) -> str | None:
        return read_secret("api_token", "EDGETOK_API_TOKEN", self.http.token)


def load(path: Path | str) -> ServerConfig:
    """Read a server config file; ConfigError lists every problem."""
    return load_toml(path, ServerConfig)
