"""Test-only fitness tasks that misbehave on some candidates, deterministically by genome bytes."""

from __future__ import annotations

import zlib

import numpy as np
from pydantic import Field

from fitness.digits import DigitsOptions, DigitsTask


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


class SlowDigits(DigitsTask):
    """Takes a few milliseconds per candidate, so a test can act while the search is mid-way."""

    def evaluate(self, params: np.ndarray) -> np.ndarray:
        import time

        time.sleep(0.005)
        return super().evaluate(params)


class SlowerDigits(DigitsTask):
    """20 ms per candidate: time to watch snapshots appear and kill a worker between them."""

    def evaluate(self, params: np.ndarray) -> np.ndarray:
        import time

        time.sleep(0.02)
        return super().evaluate(params)


class KillerDigits(DigitsTask):
    """Kills its own worker process on about 1 in 25 candidates: a child that always crashes its worker."""

    def evaluate(self, params: np.ndarray) -> np.ndarray:
        import os

        if zlib.crc32(np.ascontiguousarray(params, dtype=np.float32).tobytes()) % 25 == 0:
            os._exit(1)
        return super().evaluate(params)


class HangOptions(DigitsOptions):
    log: str = Field(description="file that gets one line (the genome's crc) per hang, for the test to count")
    every: int = Field(25, ge=1, description="hang on about 1 in `every` candidates")


class HangingDigits(DigitsTask):
    """Hangs (sleeps an hour) on about 1 in `every` candidates, writing the genome's crc to `log` first."""

    Options = HangOptions
    stuck = False  # True: hang where the worker's alarm cannot reach it, as native code would

    def evaluate(self, params: np.ndarray) -> np.ndarray:
        import signal
        import time

        crc = zlib.crc32(np.ascontiguousarray(params, dtype=np.float32).tobytes())
        if crc % self.options.every == 0:
            with open(self.options.log, "a") as f:
                f.write(f"{crc}\n")
            if self.stuck:
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(3600)
        return super().evaluate(params)


class StuckDigits(HangingDigits):
    stuck = True
