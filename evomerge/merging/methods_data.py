"""Merges that need data: each model's statistics on its own examples (`data:` in the merge YAML).

- fisher — Fisher-weighted averaging, "Merging Models with Fisher-Weighted Averaging" (Matena &
  Raffel, NeurIPS 2022, arXiv:2111.09832): θ = Σ_i w_i F_i θ_i / Σ_i w_i F_i per entry, F_i the
  diagonal (empirical) Fisher of model i on its examples, floored at `fisher_floor` so entries no
  model's data touches fall back to the weighted average.
- regmean — RegMean, "Dataless Knowledge Fusion by Merging Weights of Language Models" (Jin et
  al., ICLR 2023, arXiv:2212.09849): for each linear layer (y = W x) the closed form of
  min Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖², W = (Σ_i W_i G_i)(Σ_i G_i)⁻¹ with G_i = X_iᵀ X_i the Gram matrix
  of the layer's inputs in model i; off-diagonal entries of each G_i are scaled by `alpha`
  (the paper's 0.9) to keep the solve well conditioned. Every other tensor is averaged.

The statistics come from `evomerge.merging.statistics`; `evomerge merge` computes them.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from pydantic import Field

from evomerge.merging import ops
from evomerge.merging.methods import MergeMethod, NoModelParams, Params, WeightParams, register

Tensor = torch.Tensor


class FisherParams(Params):
    fisher_floor: float = Field(1e-6, ge=0, description="added to every Fisher entry (no data: plain average)")
    num_examples: int = Field(64, ge=1, description="examples read from each model's data file")


class RegMeanParams(Params):
    alpha: float = Field(0.9, ge=0, le=1, description="scale of the Gram matrices' off-diagonal entries")
    num_examples: int = Field(64, ge=1, description="examples read from each model's data file")


def fisher_average(tensors: Sequence[Tensor], fishers: Sequence[Optional[Tensor]], weights: Sequence[float],
                   floor: float) -> Tensor:
    xs = [ops.as_f32(x) for x in tensors]
    if any(f is None for f in fishers):
        return ops.weighted_sum(xs, weights, normalize=True)
    num = torch.zeros_like(xs[0])
    den = torch.zeros_like(xs[0])
    for x, f, w in zip(xs, fishers, weights):
        fw = float(w) * (ops.as_f32(f).reshape(x.shape) + floor)
        num += fw * x
        den += fw
    return num / den


def _fisher(base: Optional[Tensor], tensors: Sequence[Tensor], per_model: Sequence[Any], params: Any, key: str,
            stats: Sequence[Optional[Tensor]]) -> Tensor:
    return fisher_average(tensors, stats, [p.weight for p in per_model], params.fisher_floor)


def regmean(tensors: Sequence[Tensor], grams: Sequence[Optional[Tensor]], alpha: float) -> Tensor:
    xs = [ops.as_f32(x) for x in tensors]
    if xs[0].dim() != 2 or any(g is None for g in grams):
        return sum(xs) / len(xs)
    total = None
    rhs = None
    for w, g in zip(xs, grams):
        g = g.double()
        g = alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))
        total = g if total is None else total + g
        term = g @ w.double().T  # G_i W_iᵀ (G symmetric)
        rhs = term if rhs is None else rhs + term
    return torch.linalg.solve(total, rhs).T.to(torch.float32)


def _regmean(base: Optional[Tensor], tensors: Sequence[Tensor], per_model: Sequence[Any], params: Any, key: str,
             stats: Sequence[Optional[Tensor]]) -> Tensor:
    return regmean(tensors, stats, params.alpha)


FISHER = register(MergeMethod(
    "fisher", _fisher, WeightParams, FisherParams, needs_base=False, data_kind="fisher",
    doc="Fisher-weighted average of the models (diagonal Fisher on each model's own data)"))
REGMEAN = register(MergeMethod(
    "regmean", _regmean, NoModelParams, RegMeanParams, needs_base=False, data_kind="gram",
    doc="per linear layer, the least-squares merge from each model's input Gram matrix"))
