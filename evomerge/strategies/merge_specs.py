"""A static merge named in a strategy's options, e.g. `{method: ties, weights: [0, 1, 1], density: 0.5}`.

The static strategy's `merges` and M2N2's `seed_with` both take a list of these. A spec becomes a
one-group `LayerwiseGenome` (whole-model merge of the seeds, tensor by tensor, exactly what
`evomerge merge` computes for the same numbers). linear and task_arithmetic become recipes, exact
and free to materialise; every other method is materialised from the seeds where it is needed.
fisher and regmean need each seed's data: the driver merges them into a folder first
(evomerge/engine/data_merges.py sets `merged`), and the member reads that folder.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from evomerge.genomes.layerwise import DATA_METHODS, LINEAR_METHODS, LayerwiseGenome
from evomerge.genomes.merged_folder import spec_folder


class MergeSpec(BaseModel):
    """One static merge of all the seeds; parameter names are mergekit's."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(description="a registered merge method (evomerge merge's merge_method)")
    base: Optional[int] = Field(None, ge=0, description="index of the base seed: default 0 for methods that "
                                "need one; nuslerp/multislerp merge task vectors only when it is given")
    weights: Optional[list[float]] = Field(None, description="one per seed (the base's is ignored); default 1 each")
    densities: Optional[list[float]] = Field(None, description="one per seed, for methods with a density")
    parameters: dict[str, Any] = Field(default_factory=dict,
                                       description="the method's other parameters; `weight`/`density` here apply to every seed")
    data: Optional[list[str]] = Field(None, description="fisher/regmean: one prompt/answer JSONL per seed; default "
                                      "the LM fitness task's `data` (see evomerge/engine/data_merges.py)")
    merged: Optional[str] = Field(None, description="set by the search, not by users: the folder the driver "
                                  "merged a data-based spec into (RUN_DIR/merges/KEY)")

    @field_validator("method")
    @classmethod
    def _known(cls, value: str) -> str:
        from evomerge.merging import MERGE_METHODS

        if value not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {value!r}; allowed: {', '.join(MERGE_METHODS.names())}")
        return value

    @model_validator(mode="after")
    def _parameters(self) -> "MergeSpec":
        from evomerge.merging import MERGE_METHODS, param_names

        method = MERGE_METHODS.get(self.method)
        allowed = param_names(method.model_params) + param_names(method.global_params)
        unknown = [k for k in self.parameters if k not in allowed]
        if unknown:
            raise ValueError(f"parameters {unknown} are not parameters of {self.method}; allowed: "
                             f"{', '.join(allowed) or '(none)'}")
        if self.densities is not None and "density" not in method.model_params.model_fields:
            raise ValueError(f"densities: {self.method} takes no density; drop them or pick ties, dare_ties, ...")
        if method.data_kind is None and (self.data is not None or self.merged is not None):
            raise ValueError(f"data: {self.method} reads no data (only fisher and regmean do); drop it")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        """`data`/`merged` only when set, so configs (and run folders) without them read as before."""
        out = handler(self)
        for key in ("data", "merged"):
            if out.get(key) is None:
                out.pop(key, None)
        return out

    def label(self) -> str:
        """Short, stable text for tables: `ties(density=0.5)`, `linear`."""
        bits = [f"{k}={v}" for k, v in sorted(self.parameters.items())]
        if self.weights is not None:
            bits.append("weights=" + "/".join(f"{w:g}" for w in self.weights))
        if self.densities is not None:
            bits.append("densities=" + "/".join(f"{d:g}" for d in self.densities))
        return self.method + (f"({', '.join(bits)})" if bits else "")


