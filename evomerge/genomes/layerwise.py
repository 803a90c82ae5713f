"""Layerwise genomes: per layer-group coefficients per seed, with a merge method and densities.

This is the search space evolutionary LLM merges use (and CMA-ES searches): a handful of numbers
per layer group instead of one per parameter. Groups are unions of whole tensors, so a genome is
a list of segment boundaries over the flat layout plus the group each segment belongs to; a
group need not be contiguous (checkpoints that store `layers.10` before `layers.2`).

- `linear`: θ = Σ_k w_k θ_k per group (not normalised: the search learns the scale, and a
  normalised soup is one point of the space).
- `task_arithmetic`: θ = θ_b + Σ_{k≠b} w_k (θ_k − θ_b), i.e. coefficients (1 − Σ w, w_k).
  Both are linear in the seeds, so they ARE recipes (`to_recipe`) and workers materialise them
  with the fused recipe pass, unchanged.
- any other registered merge method (`ties`, `dare_ties`, `breadcrumbs`, `della`, `pcb`, `tsv`,
  `karcher`, ...): not linear (trimming, sign election, random drops, angles); `materialise` runs
  `evomerge.merging.MERGE_METHODS` once per tensor (per basis piece ∩ segment) with that group's
  weights and densities and the genome's `settings` (the method's global parameters, and defaults
  of its per-model ones such as `gamma`), so the result equals a static mergekit-style merge with
  those numbers. The base seed's column of `weights`/`densities` is ignored by every method with a
  base. A one-group genome is a whole-model static merge: that is how static baselines and
  M2N2's `seed_with` write one down.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from evomerge.genomes.recipe import Recipe, pack_recipes, simplify, unpack_recipes

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")  # the index order of old snapshots
LINEAR_METHODS = frozenset({"linear", "task_arithmetic"})  # exact as recipes


def merge_method(name: str) -> Any:
    """The registered merge method `name` (imported here: merging sits below genomes)."""
    from evomerge.merging import MERGE_METHODS

    return MERGE_METHODS.get(name)


class _MethodsWhere:
    """The registered merge methods with a property, as a set one can test with `in`."""

    def __init__(self, test: Callable[[Any], bool], what: str) -> None:
        self.test, self.what = test, what

    def __contains__(self, name: object) -> bool:
        from evomerge.merging import MERGE_METHODS

        return isinstance(name, str) and name in MERGE_METHODS and self.test(MERGE_METHODS.get(name))

    def names(self) -> list[str]:
        from evomerge.merging import MERGE_METHODS

        return [n for n in MERGE_METHODS.names() if n in self]


BASE_METHODS = _MethodsWhere(lambda m: m.needs_base or m.pairwise, "needs a base seed")
SPARSE_METHODS = _MethodsWhere(lambda m: "density" in m.model_params.model_fields, "takes per-model densities")
DATA_METHODS = _MethodsWhere(lambda m: m.data_kind is not None, "reads each model's data (fisher, regmean)")
WEIGHTED_METHODS = _MethodsWhere(lambda m: m.data_kind is None
                                 and bool({"weight", "density"} & set(m.model_params.model_fields)),
                                 "takes per-model weights or densities (and no data)")

# `model.layers.3.mlp...` (llama, mistral, qwen), `transformer.h.3...` (gpt2), `encoder.layer.3...`
# (bert), `blocks.3...`: the decoder/encoder block index.
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class LayerGroups:
    """Segments of the flat layout and the group of each; `labels` names the groups."""

    boundaries: np.ndarray  # int64 (S + 1,), boundaries[0] = 0, boundaries[-1] = size
    segment_group: np.ndarray  # int64 (S,), values in [0, G)
    labels: tuple[str, ...]  # (G,)

    @property
    def num_groups(self) -> int:
        return len(self.labels)

    @property
    def size(self) -> int:
        return int(self.boundaries[-1])


def layer_groups(layout_or_size: Any, group_size: int = 1) -> LayerGroups:
    """Groups from an `evomerge.models.Layout` (or anything with `.tensors` of name/offset/numel),
    from explicit boundaries (a sequence of ints from 0 to the size), or from a size (one group).

    With a layout, tensors named `...layers.<i>...` go to group `layers.<i // group_size>`; every
    other tensor (embeddings, final norm, head) is a group of its own. For a small model such as
    the digits MLP (4 tensors, no layer index) that is one group per tensor.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    if isinstance(layout_or_size, LayerGroups):
        return layout_or_size
    tensors = getattr(layout_or_size, "tensors", None)
    if tensors is not None:
        return _groups_from_tensors(tensors, group_size)
    if isinstance(layout_or_size, (int, np.integer)):
        size = int(layout_or_size)
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        return LayerGroups(np.array([0, size], np.int64), np.zeros(1, np.int64), ("all",))
    bounds = np.asarray(list(layout_or_size), dtype=np.int64)
    if bounds.ndim != 1 or bounds.size < 2 or bounds[0] != 0 or np.any(np.diff(bounds) <= 0):
        raise ValueError("explicit group boundaries must be increasing integers from 0 to the parameter "
                         f"count, e.g. [0, 16384, 16640, 19200, 19210]; got {list(bounds)[:8]}")
    segments = bounds.size - 1
    return LayerGroups(bounds, np.arange(segments, dtype=np.int64),
                       tuple(f"{bounds[i]}:{bounds[i + 1]}" for i in range(segments)))


