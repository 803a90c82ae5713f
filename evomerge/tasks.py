"""The fitness-task contract and its registry.

A task scores one candidate per datapoint, because M2N2's competition and attraction work on
the per-datapoint score matrix, not on a single number.

A task may also split its datapoints into groups (one per skill: `groups`), contiguous runs of
the score vector. The search still selects on all datapoints; the Optuna study then has one
objective per group (that group's mean train score) and each member's held-out score per group.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from evomerge.registry import Registry


def _load_builtin_tasks() -> None:
    import fitness  # noqa: F401  (importing the package registers its tasks)


TASKS: Registry[type["FitnessTask"]] = Registry("fitness task", autoload=_load_builtin_tasks)


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class TaskContext:
    """What the engine knows that a task's options do not: the seeds, and where the task runs.

    A checkpoint task takes its architecture, tensor names and dtype from the seeds (their layout),
    so it needs no weights of its own; a worker also says which GPU Ray gave it and how many cores.
    """

    seeds: tuple[str, ...] = ()
    layout: Any = None  # evomerge.models.Layout of the seeds (names, shapes, dtypes, offsets)
    num_cpus: float | None = None
    num_gpus: float = 0.0
    role: str = "worker"  # "worker" scores candidates; "population" and "driver" only read sizes


class FitnessTask(ABC):
    """Subclass, set `Options` to a pydantic model, and register with `@TASKS.register(name)`."""

    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: dict[str, Any] | BaseModel | None = None, seed: int = 0) -> None:
        if isinstance(options, BaseModel):
            self.options = options
        else:
            self.options = self.Options.model_validate(options or {})
        self.seed = seed
        self.context = TaskContext(role="driver")

    def attach(self, context: TaskContext) -> None:
        """Called by the engine before any evaluation; a task that needs none of it ignores it."""
        self.context = context

    @classmethod
    def preflight(cls, options: dict[str, Any], context: TaskContext) -> None:
        """The driver's check before any worker starts (ValueError with the reason): a task that
        binds the seeds into a model checks names and shapes here, so a wrong architecture stops
        the search at once instead of failing every evaluation. Must hold nothing model-sized."""

    @property
    @abstractmethod
    def dimension(self) -> int:
        """Length of the flat parameter vector this task reads."""

    @property
    @abstractmethod
    def num_datapoints(self) -> int:
        """Length of the vector `evaluate` returns."""

    # Whether `evaluate` can score only some datapoints. On an LLM a datapoint is a prompt and
    # costs about the same as any other, so scoring M of N costs M/N of a full evaluation; M2N2
    # can judge a child on that part (`fitness.subsample`). A task that leaves this False is
    # refused for subsampled searches before any worker starts.
    supports_subsample: ClassVar[bool] = False

    @abstractmethod
    def evaluate(self, params: np.ndarray, indices: np.ndarray | None = None) -> np.ndarray:
        """Per-training-datapoint scores in [0, 1]; used for selection.

        `indices` (sorted, distinct datapoint indices): return the scores of those datapoints
        only, in that order, doing only their work. None: every datapoint."""

    @property
    def groups(self) -> list[tuple[str, int]] | None:
        """The skills the datapoints fall into: (name, number of datapoints) per group, in
        datapoint order, each group a contiguous run of `evaluate`'s vector, together covering
        all of it. None (the default): one objective, the mean over all datapoints."""
        return None

    def test_score(self, params: np.ndarray) -> float | None:
        """Held-out score, reported only and never used for selection."""
        return None

    def test_scores(self, params: np.ndarray) -> dict[str, float] | None:
        """Held-out score per group, by the names `groups` gives (a group may be missing, e.g.
        one without test data); reported only. None (the default): no per-group test scores."""
        return None

    def held_out(self, params: np.ndarray) -> tuple[float | None, dict[str, float] | None]:
        """What the engine calls for a member's held-out test: (`test_score`, `test_scores`),
        the second only for a task with `groups`. A task whose two numbers come from one pass
        over its test data overrides this to make that pass once."""
        test = self.test_score(params)
        return test, (self.test_scores(params) if self.groups else None)

    def export(self, params: np.ndarray, out_dir: Path) -> list[Path]:
        """Write a member in the task's native, loadable form; the default is the flat vector."""
        from safetensors.numpy import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "params.safetensors"
        save_file({"params": np.ascontiguousarray(params, dtype=np.float32)}, str(path))
        return [path]

    def make_seeds(self) -> list[np.ndarray]:
        """Seeds for `seeds: task` configs; tasks without their own seeds refuse."""
        raise NotImplementedError(f"fitness task {type(self).__name__} does not make its own seeds")


def check_indices(task: FitnessTask, indices: np.ndarray | None) -> np.ndarray | None:
    """The indices as a sorted int64 array within the task's datapoints (None stays None); a
    task that cannot subsample is told so here rather than returning the wrong length."""
    if indices is None:
        return None
    if not task.supports_subsample:
        raise ValueError(f"fitness task {type(task).__name__} cannot score a subset of its datapoints; "
                         "remove fitness.subsample or use a task that supports it")
    idx = np.asarray(indices, dtype=np.int64)
    if idx.ndim != 1 or (idx.size and (idx[0] < 0 or idx[-1] >= task.num_datapoints)) \
            or (idx.size > 1 and not (np.diff(idx) > 0).all()):
        raise ValueError(f"datapoint indices must be sorted, distinct and in [0, {task.num_datapoints})")
    return idx


def check_groups(groups: Any, num_datapoints: int) -> list[tuple[str, int]] | None:
    """A task's `groups` as a list of (name, size), or None; ValueError when they do not split
    the `num_datapoints` scores into named, non-empty, contiguous runs."""
    if groups is None:
        return None
    checked: list[tuple[str, int]] = []
    for item in groups:
        try:
            name, size = item
        except (TypeError, ValueError):
            raise ValueError(f"fitness task groups must be (name, number of datapoints) pairs, got {item!r}") from None
        if not isinstance(name, str) or not name:
            raise ValueError(f"fitness task group names must be non-empty strings, got {name!r}")
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"fitness task group {name!r} must hold at least one datapoint, got {size!r}")
        checked.append((name, int(size)))
    if not checked:
        raise ValueError("fitness task groups are empty; give None for a task without groups")
    names = [name for name, _ in checked]
    if len(set(names)) != len(names):
        raise ValueError(f"fitness task group names must be unique, got {names}")
    total = sum(size for _, size in checked)
    if total != num_datapoints:
        raise ValueError(f"fitness task groups hold {total} datapoints but the task scores {num_datapoints}")
    return checked


def build_task(name: str, options: dict[str, Any], seed: int = 0,
               context: TaskContext | None = None) -> FitnessTask:
    task = TASKS.get(name)(options, seed=seed)
    if context is not None:
        task.attach(context)
    return task
