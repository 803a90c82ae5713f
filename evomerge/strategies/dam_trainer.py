"""DAM's training, apart from the strategy: a trainer holds a DamModel and the seeds' group views
and runs `n` Adam steps from a training state, returning the next state.

Why apart: on a real checkpoint the forward needs a whole bound model, and DESIGN says the
population actor holds none. So the strategy keeps only the state (a few KB: coefficients,
Adam's moments, the step, the loss curve, the batch seed) and hands each chunk to a trainer:
`DamTrainer` in the same process (digits, run_local), or `WorkerTrainer`, which sends the state
to a fitness worker (`FitnessWorker.dam_train`) that trains over its own task and seeds, on its
own device, and sends the state back. The state travels as JSON metadata plus numpy arrays
(`TrainingState.to_wire`), never as torch objects or pickled optimizers, and Adam is rebuilt
from it at the start of every chunk: the same bits as one optimizer kept across chunks (the
snapshot resume has always relied on that).

On the CPU a chunk is bit-reproducible (one thread, deterministic algorithms); on a GPU it runs
with the device's own kernels, which need not give the same bits twice.
"""

from __future__ import annotations

import itertools
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from evomerge.determinism import deterministic_torch
from evomerge.genomes.columns import ColumnLayout, combine_trainable, group_views
from evomerge.strategies.base import StrategyOptions

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
# what a chunk of training needs


class TrainOptions(StrategyOptions):
    """The options a trainer reads (DamOptions adds the schedule); they travel to a worker as JSON."""

    lr: float = Field(0.01, gt=0.0, description="Adam learning rate on the coefficients")
    temperature: float = Field(2.0, gt=0.0, description="distillation temperature T (the KL is scaled by T^2)")
    cosine_penalty: float = Field(0.01, ge=0.0, description="lambda on the seeds' coefficient cosine similarity")
    batch_size: int | None = Field(128, ge=1, description="rows per seed per step; None = each seed's full data")
    kl: Literal["forward", "reverse"] = Field(
        "forward", description="forward: KL(seed || merged), as the DAM reference; reverse: KL(merged || seed)")

    def training_json(self) -> dict[str, Any]:
        """Only the trainer's fields: what a worker needs (and caches its trainer by)."""
        return self.model_dump(mode="json", include=set(TrainOptions.model_fields))


