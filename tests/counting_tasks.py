"""A test-only fitness task that logs every evaluate and test_score call, from any process."""

from __future__ import annotations

import os
import time
import zlib

import numpy as np
from pydantic import Field

from fitness.digits import DigitsOptions, DigitsTask


class CountingOptions(DigitsOptions):
    log: str = Field(description="file that gets one line per call: 'E' per evaluate, 'T <train mean>' per test_score")
    sleep: float = Field(0.0, ge=0.0, description="seconds each evaluate sleeps (a slower fitness)")
    test_fails: int = Field(0, ge=0, description="test_score raises on about 1 in this many genomes (0: never)")
    test_kills: int = Field(0, ge=0, description="test_score kills its process on about 1 in this many genomes, "
                                                 "writing 'K <train mean>' first (0: never)")


class CountingDigits(DigitsTask):
    """Digits, with a line appended to `log` per call (Ray workers are other processes, so the
    count goes through a file). A test line carries the genome's train mean, computed the way
    the worker computes it, so a test can say which children were tested."""

    Options = CountingOptions

    def _log(self, line: str) -> None:
        fd = os.open(self.options.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())  # one short O_APPEND write: lines never interleave
        finally:
            os.close(fd)

    def evaluate(self, params: np.ndarray, indices: np.ndarray | None = None) -> np.ndarray:
        if self.options.sleep:
            time.sleep(self.options.sleep)
        self._log("E")
        return super().evaluate(params, indices)

    def test_score(self, params: np.ndarray) -> float | None:
        mean = float(np.mean(np.asarray(DigitsTask.evaluate(self, params), dtype=np.float32)))
        crc = zlib.crc32(np.ascontiguousarray(params, dtype=np.float32).tobytes())
        if self.options.test_kills and crc % self.options.test_kills == 0:
            self._log(f"K {mean!r}")
            os._exit(1)
        self._log(f"T {mean!r}")
        if self.options.test_fails and crc % self.options.test_fails == 0:
            raise RuntimeError("simulated test crash")
        return super().test_score(params)


def read_log(path) -> tuple[int, list[float]]:
    """(evaluate calls, train means of the genomes test_score was called on, in call order)."""
    lines = open(path).read().split("\n") if os.path.exists(path) else []
    evaluations = sum(line == "E" for line in lines)
    tested = [float(line.split(" ", 1)[1]) for line in lines if line.startswith("T ")]
    return evaluations, tested
