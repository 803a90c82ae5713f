"""`evomerge export`: turn a run's best member into a loadable model.

Merges of checkpoint seeds (recipes, column and layer-wise genomes) are exported "as the seeds
are", without building the fitness task: the seeds are memory-mapped and every tensor is written
by name from the seeds' own layout, so a base sharded unlike its seeds cannot scramble anything.
A recipe (M2N2, linear layer-wise) is merged one tensor at a time as the writer reaches it
(`DeferredTensor`), so this process holds one tensor, not a model; column and non-linear
layer-wise genomes materialise once into one flat buffer in the seeds' dtype. Tensors keep their
own dtype (a bf16 model's float32 `inv_freq` stays float32), non-floating tensors are copied from
the first seed, and config, tokenizer, chat template and generation config come from the first
seed too.

Dense members (from-scratch tasks) and merges of task-made seeds go through `task.export`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load_file

from evomerge.config import SearchConfig
from evomerge.engine.basis_spec import build_basis, checkpoint_basis, task_context
from evomerge.errors import EvomergeError
from evomerge.genomes.basis import Basis
from evomerge.genomes.columns import unpack_columns
from evomerge.genomes.elements import unpack_elements
from evomerge.genomes.layerwise import LayerwiseGenome, unpack_layerwise
from evomerge.genomes.recipe import Recipe, unpack_recipes
from evomerge.models.save import FILE_MODE, MAX_SHARD_BYTES, SAVE_DTYPES
from evomerge.tasks import FitnessTask, build_task

EXPORT_DTYPES = ("auto", "float32", "bfloat16", "float16")


def export_best(run_dir: Path, out_dir: Path, *, dtype: str = "auto", progress: bool = False,
                max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """Write the run's best member to out_dir; returns the files written.

    `dtype`: "auto" writes every tensor as the seeds have it; float32/bfloat16/float16 write every
    floating tensor in that dtype (the merge is then computed straight into it). Weight files are
    sharded at `max_shard_bytes` (5 GB), with an index when there are several.
    """
    if dtype not in EXPORT_DTYPES:
        raise EvomergeError(f"export dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    best_path, config_path = run_dir / "best.safetensors", run_dir / "config.json"
    for path in (best_path, config_path):
        if not path.is_file():
            raise EvomergeError(f"{path} not found: export needs a finished run folder "
                                f"(finish or resume the search first)")
    try:
        arrays = load_file(str(best_path))
    except (SafetensorError, OSError) as exc:
        raise EvomergeError(f"{best_path} is unreadable ({exc}); re-run `evomerge resume {run_dir}` to rewrite it")
    config = _read_config(config_path)
    if "params" not in arrays and isinstance(config.seeds, list) and config.seeds:
        written = export_merge(arrays, config, out_dir, dtype=dtype, source=str(best_path), progress=progress,
                               max_shard_bytes=max_shard_bytes)
    else:
        if dtype not in ("auto", "float32"):
            raise EvomergeError(f"--dtype {dtype} applies to merges of checkpoint seeds; this run's best member "
                                f"is exported by its fitness task ({config.fitness.task}) in float32")
        task = build_task(config.fitness.task, config.fitness.options, seed=config.seed,
                          context=task_context(config, None, "driver"))
        params = best_params(arrays, config, task, str(best_path))
        written = task.export(params, out_dir)
    meta: dict[str, Any] = {"source_run": str(run_dir)}
    best_json = run_dir / "best.json"
    if best_json.is_file():
        meta.update(json.loads(best_json.read_text()))
    meta_path = out_dir / "evomerge.json"
    meta_path.write_text(json.dumps(meta, indent=2))
    os.chmod(meta_path, FILE_MODE)
    return [*written, meta_path]


def _read_config(path: Path) -> SearchConfig:
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise EvomergeError(f"{path}: not valid JSON ({exc})") from exc
    seeds = raw.get("seeds") if isinstance(raw, dict) else None
    if isinstance(seeds, list):  # say which seed is gone before the config validator does, less clearly
        for seed in seeds:
            if isinstance(seed, str) and not Path(seed).exists():
                raise EvomergeError(f"seed checkpoint {seed!r} (listed in {path}) does not exist; export "
                                    f"materialises the merge from the seeds, so restore it there (paths "
                                    f"relative to the folder the search ran in are read from the current folder)")
    try:
        return SearchConfig.model_validate(raw)
    except ValidationError as exc:
        raise EvomergeError(f"{path}: not a valid search config ({exc})") from exc


def _genome(arrays: dict[str, np.ndarray]) -> tuple[str, Any]:
    if "layerwise/method" in arrays:
        return "layerwise genome", unpack_layerwise(arrays, "layerwise")[0]
    if "columns/coeffs" in arrays:
        return "column genome", unpack_columns(arrays, "columns")[0]
    return "recipe", unpack_recipes(arrays, "recipe")[0]


def best_params(arrays: dict[str, np.ndarray], config: SearchConfig, task: FitnessTask, source: str) -> np.ndarray:
    """The flat float32 parameters of a stored best member, whichever genome kind it was saved as."""
    if "params" in arrays:
        return arrays["params"]
    kind, genome = _genome(arrays)
    basis = build_basis(config, task)
    if basis is None or genome is None:
        raise EvomergeError(f"{source} holds a {kind} but the run has no seeds to materialise it from")
    if isinstance(genome, Recipe):
        # Merged models that joined the basis during the search (hybrid guidance), in basis order.
        for element in unpack_elements(arrays, "elements"):
            basis.add_element(element.materialise(basis))
        return basis.materialise(genome).numpy()
    return genome.materialise(basis).numpy()


def _seed_folder(seed: str) -> Path:
    """Where a seed's config and tokenizer live: the folder itself, or a bare file's folder."""
    path = Path(seed).expanduser()
    return path if path.is_dir() else path.parent


def export_merge(arrays: dict[str, np.ndarray], config: SearchConfig, out_dir: Path, *, dtype: str = "auto",
                 source: str = "best.safetensors", progress: bool = False,
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """A merge of checkpoint seeds as an HF folder, in the seeds' own layout and dtypes; no task is built."""
    from tqdm.auto import tqdm

    from evomerge.models import save_model_folder

    assert isinstance(config.seeds, list) and config.seeds
    kind, genome = _genome(arrays)
    if genome is None:
        raise EvomergeError(f"{source} holds no {kind} to export")
    # The search checked every seed for NaN/inf before it started; a second full read costs minutes
    # on a large model and cannot change the answer for seeds that were not rewritten since.
    basis = checkpoint_basis(config.seeds, allow_pickle=config.allow_pickle, check_finite=False)
    checkpoints = basis.checkpoints  # type: ignore[attr-defined]
    layout = basis.layout  # type: ignore[attr-defined]
    try:
        target = basis.dtype if dtype == "auto" else SAVE_DTYPES[dtype]
        nbytes = basis.size * torch.empty((), dtype=target).element_size()
        if isinstance(genome, LayerwiseGenome) and genome.is_linear:
            genome = genome.to_recipe()
        streamed = isinstance(genome, Recipe)
        bar = tqdm(total=nbytes if streamed else 2 * nbytes, unit="B", unit_scale=True, unit_divisor=1024,
                   desc="export" if streamed else "export: merging", disable=not progress, leave=False)
        try:
            if streamed:  # each tensor merged as it is written: nothing model-sized in this process
                tensors = _streamed_tensors(arrays, genome, basis, layout, checkpoints[0], target,
                                            exact_dtypes=dtype == "auto")
            else:
                buffer = basis.new_buffer() if target == basis.dtype else torch.empty(basis.size, dtype=target)
                tensors = _materialised_tensors(arrays, genome, basis, layout, checkpoints[0], buffer,
                                                exact_dtypes=dtype == "auto", step=bar.update)
                bar.set_description("export: writing")
            out = save_model_folder(tensors, out_dir, source=_seed_folder(config.seeds[0]),
                                    dtype=None if dtype == "auto" else dtype,
                                    include_code=bool(config.fitness.options.get("trust_remote_code")),
                                    max_shard_bytes=max_shard_bytes, progress=bar.update)
        finally:
            bar.close()
    finally:
        for c in checkpoints:
            c.close()
    return sorted(p for p in Path(out).iterdir() if p.is_file() and p.name != "evomerge.json")


