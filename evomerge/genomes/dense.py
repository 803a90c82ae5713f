"""Dense genomes: one flat float32 vector per candidate (from-scratch search, small models)."""

from __future__ import annotations

import math
import threading

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
    """Angle between two whole flat vectors, computed once per crossover.

    The three dots of `exact_dot` (same values, same summation, so the same bits), with each
    vector converted once, in reused float64 buffers: fresh model-sized temporaries come from the
    OS as new pages each time, and faulting them in cost more than the arithmetic (~190 against
    ~40 us on digits' 19k parameters)."""
    a64, b64, product = _scratch(a.size)
    np.copyto(a64, a, casting="same_kind")
    np.copyto(b64, b, casting="same_kind")
    aa = float(np.add.reduce(np.multiply(a64, a64, out=product)))
    bb = float(np.add.reduce(np.multiply(b64, b64, out=product)))
    norm = math.sqrt(aa) * math.sqrt(bb)
    if norm == 0.0:
        return 0.0
    cos = float(np.add.reduce(np.multiply(a64, b64, out=product))) / norm
    return math.acos(min(1.0, max(-1.0, cos)))


_buffers = threading.local()


def _scratch(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three float64 buffers of `size`, per thread, kept for the next call."""
    held = getattr(_buffers, "arrays", None)
    if held is None or held[0].size != size:
        held = _buffers.arrays = tuple(np.empty(size, dtype=np.float64) for _ in range(3))
    return held


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
