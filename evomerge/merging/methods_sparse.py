"""mergekit's sparsifying task-vector methods: breadcrumbs, breadcrumbs_ties, della, della_linear, sce.

Each is "sparsify every task vector, weight, optionally elect signs, sum, add to the base", the
scheme mergekit calls generalized task arithmetic; they differ in how a task vector is thinned.
Names, parameters and defaults are mergekit's, so a mergekit YAML means the same thing here:

- breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795): drop the `gamma` largest and then the
  smallest magnitudes until `density` is left. `_ties` adds TIES sign election.
- della (Deep et al. 2024, arXiv:2406.11617): keep each entry with a probability that grows with
  its magnitude rank in its row, from density − epsilon to density + epsilon; `rescale` (on by
  default) scales the survivors back to the task vector's L1 norm, as mergekit does.
- sce (Select, Calculate, Erase; Wan et al. 2024, arXiv:2408.07990): keep the `select_topk`
  fraction of entries whose task vectors vary most across models, weight each model by its
  mean squared task vector, erase entries that disagree with the elected sign.

Random masks (della) come from `seed`, the tensor name and the model index (`ops.dare_seed`),
so the same seed gives the same merge; they are not mergekit's draws, which come from torch's
global generator and so differ between any two runs there.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from pydantic import Field

from evomerge.merging import ops
from evomerge.merging.methods import (MergeMethod, NoModelParams, Params, SparseParams, TaskArithmeticParams,
                                      register)

Tensor = torch.Tensor


class BreadcrumbsModelParams(SparseParams):
    gamma: float = Field(0.01, ge=0, le=1, description="fraction of the largest magnitudes dropped (outliers)")


class DellaModelParams(SparseParams):
    epsilon: float = Field(0.15, ge=0, lt=1, description="keep probabilities span density ± epsilon by rank")


class GtaParams(TaskArithmeticParams):
    """mergekit's generalized task arithmetic switches; defaults differ per method (subclasses)."""

    rescale: bool = Field(False, description="scale each sparsified task vector back to its L1 norm")


class BreadcrumbsParams(GtaParams):
    pass


class BreadcrumbsTiesParams(GtaParams):
    pass


class DellaParams(GtaParams):
    normalize: bool = Field(True, description="divide by the weights of the sign-agreeing entries")
    rescale: bool = Field(True, description="scale each pruned task vector back to its L1 norm")
    seed: int = Field(0, description="seed of the keep masks; same seed, same merge")


class DellaLinearParams(GtaParams):
    rescale: bool = Field(True, description="scale each pruned task vector back to its L1 norm")
    seed: int = Field(0, description="seed of the keep masks; same seed, same merge")


class SceParams(Params):
    select_topk: float = Field(1.0, ge=0, le=1, description="fraction of entries kept, by variance across models")
    int8_mask: bool = Field(False, description="accepted for mergekit configs; no effect here")


def _count(fraction: float, n: int) -> int:
    """int(fraction·n), float rounding and all (0.29·100 counts 28), as mergekit counts."""
    return int(fraction * n)


