"""DAM (Differentiable Adaptive Merging) as an ask/tell strategy.

Per weight matrix and per seed, one coefficient per input column (all starting at exactly 1/K),
trained with torch autograd while the seeds stay frozen. The loss is, summed over seeds i,
T^2 * KL between the merged model and seed i at temperature T on seed i's own data, plus
lambda * the mean pairwise cosine similarity of the seeds' coefficient vectors, summed over
matrices (it pushes seeds to own different columns).

KL direction: `kl: forward` (default) is KL(seed_i || merged), i.e. `F.kl_div(log_softmax(merged/T),
softmax(seed/T))`, the distillation loss of the DAM reference code (arcee-ai/DAM); the issue's
"KL(merged || seed i)" names the same call by its argument order. `kl: reverse` is the literal
KL(merged || seed_i).

Under ask/tell the evaluation budget is spent on the training trajectory: the seeds first
(parents = ()), then the uniform merge (step 0, the plain average), then the merge after every
`eval_every` Adam steps. Once the final merge (after `steps`) is offered, `exhausted` turns True
and a standalone search ends when it is back: further asks could only repeat it (they still would,
for a host that ignores `exhausted`). Training is single-threaded, with a batch order that is a
pure function of (seed, step): a resumed search continues bit-identically.

Where it trains (`train_on`). The strategy keeps only the training state (dam_trainer.TrainingState:
coefficients, Adam's moments, step, curve, batch seed); a trainer runs each chunk of `eval_every`
steps from it. `population`: in this process (a DamTrainer over the task's model and the basis,
on the CPU). `worker`: a fitness worker trains over its own bound model, in the run dtype on its
device, with the seeds resident there (WorkerTrainer, FitnessWorker.dam_train); the population
actor then needs only the column layout, from a meta-device build, and holds no model. `auto`
picks `worker` on Ray over checkpoint seeds, `population` otherwise (digits, run_local). Both give
the same bits on the CPU.

When it trains. In sync mode inside ask(). In async mode with `train_on: population` each chunk
runs on a thread (`background`), ask() returns None until it is done, and a snapshot taken
meanwhile holds the state from before the chunk. With `train_on: worker` the chunk always runs
inside ask(): the population actor waits while one worker trains (the call queues behind that
worker's evaluations, never beside one), and the other workers finish what they hold. A thread
would have to share the worker with the dispatcher's calls and their hang watch.

What DAM needs from a fitness task is a `DamModel` (dam_models.py): the column layout, each seed's
distillation inputs and a differentiable forward. A task can provide one with
`task.dam_model(num_seeds)`; the digits MLP and the causal-LM tasks have built-in adapters.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from evomerge.genomes.columns import ColumnGenome, ColumnSpace
from evomerge.strategies import STRATEGIES
from evomerge.strategies.background import BackgroundJob
from evomerge.strategies.base import Candidate, Evaluation, Problem, Strategy
from evomerge.strategies.dam_models import (  # noqa: F401  (re-exported: tasks and tests import them here)
    CausalLMDam, DamModel, DigitsDam, dam_layout_for, dam_model_for)
from evomerge.strategies.dam_trainer import (  # noqa: F401
    DamTrainer, TrainingState, TrainOptions, WorkerTrainer, cosine_penalty, kl_loss)


def _task_of(problem: Problem) -> Any:
    """The engine's task (problem.task); a bare digits-sized Problem (the shared tests) gets a digits task."""
    task = getattr(problem, "task", None)
    if task is not None:
        return task
    from fitness.digits import MAX_TRAIN, NUM_PARAMS, DigitsTask

    if problem.dimension == NUM_PARAMS and problem.num_datapoints <= MAX_TRAIN:
        return DigitsTask({"train_size": problem.num_datapoints})
    raise ValueError("strategy dam needs the fitness task (for its data and forward pass), but the Problem "
                     "carries none; set problem.task when building the problem")


def _basis_of(problem: Problem) -> Any:
    from evomerge.genomes.basis import Basis

    space = problem.space
    if space.kind == "dense":
        return Basis.from_arrays(space.seeds)
    basis = getattr(problem, "basis", None)
    if basis is None:
        raise ValueError("strategy dam over checkpoint seeds needs their basis; set problem.basis when "
                         "building the problem")
    return basis


# ---------------------------------------------------------------------------------------------
# the strategy


