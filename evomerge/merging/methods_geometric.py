"""mergekit's geometric methods: model_stock, nuslerp, multislerp, karcher.

They treat a tensor (or each of its rows) as a point or direction and interpolate on the sphere
or by angle, instead of adding weighted task vectors. Names, parameters, defaults, epsilons and
the order of operations follow mergekit, in float32, so a mergekit YAML gives its tensors:

- model_stock (Jang et al. 2024, arXiv:2403.19522): move from the base towards the models' mean
  by t = N cos θ / (1 + (N − 1) cos θ), θ the mean pairwise angle between task vectors (t = 0,
  the base, where that denominator vanishes).
- nuslerp: slerp between exactly two models (or their task vectors when a base is given) at
  t = w₂ / (w₁ + w₂), over the flattened tensor or row by row.
- multislerp: barycentric interpolation of any number of models on the unit sphere (tangent
  space at the weighted mean, exponential map back), scaled by the weighted mean norm.
- karcher: the Riemannian (Karcher) mean of all models' directions, equal weights, scaled by
  their mean norm; a given base_model is one more model, as in mergekit.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from pydantic import Field

from evomerge.merging import ops
from evomerge.merging.methods import MergeMethod, NoModelParams, Params, WeightParams, register

Tensor = torch.Tensor


class ModelStockParams(Params):
    filter_wise: bool = Field(False, description="one angle per row instead of one per tensor")


class NuSlerpParams(Params):
    nuslerp_row_wise: bool = Field(False, description="slerp each column vector (dim 0) instead of each row")
    nuslerp_flatten: bool = Field(True, description="slerp the flattened tensor as one vector (wins over row-wise)")


class MultiSlerpParams(Params):
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, gt=0, description="guard added to norms before dividing")


class KarcherParams(Params):
    max_iter: int = Field(10, ge=0, description="iterations of the Karcher mean")
    tol: float = Field(1e-5, gt=0, description="convergence tolerance (and minimum norm of a model kept)")


_NUSLERP_EPS = 1e-8  # mergekit's: 1 − cos² at most eps² counts as (anti)parallel
_STOCK_SINGULAR = 1e-6  # mergekit's: |1 + (N − 1) cos θ| below this gives t = 0


# ---- model_stock ---------------------------------------------------------------------------------

def model_stock(base: Tensor, tensors: Sequence[Tensor], filter_wise: bool) -> Tensor:
    w0 = ops.as_f32(base)
    ws = [ops.as_f32(x) for x in tensors]
    shape = w0.shape
    if filter_wise:
        if w0.dim() == 1:  # a bias or norm vector is one row
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norms = torch.norm(offsets[i], dim=-1) * torch.norm(offsets[j], dim=-1)
            cosines.append(((offsets[i] * offsets[j]).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < _STOCK_SINGULAR  # opposed task vectors: no finite t, keep the base
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))
    mean = sum(ws) / n
    return (t * mean + (1 - t) * w0).reshape(shape)


def _model_stock(base: Optional[Tensor], tensors: Sequence[Tensor], per_model: Sequence[Any], params: Any,
                 key: str) -> Tensor:
    return model_stock(base, tensors, params.filter_wise)


# ---- nuslerp -------------------------------------------------------------------------------------

def nuslerp(t: float, v0: Tensor, v1: Tensor, row_wise: bool, flatten: bool) -> Tensor:
    """Slerp along the last dim (dim 0 when row-wise, the whole tensor when flattened).

    Vectors with 1 − cos²θ <= 1e-16 are linearly interpolated, mergekit's test. It is not
    |sin θ| < 1e-8: in float32 sin(acos(−1)) is −8.7e-8, so antipodal vectors would be divided
    by it instead of interpolated. No 0.9995 threshold here, unlike slerp.
    """
    shape = v0.shape
    transpose = not flatten and row_wise and v0.dim() > 1
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif transpose:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= _NUSLERP_EPS ** 2
    theta = torch.acos(torch.where(colinear, 0.0, cos))  # keeps the unused branch finite
    sin_theta = torch.sin(theta)
    curved = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    straight = (1 - t) * v0 + t * v1
    out = torch.where(colinear, straight, curved)
    if transpose:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def _nuslerp(base: Optional[Tensor], tensors: Sequence[Tensor], per_model: Sequence[Any], params: Any,
             key: str) -> Tensor:
    w0, w1 = per_model[0].weight, per_model[1].weight
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    a, b = ops.as_f32(tensors[0]), ops.as_f32(tensors[1])
    if base is None:
        return nuslerp(t, a, b, params.nuslerp_row_wise, params.nuslerp_flatten)
    b32 = ops.as_f32(base)
    return b32 + nuslerp(t, a - b32, b - b32, params.nuslerp_row_wise, params.nuslerp_flatten)


# ---- multislerp ----------------------------------------------------------------------------------

def multislerp(tensors: Sequence[Tensor], weights: Sequence[float], base: Optional[Tensor],
               normalize_weights: bool, eps: float) -> Tensor:
    if len(tensors) == 1:
        return ops.as_f32(tensors[0])
    stacked = torch.stack([ops.as_f32(x) for x in tensors])
    b32 = None if base is None else ops.as_f32(base)
    if b32 is not None:
        stacked = stacked - b32
    flat = stacked.reshape(stacked.shape[0], -1)
    w = torch.tensor(list(weights), dtype=torch.float32, device=flat.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] != 2:
            raise ValueError("multislerp: the weighted mean of the models' directions is zero (antipodal "
                             "models with balancing weights); change `weight`")
        out = stacked[0] * w[0] + stacked[1] * w[1]
        return out if b32 is None else out + b32
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangents * w.view(-1, 1)).sum(0)
    step_norm = torch.norm(step) + eps
    point = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
    out = (point * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])
    return out if b32 is None else out + b32


def _multislerp(base: Optional[Tensor], tensors: Sequence[Tensor], per_model: Sequence[Any], params: Any,
                key: str) -> Tensor:
    return multislerp(tensors, [p.weight for p in per_model], base, params.normalize_weights, params.eps)


# ---- karcher -------------------------------------------------------------------------------------

def karcher_mean(tensors: Sequence[Tensor], max_iter: int, tol: float) -> Tensor:
    """Equal-weight Karcher mean of the directions times the mean norm (zero tensors count 0)."""
    xs = [ops.as_f32(x) for x in tensors]
    alpha = 1.0 / len(xs)
    norms = [float(torch.linalg.norm(x)) for x in xs]
    units = [x / torch.linalg.norm(x) if n != 0.0 else torch.zeros_like(x) for x, n in zip(xs, norms)]
    valid = [u for u, n in zip(units, norms) if n > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    a = 1.0 / len(valid)  # alpha / Σ valid alphas, all alphas equal
    u = torch.zeros_like(valid[0])
    for ui in valid:
        u += a * ui
    norm_u = float(torch.linalg.norm(u))
    u = valid[0].clone() if norm_u < tol else u / norm_u
    for _ in range(max_iter):
        step = torch.zeros_like(u)
        for ui in valid:
            dot = torch.clamp(torch.dot(u.reshape(-1), ui.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            step += a * (theta / torch.sin(theta)) * (ui - dot * u)
        step_norm = torch.linalg.norm(step)
        if float(step_norm) < tol:
            break
        u = torch.cos(step_norm) * u + torch.sin(step_norm) * (step / step_norm)
        u_norm = torch.linalg.norm(u)
        if float(u_norm) > tol:
            u = u / u_norm
    scale = 0.0
    for n in norms:
        scale += alpha * n
    return scale * u


def _karcher(base: Optional[Tensor], tensors: Sequence[Tensor], per_model: Sequence[Any], params: Any,
             key: str) -> Tensor:
    if len(tensors) == 1:
        return ops.as_f32(tensors[0])
    return karcher_mean(tensors, params.max_iter, params.tol)


MODEL_STOCK = register(MergeMethod(
    "model_stock", _model_stock, NoModelParams, ModelStockParams, needs_base=True, min_tensors=2,
    doc="base + t (mean − base), t from the mean angle between task vectors"))
NUSLERP = register(MergeMethod(
    "nuslerp", _nuslerp, WeightParams, NuSlerpParams, needs_base=False, base_optional=True, weight_required=True,
    min_tensors=2, max_tensors=2, doc="slerp of two models (task vectors with a base) at w2 / (w1 + w2)"))
MULTISLERP = register(MergeMethod(
    "multislerp", _multislerp, WeightParams, MultiSlerpParams, needs_base=False, base_optional=True,
    weight_required=True, doc="weighted barycentre of any number of models on the hypersphere"))
KARCHER = register(MergeMethod(
    "karcher", _karcher, NoModelParams, KarcherParams, needs_base=False, base_is_model=True,
    doc="Riemannian (Karcher) mean of the models' directions times their mean norm"))