@dataclass
class TrainingState:
    """Everything training changes, plus the batch seed: a trainer is a pure function of it."""

    coeffs: np.ndarray  # float32 (K, C)
    exp_avg: np.ndarray  # Adam's first moment, float32 (K, C); zeros before the first step
    exp_avg_sq: np.ndarray
    adam_step: float
    step: int
    batch_seed: int
    curve: list[float] = field(default_factory=list)  # the loss before each step's update

    @classmethod
    def start(cls, num_seeds: int, num_coeffs: int, batch_seed: int) -> "TrainingState":
        """Every coefficient exactly float32(1/K): the plain average."""
        coeffs = np.full((num_seeds, num_coeffs), 1.0 / num_seeds, dtype=np.float32)
        zeros = np.zeros_like(coeffs)
        return cls(coeffs, zeros, zeros.copy(), 0.0, 0, int(batch_seed))

    def to_wire(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON metadata, arrays), the keys DAM's snapshots have always used."""
        meta = {"step": self.step, "adam_step": self.adam_step, "batch_seed": self.batch_seed}
        arrays = {"coeffs": self.coeffs.copy(), "adam/exp_avg": self.exp_avg.copy(),
                  "adam/exp_avg_sq": self.exp_avg_sq.copy(), "curve": np.asarray(self.curve, dtype=np.float64)}
        return meta, arrays

    @classmethod
    def from_wire(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> "TrainingState":
        coeffs = np.array(arrays["coeffs"], dtype=np.float32)
        zeros = np.zeros_like(coeffs)
        moments = [np.array(arrays[k], dtype=np.float32) if k in arrays else zeros.copy()
                   for k in ("adam/exp_avg", "adam/exp_avg_sq")]
        return cls(coeffs, moments[0], moments[1], float(meta["adam_step"]), int(meta["step"]),
                   int(meta["batch_seed"]), [float(v) for v in np.asarray(arrays["curve"]).tolist()])


class DamTrainer:
    """A DamModel and the seeds' views of one process (`model` from dam_models.dam_model_for).

    The seeds stay views of the basis in their own dtype and on its device (a worker's GPU when
    they are resident there): no float32 copies; combine_trainable upcasts one group at a time.
    The coefficients and Adam's moments live on the seeds' device for the chunk.
    """

    def __init__(self, model: Any, basis: Any, num_seeds: int, options: TrainOptions) -> None:
        self.model = model
        self.layout: ColumnLayout = model.layout
        self.num_seeds = num_seeds
        self.options = options
        self.seed_weights = [{g.name: v for g, v in zip(self.layout.groups, views)}
                             for views in zip(*(group_views(basis, g) for g in self.layout.groups))]
        first = next(iter(self.seed_weights[0].values()), None)
        self.device = first.device if first is not None else torch.device("cpu")

    def merged_weights(self, coeffs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Merged tensors by group name, differentiable in `coeffs` (the same `combine` as materialising)."""
        dtype = self.model.weight_dtype
        merged = {}
        for i, g in enumerate(self.layout.groups):
            tensor = combine_trainable(g, coeffs[:, self.layout.coeff_slice(i)], [w[g.name] for w in self.seed_weights])
            merged[g.name] = tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)
        return merged

    def batch_rows(self, seed: int, step: int, batch_seed: int) -> np.ndarray:
        """Rows of seed `seed`'s data at `step`: epoch permutations drawn from (batch_seed, seed, epoch)."""
        n = self.model.num_rows(seed)
        size = self.options.batch_size
        if size is None or size >= n:
            return np.arange(n)
        per_epoch = math.ceil(n / size)
        epoch, j = divmod(step, per_epoch)
        perm = np.random.default_rng([batch_seed, seed, epoch]).permutation(n)
        return perm[j * size:(j + 1) * size]

    def loss(self, coeffs: torch.Tensor, step: int, batch_seed: int) -> torch.Tensor:
        opts = self.options
        merged = self.merged_weights(coeffs)
        total = coeffs.new_zeros(())
        for k in range(self.num_seeds):
            inputs = self.model.inputs(k, self.batch_rows(k, step, batch_seed))
            with torch.no_grad():
                target = self.model.logits(self.seed_weights[k], inputs)
            total = total + kl_loss(self.model.logits(merged, inputs), target, opts.temperature, opts.kl)
        return total + cosine_penalty(coeffs, self.layout, opts.cosine_penalty)

    def train(self, state: TrainingState, n: int) -> TrainingState:
        """`n` Adam steps from `state`; a new state (the given one is not changed)."""
        if state.coeffs.shape != (self.num_seeds, self.layout.num_coeffs):
            raise ValueError(f"DAM state has coefficients of shape {state.coeffs.shape}, this trainer's layout "
                             f"needs {(self.num_seeds, self.layout.num_coeffs)}")
        device = self.device
        coeffs = torch.tensor(state.coeffs, dtype=torch.float32, device=device, requires_grad=True)
        optimizer = torch.optim.Adam([coeffs], lr=self.options.lr, foreach=False)
        if state.adam_step > 0:
            optimizer.state[coeffs] = {
                "step": torch.tensor(float(state.adam_step)),
                "exp_avg": torch.tensor(state.exp_avg, dtype=torch.float32, device=device),
                "exp_avg_sq": torch.tensor(state.exp_avg_sq, dtype=torch.float32, device=device),
            }
        curve, step = list(state.curve), state.step
        exact = deterministic_torch() if device.type == "cpu" else nullcontext()
        with exact, torch.enable_grad():
            for _ in range(n):
                optimizer.zero_grad(set_to_none=True)
                loss = self.loss(coeffs, step, state.batch_seed)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"dam: the loss became {loss.item()} at step {step}; "
                                             "lower strategy.options.lr")
                loss.backward()
                optimizer.step()
                curve.append(float(loss.item()))
                step += 1
        adam = optimizer.state.get(coeffs, {})
        if "step" not in adam:  # n == 0
            return TrainingState(state.coeffs.copy(), state.exp_avg.copy(), state.exp_avg_sq.copy(),
                                 state.adam_step, step, state.batch_seed, curve)
        return TrainingState(coeffs.detach().cpu().numpy().copy(), adam["exp_avg"].cpu().numpy().copy(),
                             adam["exp_avg_sq"].cpu().numpy().copy(), float(adam["step"].item()), step,
                             state.batch_seed, curve)


class WorkerTrainer:
    """Sends each chunk to a fitness worker (`FitnessWorker.dam_train`), which trains over its
    own task and seeds (cached there) and sends the state back.

    The call is made and waited for in the caller (the population actor, inside DAM's ask()):
    an actor runs one call at a time, so the chunk queues behind that worker's evaluations and
    never overlaps one (the bound model's parameters are swapped during training). A worker that
    dies mid-chunk (Ray restarts it) costs one retry on the next live worker; a second death fails
    the search with the reason. Always the same worker otherwise, so its trainer stays cached.
    """

    def __init__(self, workers: Sequence[Any], live: Callable[[], list[int]] | None, num_seeds: int,
                 layout: ColumnLayout, options: TrainOptions) -> None:
        if not workers:
            raise ValueError("strategy.options.train_on: worker needs the search's fitness workers, and this "
                             "run has none (an in-process run); set strategy.options.train_on: population")
        self.workers = list(workers)
        self.live = live or (lambda: list(range(len(self.workers))))
        self.num_seeds = num_seeds
        self.layout = layout
        self.settings = options.training_json()
        self.index = 0  # the worker that trains (and caches the trainer)
        self.calls = 0  # chunks sent (for tests and the status)

    def _next_live(self, after: int | None) -> int:
        live = sorted(self.live()) or list(range(len(self.workers)))
        if after is None:
            return self.index if self.index in live else live[0]
        later = [i for i in live if i > after]
        return later[0] if later else live[0]

    def train(self, state: TrainingState, n: int) -> TrainingState:
        import ray

        from evomerge.engine.dispatch import WORKER_ERRORS

        meta, arrays = state.to_wire()
        fingerprint = self.layout.fingerprint()
        index = self._next_live(None)
        for attempt in range(2):
            self.calls += 1
            ref = self.workers[index].dam_train.remote(self.settings, self.num_seeds, fingerprint, meta, arrays, n)
            try:
                out_meta, out_arrays = ray.get(ref)
            except WORKER_ERRORS as exc:
                if attempt:
                    first = (str(exc).strip().splitlines() or [""])[0]  # Ray's text goes on for a page
                    raise RuntimeError(f"DAM training died on two fitness workers (last: worker {index}, "
                                       f"{type(exc).__name__}: {first}); "
                                       "check the worker logs and memory, or set strategy.options.train_on: "
                                       "population") from exc
                index = self._next_live(index)
                continue
            except ray.exceptions.RayTaskError as exc:  # the trainer's own error (NaN loss, a refusal)
                cause = getattr(exc, "cause", None)
                raise (cause if isinstance(cause, BaseException) else exc) from None
            self.index = index
            return TrainingState.from_wire(out_meta, out_arrays)
        raise AssertionError("unreachable")
