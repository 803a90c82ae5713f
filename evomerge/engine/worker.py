"""Fitness workers: load the task once, then score genomes datapoint by datapoint.

Task exceptions are caught here and returned as failed evaluations, so a bad candidate costs one
FAIL trial and never a worker; only a dying process reaches the dispatcher as an actor error.
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Any

import numpy as np

from evomerge.strategies.base import Evaluation
from evomerge.tasks import FitnessTask, build_task


class FitnessWorker:
    def __init__(self, task_name: str, task_options: dict[str, Any], seed: int, index: int = 0) -> None:
        # Per-worker seeding: reproducible, yet no two workers share a random stream.
        self.index = index
        self.task: FitnessTask = build_task(task_name, task_options, seed=seed * 1000 + index)

    def pid(self) -> int:
        return os.getpid()

    def evaluate(self, batch: list[tuple[int, np.ndarray]]) -> list[Evaluation]:
        return [self.evaluate_one(member_id, genome) for member_id, genome in batch]

    def evaluate_one(self, member_id: int, genome: np.ndarray) -> Evaluation:
        start = time.perf_counter()
        try:
            params = np.asarray(genome)
            scores = np.asarray(self.task.evaluate(params), dtype=np.float32)
            test = self.task.test_score(params)
            return Evaluation(member_id, scores, None if test is None else float(test), None,
                              time.perf_counter() - start)
        except Exception as exc:  # a fitness task may fail in any way; the search must go on
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            return Evaluation(member_id, None, None, f"fitness task raised {detail}", time.perf_counter() - start)
