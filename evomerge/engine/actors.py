"""Ray actor wrappers: the population actor owns the archive; worker actors own the fitness task."""

from __future__ import annotations

from typing import Any

import numpy as np
import ray

from evomerge.config import SearchConfig
from evomerge.engine.dispatch import Dispatcher
from evomerge.engine.late_tests import TestRecord
from evomerge.engine.population import EvalRecord, Population
from evomerge.engine.replay import TrialEntry, replay
from evomerge.engine.worker import FitnessWorker
from evomerge.strategies import build_strategy
from evomerge.strategies.base import Problem
from evomerge.engine.basis_spec import build_basis, genome_kind, task_context
from evomerge.errors import ConfigError
from evomerge.genomes.recipe import PrefixGram
from evomerge.genomes.spaces import RecipeSpace
from evomerge.tasks import build_task, check_groups


def build_problem(config: SearchConfig, gram: PrefixGram | None = None, seeds_checked: bool = False) -> Problem:
    """Describe the search space. The task is built only to learn sizes and make seeds: a checkpoint
    task reads its dimension from the seeds' layout and its datapoints from its data files, and
    builds no model here. `gram` is the seeds' prefix Gram when the driver has it (cached in the
    run folder); `seeds_checked` when the driver already ran the finite check."""
    task = build_task(config.fitness.task, config.fitness.options, seed=config.seed)
    basis = build_basis(config, task, check_finite=not seeds_checked)
    task.attach(task_context(config, basis, "population"))
    try:
        groups = check_groups(task.groups, task.num_datapoints)
    except ValueError as exc:
        raise ConfigError(f"fitness task {config.fitness.task!r}: {exc}") from None
    if basis is not None and basis.size != task.dimension:
        raise ConfigError(f"the seeds have {basis.size} parameters but fitness task {config.fitness.task!r} "
                          f"reads {task.dimension}; point the task at the same architecture as the seeds")
    if genome_kind(config) == "recipe":
        assert basis is not None
        if gram is None or gram.size != basis.size or gram.num_seeds != basis.num_seeds:
            gram = basis.prefix_gram(config.genome.max_boundaries)
        space = RecipeSpace(gram, basis)
        problem = Problem(dimension=task.dimension, num_datapoints=task.num_datapoints, space=space)
    else:
        initial = [] if basis is None else [basis.values(0, basis.size)[k].astype(np.float32)
                                            for k in range(basis.num_seeds)]
        problem = Problem(dimension=task.dimension, num_datapoints=task.num_datapoints, initial=initial)
    problem.groups = groups
    problem.task, problem.basis = task, basis  # DAM trains against the task's forward and the seeds
    problem.subsample = config.fitness.subsample
    return problem


def build_population(config: SearchConfig, problem: Problem | None = None) -> Population:
    problem = problem or build_problem(config)
    strategy = build_strategy(config.strategy.name, config.strategy.options, problem, config.seed)
    return Population(strategy, config.budget.max_evaluations, test_every=config.fitness.test_every,
                      datapoint_budget=config.budget.datapoints)


def start_workers(config: SearchConfig, seeds_checked: bool = False) -> list[Any]:
    spec = config.workers
    # Ray restarts a dead worker without limit; the dispatcher decides when one is hopeless
    # (workers.max_restarts deaths in a row) and re-sends its children itself, so that a child
    # is never evaluated twice behind our back.
    actor = ray.remote(FitnessWorker).options(
        num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, max_restarts=-1, max_task_retries=0,
    )
    config_json = config.model_dump(mode="json")
    return [actor.remote(config_json, i, seeds_checked) for i in range(spec.count)]


class PopulationActor:
    def __init__(self, config_json: dict[str, Any], workers: list[Any], gram: PrefixGram | None = None,
                 seeds_checked: bool = False) -> None:
        config = SearchConfig.model_validate(config_json)
        problem = build_problem(config, gram, seeds_checked)
        problem.background = not config.sync  # see Problem.background
        # DAM (train_on: worker) trains on a fitness worker: the handles, and the dispatcher's
        # view of which are live (it is built below; the strategy asks only once it trains).
        problem.workers = list(workers)
        problem.live_workers = lambda: self.dispatcher.live_workers
        self.population = build_population(config, problem)
        # Workers breed dense children from their lineage: see evomerge/genomes/offspring.py.
        self.population.strategy.problem.space.defer_breeding = config.workers.breed_on_workers
        self.sync = config.sync
        self.dispatcher = Dispatcher(
            self.population, workers, batch=config.workers.batch, sync=config.sync,
            max_retries_per_child=config.workers.max_retries_per_child,
            max_worker_deaths=config.workers.max_restarts + 1, depth=config.workers.pipeline,
            timeout=config.workers.timeout_seconds,
        )

    def advance(self, max_seconds: float = 0.5) -> tuple[list[EvalRecord], bool, list[TestRecord]]:
        """The records of one stretch, whether the search is over (budget spent, or the
        strategy finished early, and every test job back), and the test jobs' results."""
        records = self.dispatcher.advance(max_seconds)
        return records, self.dispatcher.over, self.dispatcher.take_test_records()

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return self.population.state_dict()

    def load_state_dict(self, meta: dict[str, Any], arrays: dict[str, np.ndarray],
                        entries: list[TrialEntry] | None = None, study_max_member: int = -1,
                        tests: dict[int, TestRecord] | None = None) -> dict[str, Any]:
        """Restore a snapshot, tell back the trials recorded after it (engine/replay.py), and
        send out again the children still in flight and the test jobs (`test_every: archive`)
        the study has no result for (`tests`: those it has); returns the replay report."""
        self.population.load_state_dict(meta, arrays)
        self.population.note_measured(tests or {})
        report = replay(self.population, entries or [], study_max_member, sync=self.sync)
        self.dispatcher.requeue(list(self.population.inflight.values()))
        return {**report.as_dict(), "tests_resent": self.population.pending_tests}

    def status(self) -> dict[str, Any]:
        return self.population.status()

    def groups(self) -> list[tuple[str, int]] | None:
        """The task's groups (one objective each in the study), or None."""
        return self.population.groups

    def best(self) -> dict[str, Any] | None:
        best = self.population.best
        if best is None:
            return None
        return {"member_id": best.member_id, "train_score": best.train_score, "test_score": best.test_score,
                "generation": best.generation, "parents": best.parents,
                "genome": self.population.strategy.problem.space.realise(best.genome),
                "elements": self.population.basis_elements, **self.population.best_groups()}


RemotePopulation = ray.remote(num_cpus=0)(PopulationActor)
