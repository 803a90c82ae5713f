"""Test-only fitness tasks that misbehave on some candidates, deterministically by genome bytes."""

from __future__ import annotations

import zlib

import numpy as np

from fitness.digits import DigitsTask


def _bucket(params: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(params, dtype=np.float32).tobytes()) % 7


class FlakyDigits(DigitsTask):
    """Raises on about 1 in 7 candidates and returns NaN scores on another 1 in 7."""

    def evaluate(self, params: np.ndarray) -> np.ndarray:
        bucket = _bucket(params)
        if bucket == 0:
            raise RuntimeError("simulated fitness crash")
        scores = super().evaluate(params)
        if bucket == 1:
            scores = scores.copy()
            scores[3] = np.nan
        return scores
