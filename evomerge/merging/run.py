"""`evomerge merge CONFIG.yml OUT/`: a one-shot static merge written as a Hugging Face folder.

The models are memory-mapped and merged one tensor at a time, so peak memory is the output model
(already in its saved dtype) plus a few copies of the largest tensor, never K whole models.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch
from pydantic import ValidationError

from evomerge.errors import ConfigError
from evomerge.merging.mergekit_config import MergePlan, load_merge_config
from evomerge.merging.params import count_layers, depth, resolve
from evomerge.merging.vocabulary import is_vocabulary_tensor, keep_rows, output_rows, set_vocab_size

CONFIG_COPY = "merge_config.yml"  # provenance, like mergekit's mergekit_config.yml
_NOT_TOKENIZER = ("config.json", "generation_config.json")
_OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_merge(config_path: Path, out_dir: Path, *, allow_pickle: bool = False) -> Path:
    """Merge the models a mergekit-style YAML names and write `out_dir`; returns `out_dir`.

    Raises ConfigError (bad YAML, unknown field/method/parameter, missing path) before touching
    any weights, and CheckpointError when the models cannot be opened or do not match.
    """
    plan = load_merge_config(config_path)
    out = merge_plan(plan, Path(out_dir), allow_pickle=allow_pickle)
    shutil.copyfile(config_path, out / CONFIG_COPY)
    return out


def merge_plan(plan: MergePlan, out_dir: Path, *, allow_pickle: bool = False) -> Path:
    """Run a checked plan: open lazily, merge tensor by tensor, save, then fix up the tokenizer."""
    from evomerge.models import open_seeds, save_model_folder

    checkpoints, _layout = open_seeds([str(p) for p in plan.paths], allow_pickle=allow_pickle)
    try:
        by_path = dict(zip(plan.paths, checkpoints))
        base = by_path[plan.base] if plan.base is not None else None
        others = [by_path[p] for p in plan.others]
        names = checkpoints[0].names()
        num_layers = count_layers(names)
        out_dtype = _OUT_DTYPES[plan.dtype]
        stats = _statistics(plan)
        rows = output_rows(plan.tokenizer_source, plan.paths) if plan.align_vocabulary else None
        merged: dict[str, torch.Tensor] = {}
        for name in names:
            cut = rows if is_vocabulary_tensor(name) else None
            result = merge_named_tensor(
                plan, name, depth(name, num_layers),
                keep_rows(base.view(name), cut) if base is not None else None,
                [keep_rows(c.view(name), cut) for c in others],
                None if stats is None else [_cut_statistic(s.get(name), cut) for s in stats])
            merged[name] = result.to(out_dtype) if result.is_floating_point() else result
        saved = save_model_folder(merged, out_dir, source=plan.config_source, dtype=plan.dtype)
    finally:
        for checkpoint in checkpoints:
            checkpoint.close()
    _copy_tokenizer(plan.tokenizer_source, plan.config_source, saved)
    if rows is not None:
        set_vocab_size(saved, rows)
    return saved


def _cut_statistic(stat: Optional[torch.Tensor], rows: Optional[int]) -> Optional[torch.Tensor]:
    """A Fisher diagonal is token-indexed like its tensor; a Gram matrix (input side) is not."""
    if stat is None or rows is None or stat.dim() != 2 or stat.shape[0] == stat.shape[1]:
        return stat
    return keep_rows(stat, rows)


def _statistics(plan: MergePlan) -> Optional[list[dict[str, torch.Tensor]]]:
    """Each model's Fisher or Gram matrices on its own data file (data methods only)."""
    kind = plan.method.data_kind
    if kind is None:
        return None
    from evomerge.merging.statistics import model_statistics

    limit = resolve(plan.method.global_params, [plan.global_settings], "", 0.0).num_examples
    return model_statistics(kind, plan.others, plan.data, plan.tokenizer_source, int(limit))


def merge_named_tensor(plan: MergePlan, name: str, t: float, base: Optional[torch.Tensor],
                       tensors: Sequence[torch.Tensor],
                       stats: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
    """Resolve this tensor's parameters (filters, gradients at depth t) and apply the method."""
    method = plan.method
    try:
        per_model = [resolve(method.model_params, [own, plan.global_settings], name, t)
                     for own in plan.model_settings]
        params = resolve(method.global_params, [plan.global_settings], name, t)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"tensor {name}: parameters do not resolve ({problems}); a filter list "
                          "needs an entry without `filter` as the fallback") from None
    try:
        return method(base, tensors, per_model, params, key=name, stats=stats)
    except ValueError as exc:
        raise ConfigError(f"tensor {name}: {exc}") from None


def _copy_tokenizer(source: Path, config_source: Path, out: Path) -> None:
    """save_model_folder copied the config source's tokenizer; swap in another source's if asked."""
    if source == config_source or not source.is_dir():
        return
    from evomerge.models.save import SIDE_FILES

    tokenizer_files = [f for f in SIDE_FILES if f not in _NOT_TOKENIZER]
    for name in tokenizer_files:
        (out / name).unlink(missing_ok=True)
    for name in tokenizer_files:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