def group_boundaries(layout_or_size: Any, group_size: int = 1) -> np.ndarray:
    """The segment boundaries of `layer_groups` (one segment per contiguous run of a group)."""
    return layer_groups(layout_or_size, group_size).boundaries


def _groups_from_tensors(tensors: Sequence[Any], group_size: int) -> LayerGroups:
    labels: list[str] = []
    index: dict[str, int] = {}
    bounds: list[int] = [0]
    segment_group: list[int] = []
    end = 0
    for spec in tensors:
        if int(spec.offset) != end:
            raise ValueError(f"layout tensors must be contiguous; {spec.name!r} starts at {spec.offset}, not {end}")
        match = _LAYER_RE.search(spec.name)
        label = f"layers.{int(match.group(1)) // group_size}" if match else spec.name
        if label not in index:
            index[label] = len(labels)
            labels.append(label)
        group = index[label]
        if segment_group and segment_group[-1] == group:
            bounds[-1] = end + int(spec.numel)  # same group as the previous tensor: extend the segment
        else:
            segment_group.append(group)
            bounds.append(end + int(spec.numel))
        end += int(spec.numel)
    if not segment_group:
        raise ValueError("the layout has no tensors")
    return LayerGroups(np.array(bounds, np.int64), np.array(segment_group, np.int64), tuple(labels))


