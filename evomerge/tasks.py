"""The fitness-task contract and its registry.

A task scores one candidate per datapoint, because M2N2's competition and attraction work on
the per-datapoint score matrix, not on a single number.
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

    def test_score(self, params: np.ndarray) -> float | None:
        """Held-out score, reported only and never used for selection."""
        return None

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


def build_task(name: str, options: dict[str, Any], seed: int = 0,
               context: TaskContext | None = None) -> FitnessTask:
    task = TASKS.get(name)(options, seed=seed)
    if context is not None:
        task.attach(context)
    return task
