"""Merged models added to a recipe basis, as flat arrays (snapshots, best.safetensors; no pickle).

An added element is whatever genome the guide produced over the seeds: a DAM column genome or a
layer-wise (TIES/DARE) genome, or a data-based merge the driver wrote to a folder (seed_with).
Their order is the basis order, so it is stored with them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from evomerge.genomes.columns import ColumnGenome, pack_columns, unpack_columns
from evomerge.genomes.layerwise import LayerwiseGenome, pack_layerwise, unpack_layerwise
from evomerge.genomes.merged_folder import MergedFolder, pack_folders, unpack_folders

KINDS = (ColumnGenome, LayerwiseGenome, MergedFolder)


def pack_elements(genomes: list[Any], prefix: str) -> dict[str, np.ndarray]:
    kinds = []
    for genome in genomes:
        if not isinstance(genome, KINDS):
            raise ValueError(f"cannot store a {type(genome).__name__} as a basis element; "
                             "expected a column or layer-wise genome, or a merged folder")
        kinds.append(KINDS.index(type(genome)))
    arrays = {f"{prefix}/kinds": np.array(kinds, dtype=np.int64)}
    columns = [g if isinstance(g, ColumnGenome) else None for g in genomes]
    layerwise = [g if isinstance(g, LayerwiseGenome) else None for g in genomes]
    if any(g is not None for g in columns):
        arrays.update(pack_columns(columns, f"{prefix}/columns"))
    if any(g is not None for g in layerwise):
        arrays.update(pack_layerwise(layerwise, f"{prefix}/layerwise"))
    folders = [g if isinstance(g, MergedFolder) else None for g in genomes]
    if any(g is not None for g in folders):
        arrays.update(pack_folders(folders, f"{prefix}/folders"))
    return arrays


def unpack_elements(arrays: dict[str, np.ndarray], prefix: str) -> list[Any]:
    """The stored elements in basis order; [] when the arrays hold none."""
    if f"{prefix}/kinds" not in arrays:
        return []
    kinds = arrays[f"{prefix}/kinds"].tolist()
    columns = unpack_columns(arrays, f"{prefix}/columns") if 0 in kinds else [None] * len(kinds)
    layerwise = unpack_layerwise(arrays, f"{prefix}/layerwise") if 1 in kinds else [None] * len(kinds)
    folders = unpack_folders(arrays, f"{prefix}/folders") if 2 in kinds else [None] * len(kinds)
    out = [(c, lw, f)[kind] for kind, c, lw, f in zip(kinds, columns, layerwise, folders)]
    if any(g is None for g in out) or len(out) != len(kinds):
        raise ValueError(f"{prefix}: stored basis elements are incomplete")
    return out