@dataclass(frozen=True, eq=False)
class LayerwiseGenome:
    method: str
    weights: np.ndarray  # float64 (G, K)
    densities: np.ndarray | None  # float64 (G, K) or None (= 1: keep everything)
    base: int | None
    boundaries: np.ndarray  # int64 (S + 1,) over the flat layout
    segment_group: np.ndarray | None = None  # int64 (S,); None = segment s is group s
    settings: dict[str, Any] = field(default_factory=dict)  # the method's other parameters, mergekit names

    def __post_init__(self) -> None:
        from evomerge.merging import MERGE_METHODS

        if self.method not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {self.method!r}; choose one of {', '.join(MERGE_METHODS.names())}")
        object.__setattr__(self, "settings", dict(self.settings or {}))
        if self.method not in LINEAR_METHODS or self.settings:  # bad names/values (or slerp without t) fail here
            method = merge_method(self.method)
            per_model, global_ = _split_settings(method, self.settings)
            try:
                method.params(**global_)
                method.model_params_list([1.0], None, per_model)
            except Exception as exc:  # pydantic's ValidationError: say which method it was
                raise ValueError(f"{self.method} parameters {self.settings}: {exc}") from None
        weights = np.asarray(self.weights, dtype=np.float64)
        if weights.ndim != 2:
            raise ValueError(f"weights must be (groups, seeds), got shape {weights.shape}")
        object.__setattr__(self, "weights", weights)
        bounds = np.asarray(self.boundaries, dtype=np.int64)
        if bounds.ndim != 1 or bounds.size < 2 or bounds[0] != 0 or np.any(np.diff(bounds) <= 0):
            raise ValueError("boundaries must increase strictly from 0 to the parameter count")
        object.__setattr__(self, "boundaries", bounds)
        groups = (np.arange(bounds.size - 1, dtype=np.int64) if self.segment_group is None
                  else np.asarray(self.segment_group, dtype=np.int64))
        if groups.shape != (bounds.size - 1,) or groups.min() < 0 or groups.max() >= weights.shape[0]:
            raise ValueError(f"segment_group must give each of the {bounds.size - 1} segments a group "
                             f"in [0, {weights.shape[0]})")
        object.__setattr__(self, "segment_group", groups)
        if self.densities is not None:
            densities = np.asarray(self.densities, dtype=np.float64)
            if densities.shape != weights.shape:
                raise ValueError(f"densities shape {densities.shape} must equal weights shape {weights.shape}")
            if not np.all((densities > 0) & (densities <= 1)):
                raise ValueError("densities must lie in (0, 1]")
            object.__setattr__(self, "densities", densities)
        method = merge_method(self.method)
        if self.method in BASE_METHODS or (method.base_optional and self.base is not None):
            if self.base is None or not 0 <= int(self.base) < weights.shape[1]:
                raise ValueError(f"method {self.method} needs a base seed index in [0, {weights.shape[1]})")
            object.__setattr__(self, "base", int(self.base))
        elif not method.uses_base and self.method not in LINEAR_METHODS:
            object.__setattr__(self, "base", None)  # karcher, linear-like: every seed is a model

    @property
    def num_groups(self) -> int:
        return int(self.weights.shape[0])

    @property
    def num_seeds(self) -> int:
        return int(self.weights.shape[1])

    @property
    def size(self) -> int:
        return int(self.boundaries[-1])

    @property
    def is_linear(self) -> bool:
        return self.method in LINEAR_METHODS and not self.settings

    def coefficients(self) -> np.ndarray:
        """(G, K) seed coefficients of a linear genome: what each group's recipe row is."""
        if not self.is_linear:
            raise ValueError(f"a {self.method} genome is not a linear combination of the seeds")
        coeffs = self.weights.copy()
        if self.method == "task_arithmetic":
            coeffs[:, self.base] = 0.0
            coeffs[:, self.base] = 1.0 - coeffs.sum(axis=1)
        return coeffs

    def to_recipe(self) -> Recipe:
        """The same weights as a recipe, so the existing worker materialises it unchanged."""
        coeffs = self.coefficients()[self.segment_group]
        return simplify(Recipe(self.boundaries.copy(), coeffs))

    def materialise(self, basis: Any, out: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 weights over `basis` (an `evomerge.genomes.basis.Basis`)."""
        if basis.size != self.size or basis.num_seeds != self.num_seeds:
            raise ValueError(f"genome covers {self.size} parameters of {self.num_seeds} seeds, the basis "
                             f"has {basis.size} of {basis.num_seeds}")
        if self.is_linear:
            return basis.materialise(self.to_recipe(), out=out)
        if out is None:
            out = torch.empty(basis.size, dtype=torch.float32)
        from evomerge.merging import MERGE_METHODS

        method = MERGE_METHODS.get(self.method)
        per_model_settings, global_settings = _split_settings(method, self.settings)
        params = method.params(**global_settings)
        base = self.base if method.uses_base else None
        others = [k for k in range(self.num_seeds) if k != base]
        names, shapes = _piece_names(basis), _piece_shapes(basis)
        for p, piece in enumerate(basis.pieces):
            for s in _overlapping(self.boundaries, piece.start, piece.stop):
                lo, hi = max(piece.start, int(self.boundaries[s])), min(piece.stop, int(self.boundaries[s + 1]))
                g = int(self.segment_group[s])
                views = [v[lo - piece.start:hi - piece.start] for v in piece.views]
                densities = None if self.densities is None else self.densities[g, others]
                per_model = method.model_params_list(self.weights[g, others], densities, per_model_settings)
                whole = lo == piece.start and hi == piece.stop
                key = names[p] if whole else f"{names[p]}[{lo - piece.start}:{hi - piece.start}]"
                if whole and shapes[p] is not None:  # matrices keep their shape: SVD, row-wise methods need it
                    views = [v.view(shapes[p]) for v in views]
                base_view = views[base] if base is not None else None
                merged = method(base_view, [views[k] for k in others], per_model, params, key=key)
                out[lo:hi] = merged.reshape(-1)
        return out

    def equals(self, other: "LayerwiseGenome") -> bool:
        same_density = (self.densities is None and other.densities is None) or (
            self.densities is not None and other.densities is not None
            and np.array_equal(self.densities, other.densities))
        return (self.method == other.method and self.base == other.base and same_density
                and self.settings == other.settings
                and np.array_equal(self.weights, other.weights)
                and np.array_equal(self.boundaries, other.boundaries)
                and np.array_equal(self.segment_group, other.segment_group))


def _split_settings(method: Any, settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(per-model defaults, global parameters) of a method from one flat mapping, mergekit-style."""
    from evomerge.merging import param_names

    model_names, global_names = set(param_names(method.model_params)), set(param_names(method.global_params))
    unknown = sorted(set(settings) - model_names - global_names)
    if unknown:
        allowed = sorted((model_names | global_names) - {"weight", "density"})
        raise ValueError(f"{method.name} has no parameter {', '.join(unknown)}; allowed: {', '.join(allowed) or '(none)'}")
    return ({k: v for k, v in settings.items() if k in model_names},
            {k: v for k, v in settings.items() if k in global_names})


def _piece_names(basis: Any) -> list[str]:
    """Tensor names (they seed DARE's masks, as in `evomerge merge`), or offsets for in-memory seeds."""
    layout = getattr(basis, "layout", None)
    if layout is not None and len(layout.tensors) == len(basis.pieces):
        return [t.name for t in layout.tensors]
    return [f"{piece.start}:{piece.stop}" for piece in basis.pieces]


def _piece_shapes(basis: Any) -> list[tuple[int, ...] | None]:
    """Each piece's tensor shape when the basis has a matching layout, else None (flat)."""
    layout = getattr(basis, "layout", None)
    if layout is None or len(layout.tensors) != len(basis.pieces):
        return [None] * len(basis.pieces)
    return [tuple(t.shape) if t.numel == piece.stop - piece.start else None
            for t, piece in zip(layout.tensors, basis.pieces)]


def _overlapping(bounds: np.ndarray, start: int, stop: int) -> range:
    first = int(np.searchsorted(bounds, start, side="right")) - 1
    last = int(np.searchsorted(bounds, stop, side="left"))
    return range(first, last)


# -- snapshots: flat arrays only, no pickle ----------------------------------------------------------
def pack_layerwise(genomes: list[LayerwiseGenome | None], prefix: str) -> dict[str, np.ndarray]:
    present = [g for g in genomes if g is not None]
    k = present[0].num_seeds if present else 0

    def cat(parts: list[np.ndarray], dtype: Any, width: int | None = None) -> np.ndarray:
        if parts:
            return np.concatenate(parts).astype(dtype)
        return np.zeros((0, width) if width is not None else 0, dtype=dtype)

    def text(value: Any) -> np.ndarray:  # JSON as bytes: names and settings, no pickle
        return np.frombuffer(json.dumps(value, sort_keys=True).encode(), dtype=np.uint8).copy()

    return {
        f"{prefix}/method": np.array([-1 if g is None else METHODS.index(g.method) if g.method in METHODS else -2
                                      for g in genomes], np.int64),
        f"{prefix}/method_names": text([None if g is None else g.method for g in genomes]),
        f"{prefix}/settings": text([None if g is None else g.settings for g in genomes]),
        f"{prefix}/base": np.array([-1 if g is None or g.base is None else g.base for g in genomes], np.int64),
        f"{prefix}/groups": np.array([0 if g is None else g.num_groups for g in genomes], np.int64),
        f"{prefix}/segments": np.array([0 if g is None else g.boundaries.size - 1 for g in genomes], np.int64),
        f"{prefix}/has_density": np.array([g is not None and g.densities is not None for g in genomes], bool),
        f"{prefix}/weights": cat([g.weights for g in present], np.float64, k),
        f"{prefix}/densities": cat([g.densities for g in present if g.densities is not None], np.float64, k),
        f"{prefix}/boundaries": cat([g.boundaries for g in present], np.int64),
        f"{prefix}/segment_group": cat([g.segment_group for g in present], np.int64),
    }


def unpack_layerwise(arrays: dict[str, np.ndarray], prefix: str) -> list[LayerwiseGenome | None]:
    methods, bases = arrays[f"{prefix}/method"], arrays[f"{prefix}/base"]
    groups, segments = arrays[f"{prefix}/groups"], arrays[f"{prefix}/segments"]
    has_density = arrays[f"{prefix}/has_density"]
    weights, densities = arrays[f"{prefix}/weights"], arrays[f"{prefix}/densities"]
    bounds, seg_group = arrays[f"{prefix}/boundaries"], arrays[f"{prefix}/segment_group"]
    names: list[Any] = [None if m < 0 else METHODS[int(m)] for m in methods]  # snapshots before any method
    settings: list[Any] = [None] * methods.size
    if f"{prefix}/method_names" in arrays:
        names = json.loads(bytes(np.asarray(arrays[f"{prefix}/method_names"], np.uint8)).decode())
        settings = json.loads(bytes(np.asarray(arrays[f"{prefix}/settings"], np.uint8)).decode())
    out: list[LayerwiseGenome | None] = []
    w = d = b = s = 0
    for i in range(methods.size):
        if methods[i] == -1:
            out.append(None)
            continue
        g, n = int(groups[i]), int(segments[i])
        dens = None
        if has_density[i]:
            dens, d = densities[d:d + g].copy(), d + g
        out.append(LayerwiseGenome(names[i], weights[w:w + g].copy(), dens,
                                   None if bases[i] < 0 else int(bases[i]),
                                   bounds[b:b + n + 1].copy(), seg_group[s:s + n].copy(), settings[i] or {}))
        w, b, s = w + g, b + n + 1, s + n
    return out


class LayerwiseSpace:
    """A recipe space whose members may also be TIES/DARE layerwise genomes (CMA-ES over checkpoints).

    The population snapshots in-flight and best members through its space, so the strategy swaps
    this in (as DAM does with its column space). Recipes are packed as before; layerwise genomes
    go under `<prefix>/layerwise`. Everything else is the wrapped recipe space's.
    """

    kind = "layerwise"

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.size = inner.size

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def num_seeds(self) -> int:
        return self.inner.num_seeds

    def copy(self, genome: Any) -> Any:
        return genome  # neither recipes nor layerwise genomes are modified in place

    def pack(self, genomes: list[Any], prefix: str) -> dict[str, np.ndarray]:
        layerwise = [g if isinstance(g, LayerwiseGenome) else None for g in genomes]
        recipes = [g if isinstance(g, Recipe) else None for g in genomes]
        return {**pack_recipes(recipes, prefix), **pack_layerwise(layerwise, f"{prefix}/layerwise")}

    def unpack(self, arrays: dict[str, np.ndarray], prefix: str) -> list[Any]:
        recipes = unpack_recipes(arrays, prefix)
        if f"{prefix}/layerwise/method" not in arrays:
            return recipes
        layerwise = unpack_layerwise(arrays, f"{prefix}/layerwise")
        return [lw if lw is not None else r for r, lw in zip(recipes, layerwise)]
