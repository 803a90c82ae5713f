"""The search loop without Ray: one process, strictly sequential.

Used by benchmarks as the reference point for engine overhead, and handy for debugging a task.
"""

from __future__ import annotations

from typing import Callable

from evomerge.config import SearchConfig
from evomerge.engine.actors import build_population
from evomerge.engine.population import EvalRecord, Population
from evomerge.engine.worker import FitnessWorker


def run_local(config: SearchConfig, on_record: Callable[[EvalRecord], None] | None = None) -> Population:
    population = build_population(config)
    worker = FitnessWorker(config.model_dump(mode="json"), 0)
    while not population.done:
        candidate = population.ask()
        if candidate is None:
            raise RuntimeError("the strategy produced no candidate while nothing is in flight")
        if population.basis_elements:
            worker.sync_elements(population.basis_elements)
        record = population.tell(worker.evaluate_one(candidate.member_id, candidate.genome))
        if on_record is not None:
            on_record(record)
    return population
