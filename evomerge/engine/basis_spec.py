"""Which seeds a search merges, and how every process (population, workers, driver) opens them."""

from __future__ import annotations


from evomerge.config import SearchConfig
from evomerge.genomes.basis import Basis, Piece
from evomerge.tasks import FitnessTask, build_task


def genome_kind(config: SearchConfig) -> str:
    if config.genome.kind != "auto":
        return config.genome.kind
    return "recipe" if isinstance(config.seeds, list) and config.seeds else "dense"


def build_basis(config: SearchConfig, task: FitnessTask) -> Basis | None:
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
    return checkpoint_basis(config.seeds, allow_pickle=config.allow_pickle)


def checkpoint_basis(paths: list[str], allow_pickle: bool = False, check_finite: bool = True) -> Basis:
    """The seeds memory-mapped, as one basis; `check_finite=False` skips the NaN/inf scan (a full read
    of every seed), for callers whose seeds a search already checked (export)."""
    from evomerge.models import open_seeds

    checkpoints, layout = open_seeds(paths, allow_pickle=allow_pickle, check_finite=check_finite)
    pieces = [Piece(spec.offset, spec.offset + spec.numel, [c.view(spec.name).reshape(-1) for c in checkpoints])
              for spec in layout.tensors]
    basis = Basis(pieces, layout.size, len(checkpoints))
    basis.layout = layout  # type: ignore[attr-defined]
    basis.checkpoints = checkpoints  # type: ignore[attr-defined]
    return basis

