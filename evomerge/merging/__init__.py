"""Static merge operators (mergekit's set and methods from the literature) and `evomerge merge`.

The operators in `methods` work on one tensor at a time with explicit coefficients, so they serve
one-shot baselines, layerwise genomes and the mergekit-style `evomerge merge CONFIG OUT/` alike.
`run_merge` is imported lazily: it needs the checkpoint I/O of `evomerge.models`.
"""

from __future__ import annotations

from typing import Any

from evomerge.merging.methods import MERGE_METHODS, MergeMethod, Params, param_names
from evomerge.merging import methods_data, methods_geometric, methods_papers, methods_sparse  # noqa: F401  (they register their methods)

__all__ = ["MERGE_METHODS", "MergeMethod", "Params", "param_names", "run_merge", "load_merge_config"]


def __getattr__(name: str) -> Any:
    if name == "run_merge":
        from evomerge.merging.run import run_merge
        return run_merge
    if name == "load_merge_config":
        from evomerge.merging.mergekit_config import load_merge_config
        return load_merge_config
    raise AttributeError(f"module 'evomerge.merging' has no attribute {name!r}")
