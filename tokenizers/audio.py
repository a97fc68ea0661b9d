"""Audio: raw PCM payloads (int16 or float32) to log-mel frames, cut into patch tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgetok.tokenizers.base import Modality, Payload, TokenBatch, TokenizeError, WindowKind
from edgetok.tokenizers.mel import (
    apply_filters,
    frame_signal,
    mel_filterbank,
    num_frames,
    periodic_hann,
    power_spectrum,
    sparse_filters,
)

# Floor on mel power before the log (librosa's default amin): -100 dB for digital silence
# instead of -inf.
AMIN = 1e-10
# Float PCM is nominally within [-1, 1]. Clipping absurd values keeps |X|^2 finite in
# float32; a sender that really exceeds this is broken and its audio is noise anyway.
FLOAT_PCM_LIMIT = 1e3
# Frames transformed per block. The whole batch's frames at once (64 clips x 101 x 400
# floats, ~10 MB plus the complex spectrum) spill out of cache and run ~4x slower per clip
# on the reference 2-core machine; much smaller blocks pay Python overhead per block.
STFT_BLOCK_FRAMES = 256
# Keeps a silent clip (all frames at the floor) from dividing by ~0 when normalising.
NORM_EPS = 1e-5

_DTYPES: dict[str, np.dtype[np.generic]] = {"int16": np.dtype("<i2"),
                                             "float32": np.dtype("<f4")}


class LogMelConfig(BaseModel):
    """Log-mel spectrogram of a PCM clip; each token is `patch_frames` frames of all bands."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # What the gateway feeds tokenize(): see WindowKind in base.py.
    window_kind: ClassVar[WindowKind] = "payload"

    type: Literal["logmel"] = Field("logmel", description="Tokenizer key.")
    sample_rate: int = Field(16000, ge=1000, le=384000,
                             description="Declared stream rate in Hz; other rates are refused.")
    sample_format: Literal["int16", "float32"] = Field(
        "int16", description="Little-endian PCM sample type of the payload.")
    pcm_channels: int = Field(1, ge=1, le=8,
                              description="Interleaved channels in the payload, downmixed.")
    clip_samples: int = Field(16000, ge=1, le=1 << 22,
                              description="Samples per channel in a full clip; shorter clips "
                              "are zero-padded with masked frames, longer ones refused.")
    n_fft: int = Field(400, ge=16, le=16384, description="FFT size in samples.")
    win_length: int | None = Field(None, ge=16, le=16384,
                                   description="Hann window length; None means n_fft.")
    hop_length: int = Field(160, ge=1, le=16384, description="Samples between frames.")
    n_mels: int = Field(64, ge=1, le=512, description="Mel bands.")
    fmin: float = Field(0.0, ge=0.0, description="Lowest band edge in Hz.")
    fmax: float | None = Field(None, gt=0.0, description="Highest band edge; None is Nyquist.")
    center: bool = Field(True, description="Centre frames on hop multiples (zero padding).")
    top_db: float | None = Field(80.0, gt=0.0,
                                 description="Clip each clip's dB below its max minus this.")
    patch_frames: int = Field(4, ge=1, le=1024, description="Frames per token.")
    normalize: bool = Field(True, description="Per-clip standardisation of the dB values "
                            "(statistics kept in aux as loc/scale).")
    nan_policy: Literal["mask", "reject"] = Field(
        "mask", description="NaN/inf float samples: 'mask' zeroes them and masks the frames "
        "they touch, 'reject' refuses the clip.")
    max_bytes: int = Field(1 << 22, ge=1, description="Largest payload accepted, in bytes.")

    @model_validator(mode="after")
    def _consistent(self) -> LogMelConfig:
        if self.win_length is not None and self.win_length > self.n_fft:
            raise ValueError("win_length must not exceed n_fft")
        top = self.fmax if self.fmax is not None else self.sample_rate / 2
        if not self.fmin < top <= self.sample_rate / 2:
            raise ValueError(f"need fmin < fmax <= Nyquist, got {self.fmin}, {top}")
        if self.frames < 1:
            raise ValueError("clip_samples is shorter than one frame")
        return self

    @property
    def frames(self) -> int:
        """STFT frames in a full clip."""
        return num_frames(self.clip_samples, self.n_fft, self.hop_length, self.center)

    def num_tokens(self) -> int:
        """Tokens per clip."""
        return -(-self.frames // self.patch_frames)

    def token_dim(self) -> int:
        """Width of each token vector."""
        return self.patch_frames * self.n_mels

    def build(self) -> LogMelTokenizer:
        """The tokenizer this config describes."""
        return LogMelTokenizer(self)


class LogMelTokenizer:
    """Batched PCM decoding, STFT, mel projection, dB and patching."""

    def __init__(self, config: LogMelConfig) -> None:
        self.config = config
        cfg = config
        fmax = cfg.fmax if cfg.fmax is not None else cfg.sample_rate / 2
        self.filters = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin,
                                      fmax).astype(np.float32)
        self.bank = sparse_filters(self.filters)
        self.window = periodic_hann(cfg.win_length or cfg.n_fft, cfg.n_fft).astype(np.float32)
        self.dtype = _DTYPES[cfg.sample_format]
        # Time of frame f relative to the clip start: its centre sample over the rate.
        lead = 0 if cfg.center else cfg.n_fft // 2
        self.frame_offsets = (np.arange(cfg.frames) * cfg.hop_length + lead) / cfg.sample_rate

    def decode(self, payload: Payload | bytes, index: int = 0) -> np.ndarray:
        """Mono float32 samples of one payload, checked against the stream's declaration."""
        cfg = self.config
        p = payload if isinstance(payload, Payload) else Payload(bytes(payload))
        if p.sample_rate is not None and p.sample_rate != cfg.sample_rate:
            raise TokenizeError("bad_rate", f"clip at {p.sample_rate} Hz, the stream "
                                f"declares {cfg.sample_rate} Hz", index)
        size = len(p.data)
        if size == 0:
            raise TokenizeError("empty", "empty audio payload", index)
        if size > cfg.max_bytes:
            raise TokenizeError("too_large", f"{size} bytes > max_bytes {cfg.max_bytes}", index)
        frame = self.dtype.itemsize * cfg.pcm_channels
        if size % frame:
            raise TokenizeError("undecodable", f"{size} bytes is not a whole number of "
                                f"{frame}-byte {cfg.sample_format} frames", index)
        n = size // frame
        if n > cfg.clip_samples:
            raise TokenizeError("too_large", f"{n} samples > clip_samples {cfg.clip_samples}",
                                index)
        pcm = np.frombuffer(p.data, dtype=self.dtype).reshape(n, cfg.pcm_channels)
        if cfg.sample_format == "int16":
            mono = pcm.astype(np.float32).mean(axis=1) * np.float32(1 / 32768)
        else:
            mono = pcm.mean(axis=1, dtype=np.float32) if cfg.pcm_channels > 1 else pcm[:, 0]
        return np.asarray(mono, dtype=np.float32)

    def log_mel(self, y: np.ndarray) -> np.ndarray:
        """dB mel spectrogram (B, frames, n_mels) of float32 signals (B, samples)."""
        cfg = self.config
        y = np.asarray(y, np.float32)
        if cfg.center:
            y = np.pad(y, ((0, 0), (cfg.n_fft // 2, cfg.n_fft // 2)))
        return self._log_mel_padded(y)

    def _log_mel_padded(self, y: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """log_mel of signals that already carry their centre padding (if any), into out."""
        cfg = self.config
        frames = frame_signal(y, cfg.n_fft, cfg.hop_length, center=False)
        b, f = frames.shape[:2]
        mel = np.empty((b, f, cfg.n_mels), np.float32) if out is None else out
        step = max(1, STFT_BLOCK_FRAMES // max(f, 1))
        for i in range(0, b, step):
            mel[i:i + step] = apply_filters(power_spectrum(frames[i:i + step], self.window),
                                            self.bank, cfg.n_mels)
        np.maximum(mel, np.float32(AMIN), out=mel)
        db = np.log10(mel, out=mel)
        db *= np.float32(10.0)
        if cfg.top_db is not None:
            floor = db.max(axis=(1, 2), keepdims=True) - np.float32(cfg.top_db)
            np.maximum(db, floor, out=db)
        return db

    def tokenize(self, windows: Sequence[Payload | bytes]) -> TokenBatch:
        """Tokenize a batch of PCM payloads into (B, N, patch_frames * n_mels) vectors."""
        cfg = self.config
        if not windows:
            raise TokenizeError("empty", "no clips to tokenize")
        b = len(windows)
        # Decode straight into the centre-padded buffer: no second copy for the padding.
        lead = cfg.n_fft // 2 if cfg.center else 0
        y = np.zeros((b, cfg.clip_samples + 2 * lead), np.float32)
        lengths = np.empty(b, np.int64)
        stamps = np.empty(b, np.float64)
        bad: np.ndarray | None = None
        for i, payload in enumerate(windows):
            mono = self.decode(payload, i)
            stamps[i] = payload.timestamp if isinstance(payload, Payload) else 0.0
            lengths[i] = mono.size
            finite = np.isfinite(mono)
            if not finite.all():
                if cfg.nan_policy == "reject":
                    raise TokenizeError("non_finite", "clip holds NaN or inf samples", i)
                if bad is None:
                    bad = np.zeros((b, cfg.clip_samples), bool)
                bad[i, :mono.size] = ~finite
                mono = np.where(finite, mono, np.float32(0.0))
            if cfg.sample_format == "float32":
                mono = np.clip(mono, -FLOAT_PCM_LIMIT, FLOAT_PCM_LIMIT)
            y[i, lead:lead + mono.size] = mono
        n = cfg.num_tokens()
        # Frames go straight into the token buffer; the tail past the last frame stays 0.
        grid = np.zeros((b, n * cfg.patch_frames, cfg.n_mels), np.float32)
        db = self._log_mel_padded(y, out=grid[:, :cfg.frames])
        starts = np.arange(cfg.frames) * cfg.hop_length - (cfg.n_fft // 2 if cfg.center else 0)
        # A frame is real data while its centre is within the clip (the last centred frame
        # of a full clip sits on the end, half of it padding, as in librosa).
        valid = starts[None, :] + (cfg.n_fft // 2) <= lengths[:, None]
        if bad is not None:
            hit = frame_signal(bad.astype(np.int8), cfg.n_fft, cfg.hop_length, cfg.center)
            valid &= ~hit.any(axis=2)
        if not valid.any(axis=1).all():
            raise TokenizeError("empty", "a clip has no usable frame",
                                int(np.flatnonzero(~valid.any(axis=1))[0]))
        all_valid = bool(valid.all())
        if not all_valid:
            db[~valid] = 0.0  # statistics over real frames only; padding stays exactly 0
        aux: dict[str, np.ndarray] = {}
        if cfg.normalize:
            # In place, no (B, F, M) temporaries: centre, re-zero the padding, then the
            # sum of squares of centred values (no cancellation even in float32).
            cnt = valid.sum(axis=1) * float(cfg.n_mels)
            loc = db.sum(axis=(1, 2), dtype=np.float64) / cnt
            db -= loc.astype(np.float32)[:, None, None]
            if not all_valid:
                db[~valid] = 0.0
            var = np.einsum("bfm,bfm->b", db, db).astype(np.float64) / cnt
            scale = np.sqrt(var + NORM_EPS)
            db *= (1.0 / scale).astype(np.float32)[:, None, None]
            aux = {"loc": loc.astype(np.float32), "scale": scale.astype(np.float32)}
        frames_ok = np.zeros((b, n * cfg.patch_frames), bool)
        frames_ok[:, :cfg.frames] = valid
        vectors = grid.reshape(b, n, cfg.patch_frames * cfg.n_mels)
        mask = frames_ok.reshape(b, n, cfg.patch_frames).any(axis=2)
        ts = stamps[:, None] + self.frame_offsets[::cfg.patch_frames][None, :n]
        modality = np.full(mask.shape, Modality.AUDIO, np.int16)
        return TokenBatch(modality, ts, mask, vectors=vectors, aux=aux)
