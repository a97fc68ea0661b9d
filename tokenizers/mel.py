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
class FilterGroup:
    """Filters whose non-zero bin runs are disjoint and ascending: one reduceat applies all."""

    weights: np.ndarray  # (bins,) float32: each bin's weight in the group's filter over it
    starts: np.ndarray  # (n,) first non-zero bin of each filter, ascending
    mels: np.ndarray  # (n,) which output band each filter fills


def sparse_filters(dense: np.ndarray) -> tuple[FilterGroup, ...]:
    """Split a (bins, mels) filterbank into groups of non-overlapping filters.

    A dense matmul hands the work to multithreaded BLAS, whose spinning worker threads fight
    the FFT for a gateway's few cores. Mel triangles only overlap their neighbours, so two
    groups (even and odd bands) cover the bank, and each group is one multiply and one
    segment sum on a single core. Filters with no non-zero bin are left out (output 0).
    """
    runs = []
    for m in range(dense.shape[1]):
        nz = np.flatnonzero(dense[:, m])
        if nz.size:
            runs.append((int(nz[0]), int(nz[-1]) + 1, m))
    runs.sort()
    groups: list[list[tuple[int, int, int]]] = []
    for run in runs:
        for g in groups:
            if g[-1][1] <= run[0]:
                g.append(run)
                break
        else:
            groups.append([run])
    out = []
    for g in groups:
        w = np.zeros(dense.shape[0], np.float32)
        for lo, hi, m in g:
            w[lo:hi] = dense[lo:hi, m]
        out.append(FilterGroup(w, np.array([r[0] for r in g], np.int64),
                               np.array([r[2] for r in g], np.int64)))
    return tuple(out)


def apply_filters(power: np.ndarray, bank: tuple[FilterGroup, ...], n_mels: int) -> np.ndarray:
    """Mel energies (..., n_mels) of power spectra (..., bins)."""
    out = np.zeros((*power.shape[:-1], n_mels), np.float32)
    for g in bank:
        # Bins between two runs carry weight 0, so each segment sums exactly one filter.
        out[..., g.mels] = np.add.reduceat(power * g.weights, g.starts, axis=-1)
    return out
