"""A test-only LM task that logs every evaluate call, from any process (see counting_tasks.py)."""

from __future__ import annotations

import os

import numpy as np
from pydantic import Field

from fitness.lm_tasks import LMExactMatchTask, LMTaskOptions


class CountingLMOptions(LMTaskOptions):
    log: str = Field(description="file that gets one 'E' line per evaluate call")


class CountingExactMatch(LMExactMatchTask):
    Options = CountingLMOptions

    def evaluate(self, params) -> np.ndarray:
        fd = os.open(self.options.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"E\n")
        finally:
            os.close(fd)
        return super().evaluate(params)
