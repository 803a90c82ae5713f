"""A synthetic task that costs a fixed time per candidate: it measures the engine, not a model."""

from __future__ import annotations

import time

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from evomerge.tasks import TASKS, FitnessTask


class SleepOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(0.05, ge=0.0, description="time each evaluation takes")
    dimension: int = Field(1000, ge=1)
    datapoints: int = Field(100, ge=1)


@TASKS.register("synthetic_sleep")
class SleepTask(FitnessTask):
    """Scores datapoint j by whether parameter j is positive, after sleeping `seconds`."""

    Options = SleepOptions

    @property
    def dimension(self) -> int:
        return self.options.dimension

    @property
    def num_datapoints(self) -> int:
        return self.options.datapoints

    def evaluate(self, params: np.ndarray) -> np.ndarray:
        time.sleep(self.options.seconds)
        n = self.options.datapoints
        return (np.resize(np.asarray(params), n) > 0).astype(np.float32)

    def test_score(self, params: np.ndarray) -> float:
        return float(np.mean(np.asarray(params) > 0))
