"""Dense genomes: one flat float32 vector per candidate (from-scratch search, small models)."""

from __future__ import annotations

import math

import numpy as np

SIN_EPS = 1e-6  # below this |sin(angle)|, SLERP degenerates and linear interpolation is exact enough


def exact_dot(a: np.ndarray, b: np.ndarray) -> float:
    """Float64 dot product by numpy's pairwise summation, not BLAS.

    BLAS dot kernels may sum in an order that depends on memory alignment, so the same search
    could drift in the last bits between runs; reproducibility (and bitwise resume) needs this.
    """
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    return float(np.add.reduce(a64 * b64))


def angle_between(a: np.ndarray, b: np.ndarray) -> float:
    """Angle between two whole flat vectors, computed once per crossover."""
    return _angle64(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))


def _angle64(a64: np.ndarray, b64: np.ndarray) -> float:
    """`angle_between` on vectors already in float64: the three dots of `exact_dot`, but each
    vector is converted once instead of twice (the conversions cost as much as the dots)."""
    norm = math.sqrt(float(np.add.reduce(a64 * a64))) * math.sqrt(float(np.add.reduce(b64 * b64)))
    if norm == 0.0:
        return 0.0
    cos = float(np.add.reduce(a64 * b64)) / norm
    return math.acos(min(1.0, max(-1.0, cos)))


def slerp_weights(t: float, omega: float) -> tuple[float, float]:
    """Coefficients (on A, on B) of SLERP at t; linear when the angle is (nearly) degenerate."""
    sin_omega = math.sin(omega)
    if abs(sin_omega) < SIN_EPS:
        return 1.0 - t, t
    return math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega


def split_slerp(a: np.ndarray, b: np.ndarray, split: int, ratio: float) -> np.ndarray:
    """t = ratio before `split` and 1 - ratio from `split` on, with one global angle."""
    omega = angle_between(a, b)
    child = np.empty_like(a)
    for lo, hi, t in ((0, split, ratio), (split, a.size, 1.0 - ratio)):
        if hi > lo:
            ca, cb = slerp_weights(t, omega)
            np.multiply(a[lo:hi], ca, out=child[lo:hi])
            child[lo:hi] += cb * b[lo:hi]
    return child