def magnitude_outliers(tau: Tensor, density: float, gamma: float) -> Tensor:
    """Breadcrumbs mask: of the entries sorted by |τ|, drop the top int(gamma·n) and then the
    smallest, so that int(density·n) remain (fewer outliers dropped when both do not fit).

    Counts are int(), float rounding included (0.29·100 counts 28), as in mergekit 0.1.5; where
    int(gamma·n) is 0 (tensors under 100 entries at gamma 0.01) nothing is dropped from the top.
    """
    if density >= 1:
        return tau
    n = tau.numel()
    target, n_top = _count(density, n), _count(gamma, n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    order = torch.sort(tau.abs().reshape(-1), stable=True).indices  # ascending; equal |τ|: lower index first
    keep = torch.zeros(n, dtype=torch.bool, device=tau.device)
    keep[order[n_bot:n - n_top]] = True
    return (tau.reshape(-1) * keep).view_as(tau)


def della_keep_probabilities(tau: Tensor, density: float, epsilon: float) -> Tensor:
    """MAGPRUNE: per row (a 1-D tensor is one row), rank |τ| ascending, r ∈ {1..n}, and keep with
    probability density − ε + 2ε (r − 1)/(n − 1): the largest entry most likely survives."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)
    n = rows.shape[1]
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=rows.device).expand_as(order))  # 0-based rank
    rank_norm = ranks.to(torch.float32) / (n - 1) if n > 1 else torch.zeros_like(rows)
    return ((density - epsilon) + rank_norm * (2 * epsilon)).view_as(tau)


def della_prune(tau: Tensor, density: float, epsilon: float, rescale: bool, generator: torch.Generator) -> Tensor:
    if density >= 1:
        return tau
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"della: density ± epsilon must lie inside (0, 1), got density {density} and "
                         f"epsilon {epsilon}; lower `epsilon` or move `density` away from 0 and 1")
    probs = della_keep_probabilities(tau, density, epsilon)
    keep = ops.uniform_draws(tau.shape, generator).to(tau.device) < probs
    kept = tau * keep
    return ops.l1_rescaled(tau, kept) if rescale else kept


def _combine(base: Tensor, taus: Sequence[Tensor], per_model: Sequence[Any], params: Any, consensus: bool) -> Tensor:
    weights = [p.weight for p in per_model]
    merged = (ops.ties_combine(taus, weights, params.normalize) if consensus
              else ops.linear_combine(taus, weights, params.normalize))
    return ops.as_f32(base) + params.lambda_ * merged


def _breadcrumbs_taus(base: Tensor, tensors: Sequence[Tensor], per_model: Sequence[Any], params: Any) -> list[Tensor]:
    out = []
    for tau, p in zip(ops.task_vectors(base, tensors), per_model):
        kept = magnitude_outliers(tau, p.density, p.gamma)
        out.append(ops.l1_rescaled(tau, kept) if params.rescale and p.density < 1 else kept)
    return out


def _della_taus(base: Tensor, tensors: Sequence[Tensor], per_model: Sequence[Any], params: Any,
                key: str) -> list[Tensor]:
    out = []
    for i, (tau, p) in enumerate(zip(ops.task_vectors(base, tensors), per_model)):
        generator = torch.Generator().manual_seed(ops.dare_seed(params.seed, key, i))
        out.append(della_prune(tau, p.density, p.epsilon, params.rescale, generator))
    return out


def _breadcrumbs(base: Optional[Tensor], tensors: Sequence[Tensor], per_model: Sequence[Any], params: Any,
                 key: str) -> Tensor:
    return _combine(base, _breadcrumbs_taus(base, tensors, per_model, params), per_model, params, consensus=False)


def _breadcrumbs_ties(base: Optional[Tensor], tensors: Sequence[Tensor], per_model: Sequence[Any], params: Any,
                      key: str) -> Tensor:
    return _combine(base, _breadcrumbs_taus(base, tensors, per_model, params), per_model, params, consensus=True)


def _della(base: Optional[Tensor], tensors: Sequence[Tensor], per_model: Sequence[Any], params: Any,
           key: str) -> Tensor:
    return _combine(base, _della_taus(base, tensors, per_model, params, key), per_model, params, consensus=True)


def _della_linear(base: Optional[Tensor], tensors: Sequence[Tensor], per_model: Sequence[Any], params: Any,
                  key: str) -> Tensor:
    return _combine(base, _della_taus(base, tensors, per_model, params, key), per_model, params, consensus=False)


def sce_select_mask(taus: Tensor, fraction: float) -> Tensor:
    """Keep the int(fraction · #nonzero-variance) entries (float32 product) with the largest variance
    across models."""
    if fraction >= 1:
        return torch.ones_like(taus[0], dtype=torch.bool)
    var = torch.var(taus, dim=0, unbiased=False)
    # counted as a float32 tensor product, as mergekit does: 400 · 0.29 is 116.0 there (float32),
    # where Python's float64 gives 115.99…
    k = int(torch.count_nonzero(var) * fraction)
    keep = torch.zeros(var.numel(), dtype=torch.bool, device=taus.device)
    if k > 0:
        order = torch.sort(var.reshape(-1), descending=True, stable=True).indices
        keep[order[:k]] = True
    return keep.view_as(var)


def sce_model_weights(taus: Tensor) -> Tensor:
    """Each model's mean squared task vector, normalised to sum 1 (uniform when the sum is < 1e-6)."""
    energy = taus.reshape(taus.shape[0], -1).pow(2).mean(dim=1)
    total = float(energy.sum())
    if abs(total) < 1e-6:
        return torch.full_like(energy, 1.0 / energy.numel())
    return energy / total


def _sce(base: Optional[Tensor], tensors: Sequence[Tensor], per_model: Sequence[Any], params: Any,
         key: str) -> Tensor:
    b32 = ops.as_f32(base)
    taus = torch.stack(ops.task_vectors(base, tensors))
    taus = taus * sce_select_mask(taus, params.select_topk)
    elected = torch.where(taus.sum(0) >= 0, 1.0, -1.0)
    agree = taus.sign() == elected  # zeros (dropped entries) never agree
    weights = sce_model_weights(taus).view(-1, *([1] * (taus.dim() - 1)))
    erased = weights * agree
    return b32 + (taus * erased).sum(0) / erased.sum(0).clamp(min=1e-6)


BREADCRUMBS = register(MergeMethod(
    "breadcrumbs", _breadcrumbs, BreadcrumbsModelParams, BreadcrumbsParams, needs_base=True,
    weight_required=True,
    doc="drop the largest (gamma) and smallest magnitudes down to density, then task arithmetic"))
BREADCRUMBS_TIES = register(MergeMethod(
    "breadcrumbs_ties", _breadcrumbs_ties, BreadcrumbsModelParams, BreadcrumbsTiesParams, needs_base=True,
    weight_required=True, doc="breadcrumbs sparsification, then TIES sign election"))
DELLA = register(MergeMethod(
    "della", _della, DellaModelParams, DellaParams, needs_base=True, random=True,
    weight_required=True, doc="magnitude-ranked random keep (density ± epsilon), L1 rescale, TIES sign election"))
DELLA_LINEAR = register(MergeMethod(
    "della_linear", _della_linear, DellaModelParams, DellaLinearParams, needs_base=True, random=True,
    weight_required=True, doc="magnitude-ranked random keep (density ± epsilon), L1 rescale, task arithmetic"))
SCE = register(MergeMethod(
    "sce", _sce, NoModelParams, SceParams, needs_base=True,
    doc="select high-variance entries, weight models by task-vector energy, erase sign conflicts"))
