"""A synthetic task that costs a fixed time per candidate: it measures the engine, not a model."""

from __future__ import annotations

import time

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from evomerge.tasks import TASKS, FitnessTask, check_indices


class SleepOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(0.05, ge=0.0, description="time each evaluation takes")
    dimension: int = Field(1000, ge=1)
    datapoints: int = Field(100, ge=1)


@TASKS.register("synthetic_sleep")
class SleepTask(FitnessTask):
    """Scores datapoint j by whether parameter j is positive, after sleeping `seconds`."""

    Options = SleepOptions
    supports_subsample = True  # sleeps in proportion to the datapoints scored, like an LLM

    @property
    def dimension(self) -> int:
        return self.options.dimension

    @property
    def num_datapoints(self) -> int:
        return self.options.datapoints

    def evaluate(self, params: np.ndarray, indices: np.ndarray | None = None) -> np.ndarray:
        idx = check_indices(self, indices)
        n = self.options.datapoints
        time.sleep(self.options.seconds * (1.0 if idx is None else idx.size / n))
        scores = (np.resize(np.asarray(params), n) > 0).astype(np.float32)
        return scores if idx is None else scores[idx]

    def test_score(self, params: np.ndarray) -> float:
        return float(np.mean(np.asarray(params) > 0))