def _streamed_tensors(arrays: dict[str, np.ndarray], genome: Recipe, basis: Basis, layout: Any, first: Any,
                      target: torch.dtype, *, exact_dtypes: bool) -> dict[str, Any]:
    """Every tensor of the first seed, in its order; floating ones deferred: merged by
    `materialise_span` (the same bits as one whole pass) when the writer reaches them. With
    `exact_dtypes` each keeps its own dtype (a float32 `inv_freq` in a bf16 model), else `target`."""
    from evomerge.models.deferred import DeferredTensor
    from evomerge.models.safetensors_format import DTYPES

    # Merged models that joined the basis during the search (hybrid guidance), in basis order;
    # each is one more model-sized vector in the seeds' dtype.
    for element in unpack_elements(arrays, "elements"):
        basis.add_element(element.materialise(basis, out=basis.new_buffer()))

    def deferred(spec: Any) -> DeferredTensor:
        dtype = DTYPES[spec.dtype] if exact_dtypes else target

        def make() -> torch.Tensor:
            with torch.no_grad():
                out = torch.empty(spec.numel, dtype=dtype)
                return basis.materialise_span(genome, spec.offset, spec.end, out).view(spec.shape)

        return DeferredTensor(tuple(spec.shape), dtype, make)

    specs = {spec.name: spec for spec in layout.tensors}
    return {name: deferred(specs[name]) if name in specs else first.view(name) for name in first.names()}


