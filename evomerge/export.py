"""`evomerge export`: turn a run's best member into the checkpoint its fitness task knows how to load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from evomerge.config import SearchConfig
from evomerge.engine.basis_spec import build_basis, task_context
from evomerge.errors import EvomergeError
from evomerge.genomes.columns import unpack_columns
from evomerge.genomes.layerwise import unpack_layerwise
from evomerge.genomes.elements import unpack_elements
from evomerge.genomes.recipe import Recipe, unpack_recipes
from evomerge.tasks import FitnessTask, build_task


def export_best(run_dir: Path, out_dir: Path) -> list[Path]:
    best_path, config_path = run_dir / "best.safetensors", run_dir / "config.json"
    for path in (best_path, config_path):
        if not path.is_file():
            raise EvomergeError(f"{path} not found: export needs a finished run folder "
                                f"(finish or resume the search first)")
    try:
        arrays = load_file(str(best_path))
    except (SafetensorError, OSError) as exc:
        raise EvomergeError(f"{best_path} is unreadable ({exc}); re-run `evomerge resume {run_dir}` to rewrite it")
    config = SearchConfig.model_validate(json.loads(config_path.read_text()))
    task = build_task(config.fitness.task, config.fitness.options, seed=config.seed,
                      context=task_context(config, None, "driver"))
    params = best_params(arrays, config, task, str(best_path))
    written = task.export(params, out_dir)
    meta = {"source_run": str(run_dir), **json.loads((run_dir / "best.json").read_text())}
    (out_dir / "evomerge.json").write_text(json.dumps(meta, indent=2))
    return [*written, out_dir / "evomerge.json"]


def best_params(arrays: dict[str, np.ndarray], config: SearchConfig, task: FitnessTask, source: str) -> np.ndarray:
    """The flat parameters of a stored best member, whichever genome kind it was saved as."""
    if "params" in arrays:
        return arrays["params"]
    if "layerwise/method" in arrays:
        kind, genome = "layerwise genome", unpack_layerwise(arrays, "layerwise")[0]
    elif "columns/coeffs" in arrays:
        kind, genome = "column genome", unpack_columns(arrays, "columns")[0]
    else:
        kind, genome = "recipe", unpack_recipes(arrays, "recipe")[0]
    basis = build_basis(config, task, check_finite=False)  # the search checked the seeds
    if basis is None or genome is None:
        raise EvomergeError(f"{source} holds a {kind} but the run has no seeds to materialise it from")
    if isinstance(genome, Recipe):
        # Merged models that joined the basis during the search (hybrid guidance), in basis order.
        for element in unpack_elements(arrays, "elements"):
            basis.add_element(element.materialise(basis))
        return basis.materialise(genome).numpy()
    return genome.materialise(basis).numpy()
