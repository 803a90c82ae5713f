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
pure function of (seed, step): a resumed search continues bit-identically. In sync mode it runs
inside ask(); in async mode each chunk runs on a thread (`background`), ask() returns None until it
is done, and a snapshot taken meanwhile holds the state from before the chunk.

What DAM needs from a fitness task is a `DamModel`: the column layout, each seed's distillation
inputs and a differentiable forward. A task can provide one with `task.dam_model(num_seeds)`;
the digits MLP and the causal-LM tasks have built-in adapters below.
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from evomerge.determinism import deterministic_torch
from evomerge.genomes.columns import ColumnGenome, ColumnLayout, ColumnSpace, combine_trainable, group_views
from evomerge.strategies import STRATEGIES
from evomerge.strategies.background import BackgroundJob
from evomerge.strategies.base import Candidate, Evaluation, Problem, Strategy, StrategyOptions


# ---------------------------------------------------------------------------------------------
# losses (module level, so they can be checked by hand)


def kl_loss(merged_logits: torch.Tensor, seed_logits: torch.Tensor, temperature: float,
            direction: str = "forward") -> torch.Tensor:
    """T^2 * mean over rows of KL at temperature T; forward = KL(seed || merged), reverse = KL(merged || seed)."""
    log_m = F.log_softmax(merged_logits / temperature, dim=-1)
    log_s = F.log_softmax(seed_logits / temperature, dim=-1)
    if direction == "forward":
        kl = (log_s.exp() * (log_s - log_m)).sum(-1)
    elif direction == "reverse":
        kl = (log_m.exp() * (log_m - log_s)).sum(-1)
    else:
        raise ValueError(f"kl direction must be 'forward' or 'reverse', got {direction!r}")
    return kl.mean() * temperature ** 2


def cosine_penalty(coeffs: torch.Tensor, layout: ColumnLayout, weight: float) -> torch.Tensor:
    """weight * sum over column groups of the mean pairwise cosine similarity between seeds' vectors.

    Per-seed scalars (biases, norms) are left out: the cosine of two 1-vectors is only a sign.
    """
    total = coeffs.new_zeros(())
    k = coeffs.shape[0]
    if weight == 0.0 or k < 2:
        return total
    for index in layout.column_groups():
        block = coeffs[:, layout.coeff_slice(index)]
        sims = [F.cosine_similarity(block[a], block[b], dim=0) for a, b in itertools.combinations(range(k), 2)]
        total = total + torch.stack(sims).mean()
    return total * weight


# ---------------------------------------------------------------------------------------------
# what DAM needs from a task


class DamModel(ABC):
    """The column layout, each seed's distillation data, and a differentiable forward of one model."""

    layout: ColumnLayout
    # The dtype the forward runs in: merged weights are cast to it per group (float32 sums are
    # transient). None keeps combine's float32 (digits' float32 MLP).
    weight_dtype: torch.dtype | None = None

    @abstractmethod
    def num_rows(self, seed: int) -> int:
        """How many distillation examples seed `seed` has."""

    @abstractmethod
    def inputs(self, seed: int, rows: np.ndarray) -> Any:
        """Model inputs for those rows of seed `seed`'s data."""

    @abstractmethod
    def logits(self, weights: dict[str, torch.Tensor], inputs: Any) -> torch.Tensor:
        """(N, classes) logits of the model with these weights (by group name); rows are averaged over."""


