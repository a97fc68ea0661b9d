"""Pydantic models of what the gateway serves: results, status, streams (HTTP and MQTT)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgetok.web import Alive as Alive
from edgetok.web import Readiness as Readiness

Where = Literal["split", "device", "server", "device-fallback"]


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class VariantRef(_Out):
    """Which bundle variant produced a result."""

    id: str = Field(description="Variant id.")
    pruning_ratio: float = Field(description="Pruning ratio ρ.")
    split: int = Field(description="Layers run on the device.")
    precision: str = Field(description="Feature precision on the uplink.")


class Latency(_Out):
    """Where a window's time went, in milliseconds."""

    queue: float = Field(description="Window close to head start.")
    head: float = Field(description="Head (or full on-device model) compute.")
    uplink: float = Field(description="Frame sent to reply received, minus tail compute.")
    tail: float = Field(description="Tail compute on the server.")
    total: float = Field(description="Window close to result stored.")


class Result(_Out):
    """One window's result."""

    id: int = Field(0, description="Result id; increases monotonically.")
    gateway: str = Field(description="Gateway id.")
    stream: str = Field(description="Stream name.")
    window: int = Field(description="Window sequence number (start time / hop).")
    start_ts: float = Field(description="Window start, Unix seconds.")
    end_ts: float = Field(description="Window end, Unix seconds.")
    label: str = Field(description="Predicted label.")
    scores: dict[str, float] = Field(description="Probability per label.")
    where: Where = Field(description="Where the result was computed.")
    variant: VariantRef = Field(description="Variant used.")
    latency_ms: Latency = Field(description="Latency per stage.")
    created_ts: float = Field(description="When the result was stored, Unix seconds.")


class ResultsPage(_Out):
    """A page of results, oldest first."""

    results: list[Result] = Field(description="Results.")
    next_since_id: int | None = Field(None, description="Pass as since_id for the next page.")


class StreamInfo(_Out):
    """A configured stream and its counters."""

    name: str = Field(description="Stream name.")
    topics: list[str] = Field(description="MQTT topic filters the stream reads.")
    channels: list[str] = Field(description="Channel names in model order.")
    rate_hz: float = Field(description="Sample rate.")
    window: int = Field(description="Samples per window.")
    hop: int = Field(description="Samples between window starts.")
    deadline_ms: float = Field(description="Window close to result, before device fallback.")
    open_windows: int = Field(description="Windows still collecting readings.")
    results: int = Field(description="Results stored for this stream.")
    last_result_ts: float | None = Field(description="End of the newest result's window.")


class StreamsPage(_Out):
    """All streams."""

    streams: list[StreamInfo] = Field(description="Configured streams, in config order.")


class BundleInfo(_Out):
    """The loaded model bundle."""

    id: str = Field(description="Bundle id.")
    path: str = Field(description="Bundle directory.")
    variants: int = Field(description="Variants in the bundle.")
    labels: list[str] = Field(description="Class labels.")
    open_sessions: int = Field(description="ONNX Runtime sessions currently open.")


class DecisionInfo(_Out):
    """The decision in force: which variant runs, at what precision, and who chose it."""

    variant: str = Field(description="Variant id.")
    pruning_ratio: float = Field(description="Pruning ratio of the variant.")
    split: int = Field(description="Layers run on the device.")
    precision: str = Field(description="Feature precision on the uplink.")
    seq: int = Field(description="Decision sequence number (0: from the config).")
    source: str = Field(description="'config' or 'coordinator:<policy>'.")
    predicted_latency_ms: float | None = Field(None, description="Coordinator's prediction.")
    predicted_energy_mj: float | None = Field(None, description="Coordinator's prediction.")
    feasible: bool | None = Field(None, description="Whether the coordinator met all limits.")
    cpu_hz: float | None = Field(None, description="CPU clock the coordinator chose.")
    tx_power_w: float | None = Field(None, description="Transmit power the coordinator chose.")
    fallback_variant: str | None = Field(
        None, description="On-device variant a window runs when the server cannot answer in "
        "time (transmitting decisions only).")
    fallback_margin: float | None = Field(
        None, description="The coordinator's reserve margin: 1.5 sure, 1.0 lean (None: 1.5).")
    fallback_reserve_ms: float | None = Field(
        None, description="Time kept back from the server for that fallback now: a reply "
        "later than the deadline minus this is given up on.")


class UplinkInfo(_Out):
    """The link to the edge servers."""

    server_ok: bool = Field(description="False after a missed deadline, until a reply comes.")
    frames_sent: int = Field(description="Feature frames published.")
    bytes_sent: int = Field(description="Feature frame bytes published.")
    fallbacks: int = Field(description="Windows that fell back to the on-device variant.")
    guarded: int = Field(description="Of those, windows kept off a link sensed too slow for "
                         "their deadline (no frame sent, no head run).")
    late_replies: int = Field(description="Replies that came after their window's deadline.")
    server_probes: int = Field(description="Server probes sent: tokens of windows done on "
                               "the device, sent for the reply's round trip only.")
    server_probe_bytes: int = Field(description="Their frame bytes (not in bytes_sent).")
    server_probes_lost: int = Field(description="Server probes with no reply in time.")
    link_bps: float | None = Field(description="Uplink rate sensed now (bit/s), if sensing.")


class MqttInfo(_Out):
    """The broker connection."""

    connected: bool = Field(description="Connected right now.")
    connects: int = Field(description="Successful connects since start.")
    last_error: str | None = Field(description="Why the last connection failed or ended.")


class JournalInfo(_Out):
    """The durable journal of readings."""

    rows: int = Field(description="Readings journaled and not yet pruned.")
    max_rows: int = Field(description="Backpressure threshold.")
    inflight_windows: int = Field(description="Windows being inferred.")


class Status(_Out):
    """GET /v1/status: everything an operator wants at a glance."""

    gateway: str = Field(description="Gateway id.")
    version: str = Field(description="edgetok version.")
    uptime_s: int = Field(description="Seconds since start.")
    ready: dict[str, bool] = Field(description="Readiness checks (as /readyz).")
    healthy: bool = Field(description="False when pending work has stopped progressing.")
    bundle: BundleInfo = Field(description="Loaded bundle.")
    decision: DecisionInfo = Field(description="Decision in force.")
    uplink: UplinkInfo = Field(description="Uplink state.")
    mqtt: MqttInfo = Field(description="Broker connection.")
    journal: JournalInfo = Field(description="Journal.")
    control: dict[str, Any] = Field(description="Control plane: last coordinator decision, "
                                    "rejected decisions, measured latency, actuators.")
    counters: dict[str, int] = Field(description="Messages, readings, windows, results, dead "
                                     "letters and duplicates since start.")
    deadletters: dict[str, int] = Field(description="Dead letters stored, by reason.")
    head_ms: dict[str, float] = Field(description="Head latency per variant (ms): median of its "
                                     "last runs.")
