"""Mel filterbank and short-time power spectrum in numpy, computed once per config."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Slaney's auditory-toolbox mel scale (the librosa default, htk=False): linear at
# 200/3 Hz per mel below 1 kHz, logarithmic above with 27 mels per factor of 6.4.
_HZ_PER_MEL = 200.0 / 3.0
_BREAK_HZ = 1000.0
_BREAK_MEL = _BREAK_HZ / _HZ_PER_MEL
_LOG_STEP = np.log(6.4) / 27.0


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel value of frequencies in Hz."""
    hz = np.asarray(hz, dtype=np.float64)
    above = _BREAK_MEL + np.log(np.maximum(hz, _BREAK_HZ) / _BREAK_HZ) / _LOG_STEP
    return np.where(hz >= _BREAK_HZ, above, hz / _HZ_PER_MEL)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """Frequencies in Hz of Slaney mel values."""
    mel = np.asarray(mel, dtype=np.float64)
    above = _BREAK_HZ * np.exp(_LOG_STEP * (np.maximum(mel, _BREAK_MEL) - _BREAK_MEL))
    return np.where(mel >= _BREAK_MEL, above, mel * _HZ_PER_MEL)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float,
                   fmax: float) -> np.ndarray:
    """Triangular filters (n_fft//2 + 1, n_mels), area-normalised ("slaney" norm)."""
    bins_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(np.array(fmin)), hz_to_mel(np.array(fmax)),
                                  n_mels + 2))
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rise = (bins_hz[None, :] - left) / (centre - left)
    fall = (right - bins_hz[None, :]) / (right - centre)
    tri = np.clip(np.minimum(rise, fall), 0.0, None)
    # Equal area per filter: a band's energy does not grow with its width in Hz.
    tri *= (2.0 / (right - left))
    return np.ascontiguousarray(tri.T)


def periodic_hann(win_length: int, n_fft: int) -> np.ndarray:
    """Periodic Hann window of win_length samples, zero-padded and centred in n_fft."""
    n = np.arange(win_length)
    win = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / win_length)
    out = np.zeros(n_fft)
    lead = (n_fft - win_length) // 2
    out[lead:lead + win_length] = win
    return out


def num_frames(samples: int, n_fft: int, hop: int, center: bool) -> int:
    """Frames the STFT yields for a clip of `samples` samples."""
    if center:
        return 1 + samples // hop
    return 0 if samples < n_fft else 1 + (samples - n_fft) // hop


def frame_signal(y: np.ndarray, n_fft: int, hop: int, center: bool) -> np.ndarray:
    """Strided view (B, frames, n_fft) of signals (B, S); centre mode zero-pads n_fft//2."""
    if center:
        y = np.pad(y, ((0, 0), (n_fft // 2, n_fft // 2)))
    frames = np.lib.stride_tricks.sliding_window_view(y, n_fft, axis=1)
    return frames[:, ::hop]


def power_spectrum(frames: np.ndarray, window: np.ndarray) -> np.ndarray:
    """|rfft|^2 of windowed frames (B, F, n_fft) -> (B, F, n_fft//2 + 1), float32."""
    spec = np.fft.rfft(frames * window, axis=-1)
    return (spec.real * spec.real + spec.imag * spec.imag).astype(np.float32, copy=False)


@dataclass(frozen=True, slots=True)
class SparseFilters:
    """A filterbank kept as its non-zero run per filter, applied without BLAS.

    A dense (bins x mels) matmul hands the work to multithreaded BLAS, whose spinning
    worker threads compete with the FFT for the gateway's few cores; every triangle covers
    only a few bins, so a gather, multiply and segment sum does the same work on one core.
    """

    cols: np.ndarray  # (nnz,) frequency bin of each non-zero weight, filter by filter
    weights: np.ndarray  # (nnz,) float32
    starts: np.ndarray  # (mels,) offset of each filter's run in cols
    empty: np.ndarray  # (mels,) filters with no non-zero weight (reduceat cannot say so)


def sparse_filters(dense: np.ndarray) -> SparseFilters:
    """Compress a (bins, mels) filterbank into per-filter runs of non-zero weights."""
    cols, weights, starts = [], [], []
    for m in range(dense.shape[1]):
        nz = np.flatnonzero(dense[:, m])
        starts.append(len(cols))
        cols.extend(nz.tolist())
        weights.extend(dense[nz, m].tolist())
    empty = np.array([len(np.flatnonzero(dense[:, m])) == 0 for m in range(dense.shape[1])])
    if not cols:  # degenerate bank: keep reduceat's indices valid
        cols, weights = [0], [0.0]
    last = len(cols) - 1
    return SparseFilters(np.array(cols, np.int64), np.array(weights, np.float32),
                         np.minimum(np.array(starts, np.int64), last), empty)


def apply_filters(power: np.ndarray, bank: SparseFilters) -> np.ndarray:
    """Mel energies (..., mels) of power spectra (..., bins)."""
    prod = power[..., bank.cols]
    prod *= bank.weights
    out = np.add.reduceat(prod, bank.starts, axis=-1)
    if bank.empty.any():
        out[..., bank.empty] = 0.0
    return out
