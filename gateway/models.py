"""Pydantic models of what the gateway serves: results, status, streams (HTTP and MQTT)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

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

    name: str
    topics: list[str]
    channels: list[str]
    rate_hz: float
    window: int
    hop: int
    deadline_ms: float
    open_windows: int
    results: int
    last_result_ts: float | None


class StreamsPage(_Out):
    """All streams."""

    streams: list[StreamInfo]
