"""Fitness workers: load the task (and the seeds) once, then score genomes datapoint by datapoint.

Task exceptions are caught here and returned as failed evaluations, so a bad candidate costs one
FAIL trial and never a worker; only a dying process reaches the dispatcher as an actor error.
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Any

import numpy as np
import torch

from evomerge.config import SearchConfig
from evomerge.engine.late_tests import TestRecord
from evomerge.engine.population import finite_scores
from evomerge.engine.basis_spec import build_basis, genome_kind, task_context
from evomerge.engine.timeouts import Alarm, EvaluationTimeout
from evomerge.genomes.columns import ColumnGenome
from evomerge.genomes.fused_combine import wants_fused
from evomerge.genomes.layerwise import LayerwiseGenome
from evomerge.genomes.merged_folder import MergedFolder
from evomerge.genomes.offspring import Lineage, ParentCache, StaleParents, realise
from evomerge.genomes.recipe import Recipe
from evomerge.strategies.base import Evaluation
from evomerge.tasks import FitnessTask, build_task


class FitnessWorker:
    def __init__(self, config_json: dict[str, Any], index: int = 0, seeds_checked: bool = False) -> None:
        config = SearchConfig.model_validate(config_json)
        self.index = index
        # Per-worker seeding: reproducible, yet no two workers share a random stream.
        self.task: FitnessTask = build_task(config.fitness.task, config.fitness.options,
                                            seed=config.seed * 1000 + index)
        # The driver checks the seeds once per search; a worker (and its restarts) reads none of them.
        self.basis = (build_basis(config, self.task, check_finite=not seeds_checked)
                      if genome_kind(config) == "recipe" else None)
        self.task.attach(task_context(config, self.basis, "worker"))
        self._seeds_on = config.fitness.options.get("seeds_on", "auto")
        self._buffer: torch.Tensor | None = None
        if self.basis is not None and wants_fused(self.basis.kernel, self.basis.size):
            # The compile (seconds; about 20 the first time on a machine) starts with the worker, on
            # a thread: until it is ready the eager combine writes the same bits (fused_combine.py).
            self.basis.prepare_kernel(self._candidate_buffer())
        self.parents = ParentCache()  # archive members sent to this worker, to breed children from
        self.timeout = config.workers.timeout_seconds
        self._dam_trainers: dict[str, Any] = {}  # DAM's trainer over this worker's task, by its options

    def pid(self) -> int:
        return os.getpid()

    def evaluate(self, batch: list[tuple[int, Any]], elements: Any = None,
                 *parents: tuple[int, int, np.ndarray],
                 test_above: float | None = None) -> tuple[list[Evaluation], list[int]]:
        """Scores for the batch, and the member ids of children whose parents this worker does
        not hold (it restarted, or calls crossed): the dispatcher sends those again, whole.

        `test_above`: the held-out test score is computed only for a child whose mean train score
        is above it (the population's best when the batch was sent, `fitness.test_every: best`);
        None computes it for every child.

        `parents` are (slot, member id, genome) entries for the cache, one argument each: Ray
        inlines an argument under 100 KB in the call, and sends a bigger one (a list of several
        genomes) through its object store, which cost ~6x the CPU in the population actor."""
        if elements is not None:
            self.sync_elements(elements)
        if parents:
            self.parents.update(parents)
        evaluations: list[Evaluation] = []
        stale: list[int] = []
        for item in batch:
            member_id, genome = item[0], item[1]
            job = item[2] if len(item) > 2 else None  # subsampling: (indices, observed sum)
            start, wall = time.perf_counter(), time.time()  # the trial's start in the study
            if isinstance(genome, Lineage):
                try:
                    genome = self.parents.breed(genome)
                except StaleParents:
                    stale.append(member_id)
                    continue
                except Exception as exc:  # a bad lineage fails its child, not the worker
                    evaluations.append(Evaluation(member_id, None, None, f"breeding the child failed: {exc!r}",
                                                  time.perf_counter() - start, started=wall))
                    continue
            evaluation = self.evaluate_one(member_id, genome, test_above=test_above, job=job)
            evaluation.seconds = time.perf_counter() - start  # breeding is this worker's work too
            evaluation.started = wall
            evaluations.append(evaluation)
        return evaluations, stale

    def test(self, items: list[tuple[int, Any]], elements: Any = None) -> list[TestRecord]:
        """Test-only jobs (`fitness.test_every: archive`): the held-out score of members already
        evaluated, rebuilt from their genomes (sent whole: the parent cache may no longer hold
        what they were bred from). No train scoring: the tell already had it."""
        if elements is not None:
            self.sync_elements(elements)
        return [self.test_one(member_id, genome) for member_id, genome in items]

    def test_one(self, member_id: int, genome: Any) -> TestRecord:
        """One member's held-out score; a failure is the record's error, never the worker's."""
        start = time.perf_counter()
        try:
            with Alarm(self.timeout):
                test, by_group = self.task.held_out(self.materialise(genome))
            return TestRecord(member_id, None if test is None else float(test), finite_scores(by_group),
                              seconds=time.perf_counter() - start)
        except EvaluationTimeout as exc:
            return TestRecord(member_id, None, error=f"stopped: {exc}", seconds=time.perf_counter() - start)
        except Exception as exc:  # a fitness task may fail in any way; the search must go on
            return TestRecord(member_id, None, error=f"fitness task raised {_exception_text(exc)}",
                              seconds=time.perf_counter() - start)

    def sync_elements(self, elements: Any) -> None:
        """Hold the same added basis elements as the population, in the same order.

        The dispatcher sends `(count, [ref])`: the ref (to the genomes, a few KB each) is fetched
        only when this worker is behind, e.g. after Ray restarted it with a fresh basis.
        """
        if isinstance(elements, tuple):
            count, holder = elements
            if self.basis is not None and count == len(self.basis.extra):
                return
            import ray

            elements = ray.get(holder[0])
        if self.basis is None:
            raise ValueError("received basis elements but this search has no seeds")
        if len(elements) < len(self.basis.extra):
            self.basis.drop_extra()
        for genome in elements[len(self.basis.extra):]:
            self.basis.add_element(genome.materialise(self.basis, out=self.basis.new_buffer()))

    def materialise(self, genome: Any) -> np.ndarray:
        genome = realise(genome)  # a child not bred yet (e.g. restored from a snapshot)
        if isinstance(genome, (Recipe, ColumnGenome, LayerwiseGenome, MergedFolder)):
            if self.basis is None:
                raise ValueError("received a merge genome but this search has no seeds")
            bound = self._candidate_buffer()
            if isinstance(genome, Recipe):
                out = self.basis.materialise(genome, out=bound)
            else:
                out = genome.materialise(self.basis, out=bound)
            # A task that owns a bound buffer scores it in place; others read a float32 vector.
            return out if hasattr(self.task, "candidate_buffer") else out.numpy()
        return np.asarray(genome)

    def _candidate_buffer(self) -> torch.Tensor:
        """The task's own bound buffer (its model's weights view it), else a reused float32 vector."""
        if self._buffer is None:
            getter = getattr(self.task, "candidate_buffer", None)
            self._buffer = getter() if getter is not None else torch.empty(self.basis.size, dtype=torch.float32)
            if self._buffer.device.type != "cpu" and self.basis is not None:
                self._place_seeds(self._buffer.device)
        return self._buffer

    def _place_seeds(self, device: torch.device) -> None:
        """On a GPU: the seeds resident in device memory when they fit (else pinned host, streamed)."""
        from evomerge.devices import resolve_seeds_on

        need = self.basis.seed_bytes() * 1.05 + (256 << 20)
        free, _ = torch.cuda.mem_get_info(device)
        where = resolve_seeds_on(self._seeds_on, device, fits_on_device=need < free)
        self.basis.place(device if where == "device" else None)

    def dam_train(self, settings: dict[str, Any], num_seeds: int, fingerprint: str, meta: dict[str, Any],
                  arrays: dict[str, np.ndarray], steps: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """`steps` of DAM's Adam from the training state (meta, arrays: TrainingState.to_wire) over
        this worker's own bound model and seeds, on its device; the next state, same format.

        An actor runs one call at a time, so this never overlaps an evaluation (training swaps the
        bound model's parameters for merged ones; evaluations find them as they were)."""
        from evomerge.strategies.dam_trainer import TrainingState

        trainer = self._dam_trainer(settings, num_seeds)
        if trainer.layout.fingerprint() != fingerprint:
            raise ValueError("DAM's column layout on this worker differs from the population's; the worker's "
                             "fitness task must bind the same architecture as the seeds")
        return trainer.train(TrainingState.from_wire(meta, arrays), steps).to_wire()

    def _dam_trainer(self, settings: dict[str, Any], num_seeds: int) -> Any:
        import json

        from evomerge.strategies.dam_models import dam_model_for
        from evomerge.strategies.dam_trainer import DamTrainer, TrainOptions

        key = json.dumps([settings, num_seeds], sort_keys=True)
        if key in self._dam_trainers:
            return self._dam_trainers[key]
        if self.basis is None:
            raise ValueError("strategy.options.train_on: worker needs checkpoint seeds on the workers; this search "
                             "has none; set strategy.options.train_on: population")
        buffer = self._candidate_buffer()  # builds the bound model and places the seeds (a GPU: resident or pinned)
        seeds_device = self.basis.pieces[0].views[0].device
        if buffer.device.type != "cpu" and seeds_device != buffer.device:
            raise ValueError("strategy.options.train_on: worker trains on this worker's GPU against the seeds "
                             "there, but its seeds are in host memory (fitness.options.seeds_on is host, or auto "
                             "found they do not fit beside the buffer); set fitness.options.seeds_on: device "
                             "(with the GPU memory for it: see the memory plan) or strategy.options.train_on: "
                             "population")
        trainer = DamTrainer(dam_model_for(self.task, num_seeds), self.basis, num_seeds,
                             TrainOptions.model_validate(settings))
        self._dam_trainers[key] = trainer
        return trainer

    def evaluate_one(self, member_id: int, genome: Any, test_above: float | None = None,
                     job: tuple[Any, ...] | None = None) -> Evaluation:
        """Score one genome; the test score only when the train mean is strictly above
        `test_above` (None: always). The population's best only rises and a child must beat it
        strictly, so a threshold taken when the child was sent never skips a child that becomes
        the new best when it is told; at worst it tests one that is beaten meanwhile.

        `job` (Population.job): the datapoints to score and, for a top-up, the sum of the scores
        already observed, so that the test is decided on the full row's mean. A child scored on a
        subset alone (sum None) cannot be the best, so it is never tested."""
        start, wall = time.perf_counter(), time.time()
        try:
            with Alarm(self.timeout):
                params = self.materialise(genome)
                if job is None:
                    scores = np.asarray(self.task.evaluate(params), dtype=np.float32)
                else:
                    scores = np.asarray(self.task.evaluate(params, job[0]), dtype=np.float32)
                evaluation = Evaluation(member_id, scores)
                # The same mean the population compares with its best (it travels with the scores).
                mean, whole = evaluation.train_score, job is None or job[1] is not None
                if job is not None and whole:
                    mean = (job[1] + float(scores.sum(dtype=np.float64))) / self.task.num_datapoints
                # a subset-only child is never tested, even with test_every: all (it is never the best)
                if whole and (test_above is None or mean > test_above):  # NaN: not tested
                    test, by_group = self.task.held_out(params)
                    evaluation.test_score = None if test is None else float(test)
                    evaluation.test_scores = finite_scores(by_group)
            evaluation.seconds, evaluation.started = time.perf_counter() - start, wall
            return evaluation
        except EvaluationTimeout as exc:
            return Evaluation(member_id, None, None, f"stopped: {exc}", time.perf_counter() - start, started=wall)
        except Exception as exc:  # a fitness task may fail in any way; the search must go on
            return Evaluation(member_id, None, None, f"fitness task raised {_exception_text(exc)}",
                              time.perf_counter() - start, started=wall)


def _exception_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()
