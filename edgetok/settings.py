"""Config plumbing shared by gateway and server: MQTT settings, secrets, TOML loading."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from edgetok.topics import DEFAULT_PREFIX

M = TypeVar("M", bound=BaseModel)

# systemd's LoadCredential= puts secrets here; see systemd.exec(5), "Credentials".
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"


class ConfigError(Exception):
    """A config file is unreadable or invalid; `problems` holds one line per error."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n  " + "\n  ".join(problems))


def all_problems(source: str, checks: Iterable[Callable[[], None]]) -> None:
    """Run every check; one ConfigError naming the problems of all that failed."""
    problems: list[str] = []
    for check in checks:
        try:
            check()
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(source, problems)


def resolve_path(v: Path | None, info: ValidationInfo) -> Path | None:
    """A relative path read from a config file, made absolute against the file's directory:
    under systemd the working directory is /, so a path beside the config would be lost."""
    base = (info.context or {}).get("base_dir")
    return v if v is None or v.is_absolute() or base is None else (Path(base) / v).resolve()


def require_readable(source: str, files: dict[str, Path | None]) -> None:
    """Raise ConfigError naming each of `files` (config key: path) that is set and cannot
    be read."""
    problems = []
    for key, path in files.items():
        if path is None:
            continue
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            problems.append(f"{key}: cannot read {path}: {exc.strerror or exc}")
    if problems:
        raise ConfigError(source, problems)


class Strict(BaseModel):
    """Base for every config model: unknown keys are errors, values are immutable."""

    # TOML has inf and nan; neither is a deadline, a rate or a budget.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TlsSettings(Strict):
    """TLS towards the broker."""

    ca_file: Path | None = Field(None, description="CA bundle that signs the broker's certificate.")
    cert_file: Path | None = Field(None, description="Client certificate, for mutual TLS.")
    key_file: Path | None = Field(None, description="Private key of the client certificate.")
    insecure: bool = Field(False, description="Skip hostname verification (testing only).")

    _abs = field_validator("ca_file", "cert_file", "key_file")(resolve_path)


class MqttSettings(Strict):
    """How to reach the MQTT broker."""

    host: str = Field("127.0.0.1", description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker TCP port.")
    client_id: str | None = Field(
        None, description="Stable client id; required for a persistent session. "
        "Defaults to edgetok-<role>-<id>.")
    username: str | None = Field(None, description="Broker user name.")
    password: SecretStr | None = Field(
        None, description="Broker password. Prefer the EDGETOK_MQTT_PASSWORD environment variable "
        "or the systemd credential 'mqtt_password' to keeping it in this file.")
    tls: TlsSettings | None = Field(None, description="TLS settings; omit for plain TCP.")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive in seconds.")
    session_expiry_s: int = Field(
        3600, ge=0, description="How long the broker keeps our session (and queued QoS 1 "
        "messages) while we are away. 0 disables the persistent session.")
    prefix: str = Field(DEFAULT_PREFIX, description="Topic prefix for every edgetok topic.")
    reconnect_min_s: float = Field(0.5, gt=0, description="First reconnect delay.")
    reconnect_max_s: float = Field(15.0, gt=0, description="Longest reconnect delay (backoff cap).")

    @model_validator(mode="after")
    def _backoff_order(self) -> MqttSettings:
        # The backoff starts at the minimum and doubles up to the cap; a cap below the start
        # would silently win, so say which key to fix.
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError(f"reconnect_min_s ({self.reconnect_min_s:g}) is above "
                             f"reconnect_max_s ({self.reconnect_max_s:g}); the first reconnect "
                             "delay cannot exceed the cap")
        return self


def read_secret(name: str, env_var: str, inline: SecretStr | None) -> str | None:
    """A secret from the systemd credential `name`, else env `env_var`, else the file."""
    cred_dir = os.environ.get(CREDENTIALS_ENV)
    if cred_dir:
        path = Path(cred_dir) / name
        text = path.read_text().strip() if path.is_file() else ""
        if text:  # an empty credential (systemd's SetCredential= fallback) means "unset"
            return text
    if env_var in os.environ:
        return os.environ[env_var]
    return inline.get_secret_value() if inline is not None else None


def format_validation_error(exc: ValidationError) -> list[str]:
    """One readable line per pydantic error, prefixed with its dotted location."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling, or see the example configs)"
        lines.append(f"{loc}: {msg}")
    return lines


def load_toml(path: Path | str, model: type[M]) -> M:
    """Read a TOML file into `model`; ConfigError lists every problem with its location."""
    path = Path(path)
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(str(path), ["file not found"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"TOML syntax: {exc}"]) from exc
    return parse_config(raw, model, source=str(path), base_dir=path.parent)


def parse_config(raw: dict[str, Any], model: type[M], source: str = "<config>",
                 base_dir: Path | None = None) -> M:
    """Validate an already-parsed mapping; relative paths resolve against `base_dir`."""
    try:
        return model.model_validate(raw, context={"base_dir": base_dir or Path.cwd()})
    except ValidationError as exc:
        raise ConfigError(source, format_validation_error(exc)) from exc
