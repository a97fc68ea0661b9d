"""Wire frames: feature frames on the uplink and tail replies on the downlink."""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

MAGIC = b"ETKF"
FRAME_VERSION = 1
# magic, version, header length: a fixed 9-byte prefix keeps the header parse O(1).
_PREFIX = struct.Struct("!4sBI")
# Headers are small JSON; a bound stops a hostile frame from making us parse megabytes.
MAX_HEADER_BYTES = 64 * 1024

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int8")


class FrameError(ValueError):
    """A frame or reply could not be decoded."""


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """Everything the server needs to run the tail and route the answer back."""

    gateway: str
    bundle: str
    variant: str
    stream: str
    window: int
    start_ts: float
    end_ts: float
    deadline_ts: float
    sent_ts: float
    precision: Precision
    shape: tuple[int, ...]
    scale: float = 1.0
    zero_point: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def quantize(x: np.ndarray, precision: Precision) -> tuple[bytes, float, int]:
    """Encode a float32 array at a precision; int8 is per-tensor affine (scale, zero point)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if precision == "fp32":
        return x.tobytes(), 1.0, 0
    if precision == "fp16":
        return x.astype(np.float16).tobytes(), 1.0, 0
    lo = float(min(x.min(initial=0.0), 0.0))
    hi = float(max(x.max(initial=0.0), 0.0))
    scale = (hi - lo) / 255.0 or 1.0
    zero_point = round(-128 - lo / scale)
    q = np.clip(np.rint(x / scale) + zero_point, -128, 127).astype(np.int8)
    return q.tobytes(), scale, zero_point


def dequantize(data: bytes, shape: tuple[int, ...], precision: Precision, scale: float,
               zero_point: int) -> np.ndarray:
    """Inverse of quantize; FrameError if the byte count does not match the shape."""
    dtype = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}[precision]
    count = int(np.prod(shape))
    if len(data) != count * np.dtype(dtype).itemsize:
        raise FrameError(f"payload has {len(data)} bytes, shape {shape} at {precision} "
                         f"needs {count * np.dtype(dtype).itemsize}")
    arr = np.frombuffer(data, dtype=dtype).reshape(shape)
    if precision == "int8":
        return ((arr.astype(np.float32) - zero_point) * scale).astype(np.float32)
    return arr.astype(np.float32)


def encode_frame(header: FrameHeader, features: np.ndarray) -> bytes:
    """Build one uplink frame: fixed prefix, JSON header, quantized features."""
    payload, scale, zp = quantize(features, header.precision)
    fields = asdict(header)
    fields.update(shape=list(features.shape), scale=scale, zero_point=zp)
    head = json.dumps(fields, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, FRAME_VERSION, len(head)) + head + payload


def decode_frame(data: bytes) -> tuple[FrameHeader, np.ndarray]:
    """Parse an uplink frame; FrameError on anything malformed."""
    if len(data) < _PREFIX.size:
        raise FrameError("frame shorter than its prefix")
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise FrameError("bad magic: not an edgetok feature frame")
    if version != FRAME_VERSION:
        raise FrameError(f"frame version {version} is not supported (want {FRAME_VERSION})")
    if hlen > MAX_HEADER_BYTES or _PREFIX.size + hlen > len(data):
        raise FrameError(f"header length {hlen} is out of bounds")
    try:
        fields = json.loads(data[_PREFIX.size:_PREFIX.size + hlen])
        fields["shape"] = tuple(int(d) for d in fields["shape"])
        header = FrameHeader(**fields)
    except (ValueError, TypeError, KeyError) as exc:
        raise FrameError(f"bad frame header: {exc}") from exc
    if header.precision not in PRECISIONS:
        raise FrameError(f"unknown precision {header.precision!r}")
    features = dequantize(data[_PREFIX.size + hlen:], header.shape, header.precision,
                          header.scale, header.zero_point)
    return header, features


@dataclass(frozen=True, slots=True)
class TailReply:
    """The server's answer to one frame: logits, or an error saying why not."""

    gateway: str
    stream: str
    window: int
    variant: str
    logits: list[float]
    tail_ms: float
    server: str
    received_ts: float
    error: str | None = None

    def encode(self) -> bytes:
        """JSON bytes for the downlink."""
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> TailReply:
        """Parse a downlink payload; FrameError if it is not a reply."""
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError) as exc:
            raise FrameError(f"bad tail reply: {exc}") from exc
