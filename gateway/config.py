"""Gateway config: a tree of strict pydantic models read from TOML plus secrets from env."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from edgetok.frames import Precision
from edgetok.gateway.actuators import ActuatorSettings
from edgetok.settings import MqttSettings, Strict, load_toml, read_secret, resolve_path
from edgetok.tokenizers import TokenizerConfig
from edgetok.topics import filter_problem

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _valid_filters(filters: list[str]) -> list[str]:
    """`filters` if each is a valid MQTT topic filter; else a ValueError naming the first
    bad one (a broker drops a client that subscribes to it, and it would reconnect for ever)."""
    for f in filters:
        problem = filter_problem(f)
        if problem:
            raise ValueError(f"{f!r} is not an MQTT topic filter: {problem}")
    return filters


class StreamConfig(Strict):
    """One sensor stream: where its readings come from and how they become windows."""

    name: str = Field(description="Stream name; used in result topics and the HTTP API.")
    topics: list[str] = Field(min_length=1, description="MQTT topic filters to subscribe "
                              "(QoS 1). Readings from several topics merge by timestamp.")
    format: Literal["json"] = Field("json", description="Payload format. JSON objects with a "
                                    "timestamp field and one field per channel; each field a "
                                    "number or an array of equal length (a chunk of readings).")
    timestamp_field: str = Field("ts", description="Field holding the reading time, in "
                                 "seconds since the Unix epoch.")
    channels: list[str] = Field(min_length=1, description="Channel names in model order; "
                                "each is also the JSON field name unless mapped in `fields`.")
    fields: dict[str, str] = Field(default_factory=dict,
                                   description="Optional channel -> JSON field name mapping.")
    rate_hz: float = Field(gt=0, le=100_000, description="Sample rate of the stream.")
    window: int = Field(gt=0, le=1_000_000, description="Samples per window.")
    hop: int | None = Field(None, gt=0, description="Samples between window starts "
                            "(default: window, i.e. no overlap).")
    deadline_ms: float = Field(1000.0, gt=0, description="Time from window close to result; "
                               "past it the gateway falls back to the on-device variant.")
    lateness_ms: float = Field(200.0, ge=0, description="How long after a window's end a late "
                               "reading is still accepted before the window closes.")
    idle_close_s: float = Field(2.0, gt=0, description="Close a window whose stream has been "
                                "silent this long (the end of a burst or replay).")
    min_coverage: float = Field(0.5, ge=0, le=1, description="Fraction of a window's samples "
                                "that must have arrived for the idle rule to close it; a "
                                "sparser window (a stalled link, not a finished burst) waits "
                                "for `sparse_close_s` of silence instead.")
    sparse_close_s: float = Field(10.0, gt=0, description="Silence after which even a sparse "
                                  "window closes (it is never dropped).")
    tokenizer: TokenizerConfig | None = Field(None, description="Tokenizer; default: the one "
                                              "the bundle was trained with.")
    max_payload_bytes: int = Field(256 * 1024, gt=0, description="Larger payloads are "
                                   "dead-lettered without being parsed.")
    max_past_s: float = Field(7 * 86400.0, gt=0, description="Readings older than this are "
                              "dead-lettered as stale.")
    max_future_s: float = Field(60.0, gt=0, description="Readings further ahead of the gateway "
                                "clock are dead-lettered (a sensor with a broken clock).")

    @field_validator("topics")
    @classmethod
    def _filters_ok(cls, v: list[str]) -> list[str]:
        return _valid_filters(v)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("use 1-64 letters, digits, '_', '-' or '.'")
        return v

    @model_validator(mode="after")
    def _fields_known(self) -> StreamConfig:
        unknown = set(self.fields) - set(self.channels)
        if unknown:
            raise ValueError(f"`fields` maps unknown channels {sorted(unknown)}")
        if self.hop is not None and self.hop > self.window:
            raise ValueError("hop > window would skip readings between windows")
        return self

    @property
    def hop_samples(self) -> int:
        return self.hop or self.window

    @property
    def grid(self) -> str:
        """What gives a window number its meaning: rate, hop and length."""
        return f"rate_hz={self.rate_hz!r} hop={self.hop_samples} window={self.window}"

    def field_of(self, channel: str) -> str:
        return self.fields.get(channel, channel)


class BundleSettings(Strict):
    """Which model bundle the gateway runs, and how."""

    path: Path = Field(description="Bundle directory (manifest.json + ONNX files).")
    threads: int = Field(1, ge=0, le=64, description="ONNX Runtime intra-op threads (0 = all).")
    max_sessions: int = Field(8, ge=2, description="Open ONNX sessions kept; others are "
                              "evicted least-recently-used (bounds memory).")
    share_weights: bool = Field(
        True, description="Sessions of one pruning ratio share one mapped, pre-packed copy of "
        "its weights (ONNX Runtime's C API); false: each session loads its own copy through "
        "the Python API, as a fallback should the C API misbehave.")

    _abs = field_validator("path")(resolve_path)


class DecisionSettings(Strict):
    """The variant to run until the coordinator says otherwise."""

    variant: str = Field("r0.00-s1", description="Initial variant id, r<ratio>-s<split>.")
    precision: Precision = Field("fp16", description="Feature precision on the uplink.")
    follow_coordinator: bool = Field(True, description="Apply decisions from the control topic.")


class HttpSettings(Strict):
    """Local HTTP API."""

    host: str = Field("127.0.0.1", description="Bind address. Anything but loopback needs a "
                      "bearer token.")
    port: int = Field(8080, ge=0, le=65535, description="TCP port (0 picks a free one).")
    token: SecretStr | None = Field(None, description="Bearer token. Prefer EDGETOK_API_TOKEN "
                                    "or the systemd credential 'api_token'.")
    tls_cert: Path | None = Field(None, description="TLS certificate (PEM) to serve HTTPS.")
    tls_key: Path | None = Field(None, description="TLS private key (PEM).")

    _abs = field_validator("tls_cert", "tls_key")(resolve_path)

    @model_validator(mode="after")
    def _tls_pair(self) -> HttpSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        return self


class JournalSettings(Strict):
    """The durable journal of readings."""

    max_rows: int = Field(500_000, gt=0, description="Readings held before ingest stops "
                          "acknowledging (backpressure) instead of dropping anything.")
    synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="SQLite synchronous mode under WAL. FULL makes every acknowledged "
        "message survive power loss (one fsync per batch; 6-17% less ingest measured); "
        "NORMAL survives a process crash only.")
    keep_results_days: float = Field(
        30.0, ge=0, description="Results (with their window's label and latencies) are kept "
        "this long after their window ended, once published on MQTT (or refused by the "
        "broker); older ones are deleted a small batch at a time. 0: no age limit.")
    max_results: int = Field(
        500_000, gt=0, description="At most this many results are kept (about 250 MB of "
        "database at ~500 bytes each); the oldest published ones go first. Results not yet "
        "published, and the newest of each stream, are never deleted, so the table can "
        "exceed this while the broker is away.")


class GatewayConfig(Strict):
    """Everything the gateway daemon needs."""

    id: str = Field(description="Gateway id, unique per broker; part of every topic.")
    state_dir: Path = Field(Path("var/gateway"), description="Journal and results database "
                            "directory (StateDirectory= under systemd).")
    mqtt: MqttSettings = Field(default_factory=lambda: MqttSettings(),
                               description="Broker connection.")
    bundle: BundleSettings = Field(description="Model bundle.")
    streams: list[StreamConfig] = Field(min_length=1, description="Sensor streams.")
    decision: DecisionSettings = Field(default_factory=lambda: DecisionSettings(),
                                       description="Initial decision.")
    http: HttpSettings = Field(default_factory=lambda: HttpSettings(),
                               description="HTTP API.")
    journal: JournalSettings = Field(default_factory=lambda: JournalSettings(),
                                     description="Journal.")
    actuators: ActuatorSettings = Field(default_factory=lambda: ActuatorSettings(),
                                        description="CPU clock and transmit power actuators.")
    max_inflight_windows: int = Field(64, gt=0, description="Windows being inferred at once; "
                                      "more wait in the journal.")
    telemetry_interval_s: float = Field(2.0, gt=0, description="Telemetry publish period.")
    head_probe_interval_s: float = Field(
        2.0, ge=0, description="While following a coordinator and running no head here (the "
        "server runs the whole model), time one head of the on-device variant at most "
        "this often, right after a window the server answered and none is in flight, so "
        "the coordinator sees when this device is fast again; 0: never. While windows run "
        "heads here, one probe every 5 periods, timed beside their heads, calibrates the "
        "probes (a probe and a window's head read differently on a quota-capped CPU), "
        "kept in state_dir/probe-calibration.json across restarts. Costs "
        "one head run per period (about 0.1% of a core for a 2 ms head at 2 s).")
    server_probe_interval_s: float = Field(
        5.0, ge=0, description="While following a coordinator with windows on the device and "
        "the uplink rate sensed (actuators.link_sense), send one window's tokens to the "
        "server about this often (each wait drawn within ±50%; four in a row while there is "
        "no figure yet), and report the reply's per-frame overhead, so the coordinator knows "
        "the server path without moving windows onto it to find out; the reply is thrown "
        "away. 0: never (the coordinator then tries the path with windows now and then, "
        "explore_margin). Costs one frame of raw tokens (~1 KB) and one server run per "
        "period.")
    unclaimed_topics: list[str] = Field(default_factory=list, description="Extra topic "
                                        "filters to subscribe (QoS 1), e.g. 'sensors/#': a "
                                        "message there that no stream's topics claim is "
                                        "dead-lettered as unknown_topic instead of going "
                                        "unnoticed (a misspelt sensor topic).")

    _abs = field_validator("state_dir")(resolve_path)

    @field_validator("unclaimed_topics")
    @classmethod
    def _filters_ok(cls, v: list[str]) -> list[str]:
        return _valid_filters(v)

    @field_validator("id")
    @classmethod
    def _id_ok(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("use 1-64 letters, digits, '_', '-' or '.'")
        return v

    @model_validator(mode="after")
    def _unique_streams(self) -> GatewayConfig:
        names = [s.name for s in self.streams]
        if len(set(names)) != len(names):
            raise ValueError("stream names must be unique")
        return self

    def mqtt_password(self) -> str | None:
        return read_secret("mqtt_password", "EDGETOK_MQTT_PASSWORD", self.mqtt.password)

    def api_token(self) -> str | None:
        return read_secret("api_token", "EDGETOK_API_TOKEN", self.http.token)


def load(path: Path | str) -> GatewayConfig:
    """Read a gateway config file; ConfigError lists every problem."""
    return load_toml(path, GatewayConfig)