class DamOptions(TrainOptions):
    steps: int = Field(100, ge=0, description="Adam steps in total")
    eval_every: int = Field(10, ge=1, description="Adam steps between candidates sent for evaluation")
    background: bool = Field(
        True, description="in an async search, train each chunk on a thread so the population actor keeps "
        "dispatching; false trains inside ask() (sync mode always does, and so does train_on: worker)")
    train_on: Literal["auto", "population", "worker"] = Field(
        "auto", description="where the chunks train: worker = on a fitness worker, over its own bound model "
        "and seeds on its device (the population actor builds no model); population = in the population "
        "actor, on its CPU; auto = worker on Ray over checkpoint seeds, population otherwise")


def _train_on(options: DamOptions, problem: Problem) -> str:
    """`auto`: a fitness worker where there are Ray workers and checkpoint seeds (an LM, whose
    model the population actor must not build), else the population (digits, in-process runs)."""
    recipes = problem.space.kind != "dense"  # the workers hold a basis (of any seeds) only then
    if options.train_on == "auto":
        files = getattr(problem.basis, "checkpoints", None)  # task-made seeds (digits) have none
        return "worker" if problem.workers and recipes and files else "population"
    if options.train_on == "worker" and not recipes:
        raise ValueError("strategy.options.train_on: worker trains over the workers' checkpoint seeds; this search "
                         "has dense genomes (no checkpoint basis on the workers); set train_on: population")
    return options.train_on


