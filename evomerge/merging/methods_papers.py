"""Merge methods from the literature that mergekit does not have: pcb, star, tsv.

All three merge task vectors τ_i = θ_i − θ_base against a base model, one tensor at a time.

- pcb — PCB-merging, "Parameter Competition Balancing for Model Merging" (Du et al., NeurIPS
  2024, arXiv:2410.02396). Each entry of each task vector gets a balance score: intra-balancing
  exp(N · minmax(|τ_i|)²) (how large the entry is within its own task vector, N models) times
  inter-balancing tanh(τ_i · Σ_j τ_j) (whether it agrees with the others), as in the authors'
  released code. Per model, scores below the (1 − density) quantile are dropped, the rest
  min-max scaled to [0, 1], and the task vectors are averaged with those scores as weights.
  |τ| is first clamped to its sorted[int(d·1e-4)] and sorted[int(d·0.9999) − 1] values, as the
  authors do (0.01% quantiles; below 10,000 entries that caps the largest at the second largest).
- star — STAR, "Spectral Truncation and Rescale for Model Merging" (Lee et al., NAACL 2025,
  arXiv:2502.10339). Each task matrix keeps the fewest top singular values whose sum reaches
  `eta` percent of its nuclear norm, rescaled so the nuclear norm is unchanged; the truncated
  task vectors are then averaged. Vectors (norms, biases) are averaged as they are.
- tsv — TSV-Merge, "Task Singular Vectors: Reducing Task Interference in Model Merging"
  (Gargiulo et al., CVPR 2025, arXiv:2412.00081). Each of the N task matrices keeps its top
  ⌊r/N⌋ singular triplets (r = min(rows, cols)); the kept left and right singular vectors of all
  tasks are concatenated and each set replaced by its nearest orthonormal set (the polar factor
  P Qᵀ of its SVD P S Qᵀ), which removes the interference between tasks; the result is
  U⊥ diag(σ) V⊥ᵀ. Vectors are averaged. `lambda` scales the merged task vector (the paper's α).

Per-model `weight` scales a model's task vector (1 reproduces each paper), so CMA-ES layerwise
genomes can search over them; `density` is PCB's per-model keep ratio.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from pydantic import Field

from evomerge.merging import ops
from evomerge.merging.methods import MergeMethod, Params, WeightParams, register

Tensor = torch.Tensor
_OUTLIER_QUANTILE = 1e-4  # PCB's clamp of |τ| to its 0.01% .. 99.99% quantiles


class PcbModelParams(WeightParams):
    density: float = Field(0.1, gt=0, le=1, description="fraction of entries kept by balance score (PCB's ratio)")


class ScaleParams(Params):
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged task vector")


class StarParams(ScaleParams):
    eta: float = Field(40.0, gt=0, le=100, description="percent of each task matrix's nuclear norm kept")


def _minmax(x: Tensor) -> Tensor:
    """(x − min)/(max − min) along the last dim; a constant row becomes 0 (no entry stands out)."""
    lo = x.min(dim=-1, keepdim=True).values
    span = x.max(dim=-1, keepdim=True).values - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(x))


def _quantile_clamp(x: Tensor, low: float, high: float) -> Tensor:
    """Clamp each row to its sorted[int(d·low)] .. sorted[int(d·(1 − high)) − 1] values (PCB's rule)."""
    d = x.shape[-1]
    ordered = torch.sort(x, dim=-1).values
    lo = ordered[..., int(d * low)].unsqueeze(-1)
    hi = ordered[..., max(0, int(d * (1 - high)) - 1)].unsqueeze(-1)
    return torch.minimum(torch.maximum(x, lo), hi)


def pcb_scores(taus: Tensor, densities: Sequence[float]) -> tuple[Tensor, Tensor]:
    """(clamped task vectors, balance weights in [0, 1]) for flattened task vectors (N, d)."""
    n = taus.shape[0]
    mags = _quantile_clamp(taus.abs(), _OUTLIER_QUANTILE, _OUTLIER_QUANTILE)
    clamped = torch.sign(taus) * mags
    intra = torch.exp(n * _minmax(mags) ** 2)
    inter = torch.tanh(taus * taus.sum(dim=0))
    balance = intra * inter
    rows = [_minmax(_quantile_clamp(balance[i], 1 - float(density), 0.0)) for i, density in enumerate(densities)]
    return clamped, torch.stack(rows)


def _pcb(base: Optional[Tensor], tensors: Sequence[Tensor], per_model: Sequence[Any], params: Any,
         key: str) -> Tensor:
    b32 = ops.as_f32(base)
    taus = torch.stack([t.reshape(-1) for t in ops.task_vectors(base, tensors)])
    clamped, scale = pcb_scores(taus, [p.density for p in per_model])
    w = torch.tensor([p.weight for p in per_model], dtype=torch.float32).view(-1, 1)
    merged = (w * clamped * scale).sum(0) / scale.sum(0).clamp(min=1e-12)
    return b32 + params.lambda_ * merged.view_as(b32)


def _as_matrix(x: Tensor) -> Optional[Tensor]:
    """A task vector as a matrix for its SVD (conv kernels flattened per output row); None for vectors."""
    if x.dim() < 2:
        return None
    return x if x.dim() == 2 else x.reshape(x.shape[0], -1)


def star_truncate(tau: Tensor, eta: float) -> Tensor:
    """Keep the top singular values up to `eta`% of Σσ (the first whose running sum reaches it
    included), scaled by Σσ / Σσ_kept."""
    matrix = _as_matrix(tau)
    if matrix is None:
        return tau
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    total = s.sum()
    if float(total) == 0.0:
        return tau
    r = min(s.numel(), int(torch.searchsorted(torch.cumsum(s, 0), total * (eta / 100.0))) + 1)
    kept = s[:r] * (total / s[:r].sum())
    return (u[:, :r] @ torch.diag(kept) @ vh[:r]).reshape(tau.shape)


def _weighted_mean(taus: Sequence[Tensor], per_model: Sequence[Any]) -> Tensor:
    out = torch.zeros_like(taus[0])
    for tau, p in zip(taus, per_model):
        out.add_(tau, alpha=float(p.weight))
    return out / len(taus)


def _star(base: Optional[Tensor], tensors: Sequence[Tensor], per_model: Sequence[Any], params: Any,
          key: str) -> Tensor:
    taus = [star_truncate(tau, params.eta) for tau in ops.task_vectors(base, tensors)]
    return ops.as_f32(base) + params.lambda_ * _weighted_mean(taus, per_model)


def polar_factor(a: Tensor) -> Tensor:
    """The orthonormal matrix nearest to `a` (Frobenius): P Qᵀ from a = P S Qᵀ."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def tsv_merge(taus: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    matrices = [_as_matrix(tau) for tau in taus]
    if matrices[0] is None:
        return _weighted_mean(list(taus), [WeightParams(weight=w) for w in weights])
    rank = min(matrices[0].shape)
    k = max(1, rank // len(matrices))
    us, ss, vhs = [], [], []
    for matrix, w in zip(matrices, weights):
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        us.append(u[:, :k])
        ss.append(float(w) * s[:k])
        vhs.append(vh[:k])
    u_orth = polar_factor(torch.cat(us, dim=1))
    vh_orth = polar_factor(torch.cat(vhs, dim=0))  # rows: the polar factor of the stacked Vᵀ blocks
    return (u_orth @ torch.diag(torch.cat(ss)) @ vh_orth).reshape(taus[0].shape)


def _tsv(base: Optional[Tensor], tensors: Sequence[Tensor], per_model: Sequence[Any], params: Any,
         key: str) -> Tensor:
    merged = tsv_merge(ops.task_vectors(base, tensors), [p.weight for p in per_model])
    return ops.as_f32(base) + params.lambda_ * merged


PCB = register(MergeMethod(
    "pcb", _pcb, PcbModelParams, ScaleParams, needs_base=True,
    doc="PCB-merging: intra/inter balance scores, drop the lowest, score-weighted mean (Du et al. 2024)"))
STAR = register(MergeMethod(
    "star", _star, WeightParams, StarParams, needs_base=True,
    doc="STAR: truncate each task matrix's spectrum to eta% of its nuclear norm, rescale, average"))
TSV = register(MergeMethod(
    "tsv", _tsv, WeightParams, ScaleParams, needs_base=True,
    doc="TSV-Merge: top-1/N singular vectors per task, orthogonalised across tasks (Gargiulo et al. 2025)"))