def _materialised_tensors(arrays: dict[str, np.ndarray], genome: Any, basis: Basis, layout: Any, first: Any,
                          buffer: torch.Tensor, *, exact_dtypes: bool,
                          step: Callable[[int], Any]) -> dict[str, torch.Tensor]:
    """Every tensor of the first seed, in its order: floating ones as views of `buffer`, filled here.

    With `exact_dtypes`, a tensor whose dtype differs from the buffer's (a float32 buffer in a bf16
    model) is computed on its own in its dtype when the genome is a recipe (bit-exact, tensor-sized);
    other genome kinds compute it in the buffer's dtype and cast it back.
    """
    from evomerge.models.safetensors_format import DTYPES

    if isinstance(genome, LayerwiseGenome) and genome.is_linear:
        genome = genome.to_recipe()
    if isinstance(genome, Recipe):
        # Merged models that joined the basis during the search (hybrid guidance), in basis order;
        # each is one more model-sized vector in the seeds' dtype.
        for element in unpack_elements(arrays, "elements"):
            basis.add_element(element.materialise(basis, out=basis.new_buffer()))
    specs = {spec.name: spec for spec in layout.tensors}
    itemsize = buffer.element_size()
    floating: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if isinstance(genome, Recipe):
            for spec in layout.tensors:  # one tensor at a time, for progress; same bits as one pass
                basis.materialise_span(genome, spec.offset, spec.end, buffer[spec.offset:spec.end])
                step(spec.numel * itemsize)
        else:
            genome.materialise(basis, out=buffer)
            step(basis.size * itemsize)
        for spec in layout.tensors:
            view = buffer[spec.offset:spec.end].view(spec.shape)
            own = DTYPES[spec.dtype]
            if exact_dtypes and own != buffer.dtype:
                if isinstance(genome, Recipe):
                    exact = torch.empty(spec.numel, dtype=own)
                    view = basis.materialise_span(genome, spec.offset, spec.end, exact).view(spec.shape)
                else:
                    view = view.to(own)
            floating[spec.name] = view
    # The first seed's order (what its loaders expect), non-floating tensors copied from it as they are.
    return {name: floating[name] if name in specs else first.view(name) for name in first.names()}
