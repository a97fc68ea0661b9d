"""Inverse standard normal CDF without scipy: the gateway runtime is numpy-only."""

from __future__ import annotations

import math

import numpy as np

# Rational approximation of the normal quantile by P. J. Acklam (2003): relative error below
# 1.2e-9 over (0, 1). One Halley step against math.erfc then brings it to double precision.
_A = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02,
      1.383577518672690e02, -3.066479806614716e01, 2.506628277459239e00)
_B = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02,
      6.680131188771972e01, -1.328068155288572e01)
_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00,
      -2.549732539343734e00, 4.374664141464968e00, 2.938163982698783e00)
_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00,
      3.754408661907416e00)
_P_LOW = 0.02425


def _acklam(p: float) -> float:
    """Acklam's initial estimate of the quantile of p in (0, 1)."""
    if p < _P_LOW:
        q = math.sqrt(-2.0 * math.log(p))
        num = ((((_C[0] * q + _C[1]) * q + _C[2]) * q + _C[3]) * q + _C[4]) * q + _C[5]
        return num / ((((_D[0] * q + _D[1]) * q + _D[2]) * q + _D[3]) * q + 1.0)
    if p > 1.0 - _P_LOW:
        return -_acklam(1.0 - p)
    q = p - 0.5
    r = q * q
    num = (((((_A[0] * r + _A[1]) * r + _A[2]) * r + _A[3]) * r + _A[4]) * r + _A[5]) * q
    return num / (((((_B[0] * r + _B[1]) * r + _B[2]) * r + _B[3]) * r + _B[4]) * r + 1.0)


def norm_ppf(p: float) -> float:
    """Quantile of the standard normal distribution at probability p in (0, 1)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"probability {p} outside (0, 1)")
    if p > 0.5:
        # Refine in the lower tail, where Phi(x) - p has no cancellation; 1 - p is exact here.
        return -norm_ppf(1.0 - p)
    x = _acklam(p)
    # Halley refinement: e = Phi(x) - p, with Phi from erfc for accuracy in both tails.
    e = 0.5 * math.erfc(-x / math.sqrt(2.0)) - p
    u = e * math.sqrt(2.0 * math.pi) * math.exp(x * x / 2.0)
    return x - u / (1.0 + x * u / 2.0)


def gaussian_breakpoints(alphabet: int) -> np.ndarray:
    """The alphabet-1 cut points that split N(0, 1) into equiprobable regions."""
    return np.array([norm_ppf(k / alphabet) for k in range(1, alphabet)], dtype=np.float64)