def spec_genome(spec: MergeSpec, num_seeds: int, size: int) -> LayerwiseGenome:
    """The whole-model merge a spec describes, as a one-group layerwise genome over `size` parameters.

    For linear and task_arithmetic the method's normalize and lambda are folded into the weights,
    so the genome is an exact recipe: linear Σ w_k θ_k / Σ w_k, task arithmetic θ_b + λ Σ w_k τ_k.
    """
    from evomerge.merging import MERGE_METHODS

    method = MERGE_METHODS.get(spec.method)
    k = num_seeds
    for name, values in (("weights", spec.weights), ("densities", spec.densities)):
        if values is not None and len(values) != k:
            raise ValueError(f"{spec.method}: {name} has {len(values)} values but there are {k} seeds")
    if spec.base is not None and spec.base >= k:
        raise ValueError(f"{spec.method}: base={spec.base} but there are only {k} seeds (0..{k - 1})")
    if method.pairwise and k != 2:
        raise ValueError(f"{spec.method} merges exactly two seeds; there are {k}")
    settings = dict(spec.parameters)
    default_weight = float(settings.pop("weight", 1.0))
    weights = np.array(spec.weights if spec.weights is not None else [default_weight] * k, dtype=np.float64)
    densities = None
    if spec.densities is not None:
        densities = np.array(spec.densities, dtype=np.float64)
    elif "density" in settings and "density" in method.model_params.model_fields:
        densities = np.full(k, float(settings.pop("density")))
    if method.needs_base or method.pairwise:
        base: int | None = spec.base or 0
    elif method.base_optional:
        base = spec.base  # nuslerp / multislerp merge task vectors only when a base is named
    else:
        base = None
    if spec.method in LINEAR_METHODS:
        weights, settings = _fold_linear(spec.method, weights, base, settings)
    return LayerwiseGenome(spec.method, weights.reshape(1, k), None if densities is None else densities.reshape(1, k),
                           base, np.array([0, size], dtype=np.int64), np.zeros(1, dtype=np.int64), settings)


def _fold_linear(name: str, weights: np.ndarray, base: int | None,
                 settings: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    settings = dict(settings)
    settings.pop("int8_mask", None)
    if name == "linear":
        if settings.pop("normalize", True):
            total = float(weights.sum())
            if abs(total) < 1e-8:
                raise ValueError("linear: the weights sum to 0, so they cannot be normalised; "
                                 "set parameters.normalize: false or change the weights")
            weights = weights / total
        return weights, settings
    assert base is not None
    scale = float(settings.pop("lambda", 1.0))
    others = [j for j in range(weights.size) if j != base]
    if settings.pop("normalize", False):
        total = float(weights[others].sum())
        if abs(total) >= 1e-8:
            scale /= total
    out = np.zeros_like(weights)
    out[others] = weights[others] * scale
    return out, settings


def joins_basis(spec: MergeSpec | dict[str, Any], num_seeds: int) -> bool:
    """Whether `spec`, as an M2N2 `seed_with` member over checkpoint seeds, becomes a basis element
    (a model-sized buffer in the population actor and every worker): every method but an exact
    linear one (linear, task_arithmetic: a recipe, nothing held). The memory plan counts these."""
    spec = spec if isinstance(spec, MergeSpec) else MergeSpec.model_validate(spec)
    return not spec_genome(spec, num_seeds, 1).is_linear


def spec_member(spec: MergeSpec, space: Any, layout: Any = None) -> Any:
    """What a strategy hands out for a spec: a recipe (linear methods, over checkpoints), the
    layer-wise genome itself (workers materialise it), the driver's merged folder (fisher,
    regmean), or the merged vector (in-memory seeds, merged tensor by tensor along `layout`, the
    task's, when there is one)."""
    genome = spec_genome(spec, space.num_seeds, space.size)
    if genome.method in DATA_METHODS:
        return spec_folder(spec, space)
    if space.kind == "recipe":
        return genome.to_recipe() if genome.is_linear else genome
    return genome.materialise(dense_basis(space.seeds, layout)).numpy().astype(np.float32)


def dense_basis(seeds: list[np.ndarray], layout: Any = None) -> Any:
    """A basis over in-memory seed vectors: one piece per tensor of `layout` (names and shapes, so
    per-tensor methods see matrices), or one flat piece without it."""
    import torch

    from evomerge.genomes.basis import Basis, Piece

    tensors = getattr(layout, "tensors", None)
    size = int(np.asarray(seeds[0]).size)
    if not tensors or sum(int(t.numel) for t in tensors) != size:
        return Basis.from_arrays(seeds)
    flat = [torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32)).reshape(-1) for s in seeds]
    pieces = [Piece(int(t.offset), int(t.offset) + int(t.numel), [v[int(t.offset):int(t.offset) + int(t.numel)]
                                                                  for v in flat]) for t in tensors]
    basis = Basis(pieces, size, len(seeds))
    basis.layout = layout  # type: ignore[attr-defined]
    return basis
