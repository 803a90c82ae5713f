"""Which seeds a search merges, and how every process (population, workers, driver) opens them."""

from __future__ import annotations


from typing import Any

from evomerge.config import SearchConfig
from evomerge.genomes.basis import Basis, Piece
from evomerge.tasks import FitnessTask, TaskContext, build_task


def genome_kind(config: SearchConfig) -> str:
    if config.genome.kind != "auto":
        return config.genome.kind
    return "recipe" if isinstance(config.seeds, list) and config.seeds else "dense"


def build_basis(config: SearchConfig, task: FitnessTask, check_finite: bool = True) -> Basis | None:
    """None for a from-scratch search; task-made seeds in memory; checkpoints memory-mapped.

    Task seeds are always made with the search's seed: a worker's own task instance is seeded
    per worker, and seeds made from it would be different models.
    """
    if config.seeds == "task":
        if task.seed != config.seed:
            task = build_task(config.fitness.task, config.fitness.options, seed=config.seed)
        return Basis.from_arrays(task.make_seeds())
    if not config.seeds:
        return None
    basis = checkpoint_basis(config.seeds, allow_pickle=config.allow_pickle, check_finite=check_finite)
    basis.kernel = str((config.fitness.options or {}).get("kernel") or "auto")
    return basis


def checkpoint_basis(paths: list[str], allow_pickle: bool = False, check_finite: bool = True) -> Basis:
    """The seeds memory-mapped; `check_finite=False` where the driver already checked them (workers, export)."""
    from evomerge.models import open_seeds

    checkpoints, layout = open_seeds(paths, allow_pickle=allow_pickle, check_finite=check_finite)
    pieces = [Piece(spec.offset, spec.offset + spec.numel, [c.view(spec.name).reshape(-1) for c in checkpoints])
              for spec in layout.tensors]
    basis = Basis(pieces, layout.size, len(checkpoints))
    basis.layout = layout  # type: ignore[attr-defined]
    basis.checkpoints = checkpoints  # type: ignore[attr-defined]
    return basis



def seeds_layout(paths: list[str], allow_pickle: bool = False) -> Any:
    """The seeds' layout from their headers alone (nothing is read or checked: the driver did that)."""
    from evomerge.models import build_layout, open_checkpoint

    with open_checkpoint(paths[0], allow_pickle=allow_pickle) as ckpt:
        return build_layout(ckpt)


def task_context(config: SearchConfig, basis: Basis | None, role: str) -> TaskContext:
    """What a task is told in each process: the seeds it is bound to (by name) and the worker's resources."""
    seeds = tuple(config.seeds) if isinstance(config.seeds, list) else ()
    layout = getattr(basis, "layout", None)
    if layout is None and seeds:
        layout = seeds_layout(list(seeds), config.allow_pickle)
    return TaskContext(seeds=seeds, layout=layout, num_cpus=config.workers.num_cpus,
                       num_gpus=config.workers.num_gpus if role == "worker" else 0.0, role=role)


def preflight_task(config: SearchConfig) -> None:
    """The fitness task's own check against the seeds (names and shapes), in the driver, before
    any worker starts; its reason comes back as a ConfigError naming fitness.options.model."""
    from evomerge.errors import ConfigError
    from evomerge.tasks import TASKS

    if not isinstance(config.seeds, list) or not config.seeds:
        return
    cls = TASKS.get(config.fitness.task)
    try:
        cls.preflight(dict(config.fitness.options or {}), task_context(config, None, "driver"))
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise ConfigError(f"fitness: the model does not fit the seeds: {exc}") from None
