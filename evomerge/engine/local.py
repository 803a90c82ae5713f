"""The search loop without Ray: one process, strictly sequential.

Used by benchmarks as the reference point for engine overhead, and handy for debugging a task.
`in_flight` > 1 keeps that many children asked but not yet told (told oldest first): an async
search's staleness without its timing, for measuring what staleness costs.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Callable

from evomerge.config import SearchConfig
from evomerge.engine.actors import build_population
from evomerge.engine.data_merges import prepare_data_merges
from evomerge.engine.late_tests import TestRecord
from evomerge.engine.population import EvalRecord, Population
from evomerge.engine.worker import FitnessWorker
from evomerge.strategies.base import Candidate


def run_local(config: SearchConfig, on_record: Callable[[EvalRecord], None] | None = None,
              in_flight: int = 1, on_test: Callable[[TestRecord], None] | None = None,
              run_dir: Path | None = None, merges_dir: Path | None = None) -> Population:
    """`on_test`: each late held-out test (`fitness.test_every: archive`), run inline right
    after the tell that asked for it, so the search stays exactly the serial one. `run_dir`:
    where data-based merges (fisher/regmean in `merges`/`seed_with`) are written once and
    reused; only such a search needs it (or `merges_dir`, their folder, default RUN_DIR/merges)."""
    if in_flight < 1:
        raise ValueError(f"in_flight must be >= 1 (1 is the serial search), got {in_flight}")
    config = prepare_data_merges(config, run_dir, merges_dir)
    population = build_population(config)
    worker = FitnessWorker(config.model_dump(mode="json"), 0)
    queue: deque[Candidate] = deque()
    while not population.done:
        while len(queue) < in_flight:
            candidate = population.ask()
            if candidate is None:  # e.g. the initial members must come back first
                break
            queue.append(candidate)
        if not queue and population.done:  # the next child did not fit the datapoint budget
            break
        if not queue:
            raise RuntimeError("the strategy produced no candidate while nothing is in flight")
        child = queue.popleft()
        if population.basis_elements:
            worker.sync_elements(population.basis_elements)
        # Told right after it is scored: the threshold is the very best it is judged against.
        record = population.tell(worker.evaluate_one(child.member_id, child.genome,
                                                     test_above=population.test_threshold(),
                                                     job=population.job(child)))
        if on_record is not None:
            on_record(record)
        for job in population.take_tests(population.pending_tests):
            test = population.tell_test(worker.test_one(job.member_id, job.genome))
            if on_test is not None:
                on_test(test)
    return population