class DigitsDam(DamModel):
    """The digits MLP: [W1 (64x256, in x out), b1, W2 (256x10), b2]; kernels' input columns are rows.

    Seed i's data are the training rows whose labels fall in its share of the classes: with two
    seeds, digits 0-4 and 5-9, the specialists `DigitsTask.make_seeds` trains.
    """

    def __init__(self, task: Any, num_seeds: int) -> None:
        from fitness.digits import CLASSES, HIDDEN, IN_DIM

        self.layout = ColumnLayout.from_tensors(
            [("W1", (IN_DIM, HIDDEN)), ("b1", (HIDDEN,)), ("W2", (HIDDEN, CLASSES)), ("b2", (CLASSES,))],
            lambda name, shape: 0 if len(shape) == 2 else None)
        x, y = (np.asarray(a) for a in task.train_rows())
        self._x = []
        for labels in np.array_split(np.arange(CLASSES), num_seeds):
            mask = np.isin(y, labels)
            if not mask.any():
                raise ValueError(f"digits: no training rows with labels {labels.tolist()}; raise train_size")
            self._x.append(torch.from_numpy(np.ascontiguousarray(x[mask], dtype=np.float32)))

    def num_rows(self, seed: int) -> int:
        return int(self._x[seed].shape[0])

    def inputs(self, seed: int, rows: np.ndarray) -> torch.Tensor:
        return self._x[seed][torch.from_numpy(rows)]

    def logits(self, weights: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        w = {n: t if t.dtype == torch.float32 else t.to(torch.float32) for n, t in weights.items()}
        return torch.relu(inputs @ w["W1"] + w["b1"]) @ w["W2"] + w["b2"]


class CausalLMDam(DamModel):
    """Best effort for the causal-LM tasks: `torch.func.functional_call` over the task's model.

    Column axes: `nn.Linear` and `nn.Embedding` weights are (out, in) / (vocab, dim), so the last
    axis; GPT-2 style `Conv1D` is (in, out), so axis 0; everything else gets one scalar per seed.
    Seed i's data: the task's `dam_data` option (one JSONL per seed) if it has one, otherwise its
    `data` files when there is exactly one per seed. The KL runs over every non-padding position of
    prompt + answer.
    """

    def __init__(self, task: Any, num_seeds: int) -> None:
        from fitness.lm_data import read_examples

        self.model, self.tokenizer = task.model, task.tokenizer
        self.weight_dtype = next(self.model.parameters()).dtype  # the run dtype: the seeds' own by default
        modules = dict(self.model.named_modules())
        specs = list(task.layout.tensors)
        self.layout = ColumnLayout.from_tensors([(s.name, tuple(s.shape)) for s in specs],
                                                lambda name, shape: _lm_column_axis(modules, name, shape))
        files = list(getattr(task.options, "dam_data", None) or [])
        if not files:
            files = list(task.options.data)
            if len(files) != num_seeds:
                raise ValueError(f"dam needs distillation data per seed: give the fitness task a `dam_data` list "
                                 f"of {num_seeds} JSONL files (seed order), or exactly one `data` file per seed "
                                 f"(it has {len(files)})")
        if len(files) != num_seeds:
            raise ValueError(f"fitness.options.dam_data lists {len(files)} files for {num_seeds} seeds; give one per seed")
        limit = getattr(task.options, "limit", None)
        self._rows = [[self.tokenizer(p + a)["input_ids"] for p, a in read_examples(f, limit)] for f in files]
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def num_rows(self, seed: int) -> int:
        return len(self._rows[seed])

    def inputs(self, seed: int, rows: np.ndarray) -> dict[str, torch.Tensor]:
        chunk = [self._rows[seed][int(r)] for r in rows]
        width = max(len(ids) for ids in chunk)
        ids = torch.full((len(chunk), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, row in enumerate(chunk):  # left padding, as the tasks score
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}

    def logits(self, weights: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self.weight_dtype
        weights = {n: (w if w.dtype == dtype else w.to(dtype)) for n, w in weights.items()}  # seeds not in the run dtype
        out = torch.func.functional_call(self.model, weights, args=(), kwargs=inputs, tie_weights=True, strict=False)
        logits = out.logits.float()
        return logits[inputs["attention_mask"].bool()]


def _lm_column_axis(modules: dict[str, Any], name: str, shape: tuple[int, ...]) -> int | None:
    owner, _, leaf = name.rpartition(".")
    module = modules.get(owner)
    if leaf != "weight" or len(shape) != 2 or module is None:
        return None
    if type(module).__name__ == "Conv1D":
        return 0
    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        return 1
    return None


def dam_model_for(task: Any, num_seeds: int) -> DamModel:
    """The task's own `dam_model(num_seeds)` if it has one, else a built-in adapter."""
    if hasattr(task, "dam_model"):
        return task.dam_model(num_seeds)
    from fitness.digits import DigitsTask

    if isinstance(task, DigitsTask):
        return DigitsDam(task, num_seeds)
    if all(hasattr(task, a) for a in ("model", "tokenizer", "layout")):
        return CausalLMDam(task, num_seeds)
    raise ValueError(f"strategy dam cannot train on fitness task {type(task).__name__}: it needs a "
                     "differentiable forward and per-seed data; give the task a `dam_model(num_seeds)` "
                     "method returning an evomerge.strategies.dam.DamModel")


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


class DamOptions(StrategyOptions):
    steps: int = Field(100, ge=0, description="Adam steps in total")
    lr: float = Field(0.01, gt=0.0, description="Adam learning rate on the coefficients")
    temperature: float = Field(2.0, gt=0.0, description="distillation temperature T (the KL is scaled by T^2)")
    cosine_penalty: float = Field(0.01, ge=0.0, description="lambda on the seeds' coefficient cosine similarity")
    batch_size: int | None = Field(128, ge=1, description="rows per seed per step; None = each seed's full data")
    eval_every: int = Field(10, ge=1, description="Adam steps between candidates sent for evaluation")
    background: bool = Field(
        True, description="in an async search, train each chunk on a thread so the population actor keeps "
        "dispatching; false trains inside ask() (sync mode always does)")
    kl: Literal["forward", "reverse"] = Field(
        "forward", description="forward: KL(seed || merged), as the DAM reference; reverse: KL(merged || seed)")


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
        self.model = dam_model_for(_task_of(problem), k)
        self.layout = self.model.layout
        if self.layout.size != problem.dimension:
            raise ValueError(f"the DAM layout covers {self.layout.size} parameters, the problem has {problem.dimension}")
        self.basis = _basis_of(problem)
        self.dense = problem.space.kind == "dense"
        if not self.dense:
            # Checkpoint seeds: candidates are column genomes, so the population must snapshot those.
            problem.space = ColumnSpace(self.layout, k)
        self.seed_weights = [{g.name: v for g, v in zip(self.layout.groups, views)}
                             for views in zip(*(group_views(self.basis, g) for g in self.layout.groups))]
        # The seeds stay views of the basis in their own dtype (no float32 copies): the distillation
        # targets run in the model's dtype, and combine_trainable upcasts one group at a time.
        self.coeffs = torch.full((k, self.layout.num_coeffs), 1.0 / k, dtype=torch.float32, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.coeffs], lr=self.options.lr, foreach=False)
        self.batch_seed = int(self.rng.integers(0, 2**63 - 1))
        self.step = 0
        self.offered_step = 0  # the step of the last merge offered; below `step`: one is due
        self.curve: list[float] = []
        # Async engine: a chunk trains on a thread (see background.py), and until it is done
        # snapshots hold the state from before it, which a resume trains again bit-identically.
        self._job: BackgroundJob | None = None
        self._before_chunk: tuple[dict[str, Any], dict[str, np.ndarray]] | None = None
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
        return list(self.curve)

    def intermediate_values(self, candidate: Candidate) -> dict[int, float] | None:
        """The whole curve {step: loss} for the first candidate of the final merge, None for the others.

        Lets the engine put the training curve on exactly one Optuna trial (the trained result).
        """
        final = self._final_id()
        if final < 0 or candidate.member_id != final or not self.curve:
            return None
        return {i: v for i, v in enumerate(self.curve)}

    def _final_id(self) -> int:
        if self.final_id < 0 and self.final_candidate is not None:
            self.final_id = self.final_candidate.member_id
        return self.final_id

    @property
    def exhausted(self) -> bool:
        return self.final_candidate is not None

    def genome(self) -> ColumnGenome:
        return ColumnGenome(self.layout, self.coeffs.detach().numpy().copy())

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
            if self.problem.background and self.options.background:
                self._before_chunk = self._training_state()
                self._job = BackgroundJob(lambda: self._train(chunk), name="dam-training")
                return None
            self._train(chunk)
        self.offered_step = self.step
        candidate = self._candidate({"step": self.step, "train_loss": self.curve[-1]} if self.curve
                                    else {"step": self.step})
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
    def merged_weights(self, coeffs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Merged tensors by group name, differentiable in `coeffs` (the same `combine` as materialising)."""
        dtype = self.model.weight_dtype
        merged = {}
        for i, g in enumerate(self.layout.groups):
            tensor = combine_trainable(g, coeffs[:, self.layout.coeff_slice(i)], [w[g.name] for w in self.seed_weights])
            merged[g.name] = tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)
        return merged

    def batch_rows(self, seed: int, step: int) -> np.ndarray:
        """Rows of seed `seed`'s data at `step`: epoch permutations drawn from (batch_seed, seed, epoch)."""
        n = self.model.num_rows(seed)
        size = self.options.batch_size
        if size is None or size >= n:
            return np.arange(n)
        per_epoch = math.ceil(n / size)
        epoch, j = divmod(step, per_epoch)
        perm = np.random.default_rng([self.batch_seed, seed, epoch]).permutation(n)
        return perm[j * size:(j + 1) * size]

    def loss(self, coeffs: torch.Tensor, step: int) -> torch.Tensor:
        opts = self.options
        merged = self.merged_weights(coeffs)
        total = coeffs.new_zeros(())
        for k in range(self.num_seeds):
            inputs = self.model.inputs(k, self.batch_rows(k, step))
            with torch.no_grad():
                target = self.model.logits(self.seed_weights[k], inputs)
            total = total + kl_loss(self.model.logits(merged, inputs), target, opts.temperature, opts.kl)
        return total + cosine_penalty(coeffs, self.layout, opts.cosine_penalty)

    def _train(self, n: int) -> None:
        with deterministic_torch():
            with torch.enable_grad():
                for _ in range(n):
                    self.optimizer.zero_grad(set_to_none=True)
                    loss = self.loss(self.coeffs, self.step)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"dam: the loss became {loss.item()} at step {self.step}; "
                                                 "lower strategy.options.lr")
                    loss.backward()
                    self.optimizer.step()
                    self.curve.append(float(loss.item()))
                    self.step += 1

    # -- state -------------------------------------------------------------------------------
    def _training_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """What training changes: coefficients, Adam's moments, the step and the loss curve (copies)."""
        state = self.optimizer.state.get(self.coeffs, {})
        zeros = np.zeros(tuple(self.coeffs.shape), dtype=np.float32)
        meta = {"step": self.step, "adam_step": float(state["step"].item()) if "step" in state else 0.0}
        arrays = {
            "coeffs": self.coeffs.detach().numpy().copy(),
            "adam/exp_avg": state["exp_avg"].numpy().copy() if "exp_avg" in state else zeros,
            "adam/exp_avg_sq": state["exp_avg_sq"].numpy().copy() if "exp_avg_sq" in state else zeros,
            "curve": np.asarray(self.curve, dtype=np.float64),
        }
        return meta, arrays

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        self._parents()
        # While a chunk trains on its thread (until ask() takes it), the state from before it.
        training_meta, arrays = self._before_chunk or self._training_state()
        meta = {"rng": self._rng_state(), "batch_seed": self.batch_seed, **training_meta,
                "offered_step": self.offered_step,
                "seeds_issued": len(self.seed_candidates), "seed_ids": list(self.seed_ids),
                "uniform_issued": self.uniform_issued, "told": self.told, "failed": self.failed,
                "best_train": self.best_train, "final_id": self._final_id(),
                "final_issued": self.final_candidate is not None, "layout": self.layout.fingerprint()}
        return meta, dict(arrays)

    def load_state_dict(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        if meta["layout"] != self.layout.fingerprint():
            raise ValueError("snapshot's DAM layout does not match this model; it was taken for other seeds")
        coeffs = np.asarray(arrays["coeffs"], dtype=np.float32)
        if coeffs.shape != tuple(self.coeffs.shape):
            raise ValueError(f"snapshot coefficients have shape {coeffs.shape}, expected {tuple(self.coeffs.shape)}")
        with torch.no_grad():
            self.coeffs.copy_(torch.from_numpy(coeffs))
        self.optimizer = torch.optim.Adam([self.coeffs], lr=self.options.lr, foreach=False)
        if meta["adam_step"] > 0:
            self.optimizer.state[self.coeffs] = {
                "step": torch.tensor(float(meta["adam_step"])),
                "exp_avg": torch.from_numpy(np.array(arrays["adam/exp_avg"], dtype=np.float32)),
                "exp_avg_sq": torch.from_numpy(np.array(arrays["adam/exp_avg_sq"], dtype=np.float32)),
            }
        self._set_rng_state(meta["rng"])
        self.batch_seed = int(meta["batch_seed"])
        self.step = int(meta["step"])
        self.offered_step = int(meta.get("offered_step", self.step))  # older snapshots: always offered
        self._job = self._before_chunk = None
        self.curve = [float(v) for v in np.asarray(arrays["curve"]).tolist()]
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
                "steps": self.options.steps, "loss": self.curve[-1] if self.curve else None}