@STRATEGIES.register("dam")
class DAM(Strategy):
    Options = DamOptions
    supports_scratch = False
    supports_seeds = True

    def __init__(self, options: dict[str, Any] | DamOptions, problem: Problem, seed: int) -> None:
        super().__init__(options, problem, seed)
        k = problem.space.num_seeds
        if k < 2:
            raise ValueError(f"strategy dam merges pretrained seeds and needs at least two; got {k}")
        self.num_seeds = k
        self.dense = problem.space.kind == "dense"
        self.train_on = _train_on(self.options, problem)
        task = _task_of(problem)
        self.trainer: DamTrainer | WorkerTrainer
        if self.train_on == "worker":
            # The layout alone (a meta-device build): the model and the seeds' views are the worker's.
            self.layout = dam_layout_for(task, k)
            self.basis = getattr(problem, "basis", None)
            self.trainer = WorkerTrainer(problem.workers or [], problem.live_workers, k, self.layout, self.options)
        else:
            model = dam_model_for(task, k)
            self.basis = _basis_of(problem)
            self.trainer = DamTrainer(model, self.basis, k, self.options)
            self.layout = model.layout
        if self.layout.size != problem.dimension:
            raise ValueError(f"the DAM layout covers {self.layout.size} parameters, the problem has {problem.dimension}")
        if not self.dense:
            # Checkpoint seeds: candidates are column genomes, so the population must snapshot those.
            problem.space = ColumnSpace(self.layout, k)
        # What training changes, as numpy (the trainer rebuilds Adam from it for every chunk).
        self.state = TrainingState.start(k, self.layout.num_coeffs, int(self.rng.integers(0, 2**63 - 1)))
        self.offered_step = 0  # the step of the last merge offered; below `step`: one is due
        # Async engine: a chunk trains on a thread (see background.py), and until it is done
        # snapshots hold the state from before it, which a resume trains again bit-identically.
        self._job: BackgroundJob | None = None
        self._before_chunk: TrainingState | None = None
        self.seed_candidates: list[Candidate] = []
        self.seed_ids: list[int] = []
        self.uniform_issued = False
        self.final_candidate: Candidate | None = None  # the first offer of the trained merge
        self.final_id = -1
        self.told = 0
        self.failed = 0
        self.best_train: float | None = None

    # -- public extras -----------------------------------------------------------------------
    def training_curve(self) -> list[float]:
        """Loss per Adam step so far (before each step's update); for one trial's intermediate values."""
        return list(self.state.curve)

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def coeffs(self) -> np.ndarray:
        """The current coefficients, float32 (K, C) (a copy)."""
        return self.state.coeffs.copy()

    def intermediate_values(self, candidate: Candidate) -> dict[int, float] | None:
        """The whole curve {step: loss} for the first candidate of the final merge, None for the others.

        Lets the engine put the training curve on exactly one Optuna trial (the trained result).
        """
        final = self._final_id()
        curve = self.state.curve
        if final < 0 or candidate.member_id != final or not curve:
            return None
        return {i: v for i, v in enumerate(curve)}

    def _final_id(self) -> int:
        if self.final_id < 0 and self.final_candidate is not None:
            self.final_id = self.final_candidate.member_id
        return self.final_id

    @property
    def exhausted(self) -> bool:
        return self.final_candidate is not None

    def genome(self) -> ColumnGenome:
        return ColumnGenome(self.layout, self.state.coeffs.copy())

    # -- ask/tell ----------------------------------------------------------------------------
    def ask(self) -> Candidate | None:
        k = self.num_seeds
        if len(self.seed_candidates) < k:
            candidate = Candidate(genome=self.problem.space.seed_genome(len(self.seed_candidates)),
                                  params={}, parents=(), generation=0)
            self.seed_candidates.append(candidate)
            return candidate
        if not self.uniform_issued:
            self.uniform_issued = True
            return self._candidate({"step": 0})
        if self._job is not None:
            if not self._job.done():
                return None
            job, self._job, self._before_chunk = self._job, None, None
            job.result()  # a chunk that failed (e.g. the loss became NaN) fails here, as it would inline
        elif self.step == self.offered_step and self.step < self.options.steps:
            chunk = min(self.options.eval_every, self.options.steps - self.step)
            # On a worker the chunk runs inline (WorkerTrainer): a thread waiting on that worker
            # would race the dispatcher's calls to it and its hang watch.
            if self.problem.background and self.options.background and self.train_on == "population":
                self._before_chunk = self.state
                self._job = BackgroundJob(lambda: self._train(chunk), name="dam-training")
                return None
            self._train(chunk)
        self.offered_step = self.step
        curve = self.state.curve
        candidate = self._candidate({"step": self.step, "train_loss": curve[-1]} if curve else {"step": self.step})
        if self.final_candidate is None and self.step >= self.options.steps:
            self.final_candidate = candidate
        return candidate

    @property
    def busy(self) -> bool:
        return self._job is not None and not self._job.done()

    def wait(self, timeout: float) -> None:
        if self._job is not None:
            self._job.wait(timeout)

    def tell(self, candidate: Candidate, evaluation: Evaluation) -> None:
        self.told += 1
        if evaluation.failed:
            self.failed += 1
            return
        train = evaluation.train_score
        if train is not None and (self.best_train is None or train > self.best_train):
            self.best_train = train

    def _parents(self) -> tuple[int, ...]:
        if len(self.seed_ids) < self.num_seeds:  # member ids are assigned after ask() returns
            self.seed_ids = [c.member_id for c in self.seed_candidates]
        return tuple(i for i in self.seed_ids if i >= 0)

    def _candidate(self, params: dict[str, float | int]) -> Candidate:
        genome = self.genome()
        if self.dense:
            genome = genome.materialise(self.basis).numpy().copy()
        return Candidate(genome=genome, params=params, parents=self._parents(), generation=1)

    # -- training ----------------------------------------------------------------------------
    def _train(self, n: int) -> None:
        self.state = self.trainer.train(self.state, n)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        self._parents()
        # While a chunk trains on its thread (until ask() takes it), the state from before it.
        training_meta, arrays = (self._before_chunk or self.state).to_wire()
        meta = {"rng": self._rng_state(), **training_meta,
                "offered_step": self.offered_step,
                "seeds_issued": len(self.seed_candidates), "seed_ids": list(self.seed_ids),
                "uniform_issued": self.uniform_issued, "told": self.told, "failed": self.failed,
                "best_train": self.best_train, "final_id": self._final_id(),
                "final_issued": self.final_candidate is not None, "layout": self.layout.fingerprint()}
        return meta, dict(arrays)

    def load_state_dict(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        if meta["layout"] != self.layout.fingerprint():
            raise ValueError("snapshot's DAM layout does not match this model; it was taken for other seeds")
        state = TrainingState.from_wire(meta, arrays)
        if state.coeffs.shape != self.state.coeffs.shape:
            raise ValueError(f"snapshot coefficients have shape {state.coeffs.shape}, expected {self.state.coeffs.shape}")
        self._set_rng_state(meta["rng"])
        self.state = state
        self.offered_step = int(meta.get("offered_step", self.step))  # older snapshots: always offered
        self._job = self._before_chunk = None
        self.seed_ids = [int(i) for i in meta["seed_ids"]]
        self.seed_candidates = [Candidate(genome=None, member_id=i) for i in self.seed_ids]
        self.seed_candidates += [Candidate(genome=None) for _ in range(int(meta["seeds_issued"]) - len(self.seed_ids))]
        self.uniform_issued = bool(meta["uniform_issued"])
        self.final_id = int(meta["final_id"])
        self.final_candidate = Candidate(genome=None, member_id=self.final_id) if meta["final_issued"] else None
        self.told, self.failed = int(meta["told"]), int(meta["failed"])
        self.best_train = meta["best_train"]

    def archive_summary(self) -> dict[str, Any]:
        return {"size": self.told - self.failed, "best_train": self.best_train, "step": self.step,
                "steps": self.options.steps, "loss": self.state.curve[-1] if self.state.curve else None}
