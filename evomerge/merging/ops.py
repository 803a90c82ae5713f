"""Pure per-tensor merge math: float32 tensors in, float32 tensor out, no configs.

These are the building blocks of every static merge method. They work on one tensor at a time so
the same code serves one-shot baselines (`evomerge merge`), layerwise genomes (one coefficient
set per layer group) and tests with hand-computed numbers.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch


Tensor = torch.Tensor

_DOT_CHUNK = 1 << 22  # elements per float64 chunk: bounds the extra memory of an exact dot product
_DIVISOR_EPS = 1e-8  # mergekit's guard: a (near-)zero weight sum is left undivided


def as_f32(tensor: Tensor) -> Tensor:
    """Upcast to float32 (bf16/f16 checkpoints) without copying tensors that already are."""
    return tensor if tensor.dtype == torch.float32 else tensor.to(torch.float32)


def _weights_like(weights: Sequence[float], stacked: Tensor) -> Tensor:
    w = torch.tensor(list(weights), dtype=torch.float32, device=stacked.device)
    return w.view(-1, *([1] * (stacked.dim() - 1)))


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float], normalize: bool) -> Tensor:
    """Σ w_i x_i, divided by Σ w_i when `normalize` (a model soup when x_i are whole weights)."""
    if len(tensors) != len(weights):
        raise ValueError(f"{len(tensors)} tensors but {len(weights)} weights")
    out = torch.zeros_like(as_f32(tensors[0]))
    for x, w in zip(tensors, weights):
        out.add_(as_f32(x), alpha=float(w))
    if normalize:
        total = math.fsum(float(w) for w in weights)
        if abs(total) < _DIVISOR_EPS:
            raise ValueError(f"weights {list(weights)} sum to 0, so they cannot be normalised; "
                             "set normalize: false or change the weights")
        out.div_(total)
    return out


def exact_dot(a: Tensor, b: Tensor) -> float:
    """Float64 dot product in fixed-size chunks: exact enough for angles, bounded memory."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    total = 0.0
    for lo in range(0, fa.numel(), _DOT_CHUNK):
        hi = lo + _DOT_CHUNK
        total += float(torch.dot(fa[lo:hi].double(), fb[lo:hi].double()))
    return total


def tensor_angle(a: Tensor, b: Tensor) -> float:
    """Angle between the two tensors flattened; 0 when either is all zeros (then slerp is linear)."""
    norm = math.sqrt(exact_dot(a, a)) * math.sqrt(exact_dot(b, b))
    if norm == 0.0:
        return 0.0
    return math.acos(min(1.0, max(-1.0, exact_dot(a, b) / norm)))


SLERP_DOT_THRESHOLD = 0.9995  # mergekit's: above this |cos| the two tensors count as parallel
_SLERP_NORM_EPS = 1e-8  # mergekit's: a tensor with a smaller norm is not normalised for the cosine


def slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Spherical interpolation from `a` (t=0) to `b` (t=1), angle over the whole flattened tensor.

    mergekit's rule, so a mergekit slerp YAML gives mergekit's tensors: the cosine is taken between
    the normalised tensors (one with norm <= 1e-8 is used as is) and, when |cos| > 0.9995, the
    result is the linear interpolation (1 - t) a + t b. Norm weights of fine-tunes of one base
    sit right there (cosine ~0.9996), so the threshold decides what they become. The M2N2
    crossover keeps its own, tighter fallback (`evomerge.genomes.dense.slerp_weights`).
    """
    a32, b32 = as_f32(a), as_f32(b)
    t = float(t)
    na, nb = math.sqrt(exact_dot(a32, a32)), math.sqrt(exact_dot(b32, b32))
    dot = exact_dot(a32, b32) / ((na if na > _SLERP_NORM_EPS else 1.0) * (nb if nb > _SLERP_NORM_EPS else 1.0))
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return (1 - t) * a32 + t * b32
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return a32 * (math.sin(theta - theta * t) / sin_theta) + b32 * (math.sin(theta * t) / sin_theta)


def l1_rescaled(tau: Tensor, kept: Tensor, eps: float = 1e-7) -> Tensor:
    """`kept` (a masked `tau`) scaled back to tau's L1 norm: mergekit's `rescale: true`.

    Left as is when either norm is below 1e-7 (nothing to match, or nothing kept).
    """
    before, after = float(tau.abs().sum()), float(kept.abs().sum())
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def task_vectors(base: Tensor, tensors: Sequence[Tensor]) -> list[Tensor]:
    """τ_i = θ_i − θ_base in float32."""
    b32 = as_f32(base)
    return [as_f32(x) - b32 for x in tensors]


def keep_count(density: float, numel: int) -> int:
    """How many elements a `density` keeps: int(density·n), at least 1 (mergekit's TIES rule).

    The floor of 1 stops a small tensor (a norm vector at low density) from losing its whole task
    vector. Float rounding is not forgiven: 0.29·100 = 28.999… keeps 28, as in mergekit, so a
    mergekit YAML keeps the same entries here.
    """
    return max(1, min(numel, int(density * numel)))


def magnitude_trim(tau: Tensor, density: float) -> Tensor:
    """TIES trim: keep the top `density` fraction of |τ|, zero the rest.

    Exactly k = keep_count(density, n) elements survive; among equal magnitudes at the cut-off the
    lower flat index wins, so the result never depends on the sort implementation.
    """
    if density >= 1.0:
        return tau
    n = tau.numel()
    k = keep_count(density, n)
    mag = tau.abs().reshape(-1)
    threshold = torch.kthvalue(mag.cpu(), n - k + 1).values.to(mag.device)  # k-th largest
    keep = mag > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        keep[(mag == threshold).nonzero().reshape(-1)[:missing]] = True
    return (tau.reshape(-1) * keep).view_as(tau)


def dare_seed(seed: int, key: str, index: int) -> int:
    """Generator seed for model `index`'s drop mask on tensor `key`.

    Mixing in the tensor name keeps same-shaped layers from sharing one drop pattern, and mixing
    in the model index keeps each model's mask fixed when other models are added or removed.
    """
    digest = hashlib.sha256(f"{seed}:{key}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def uniform_draws(shape: torch.Size | Sequence[int], generator: torch.Generator) -> Tensor:
    """U[0, 1) per element, on the CPU so a seed gives the same masks on every device.

    Every random method keeps an entry where its draw is below the keep probability, so this one
    function is all that is random: the mergekit parity test swaps it for fixed draws.
    """
    return torch.rand(tuple(shape), generator=generator, dtype=torch.float32)


def dare_mask(shape: torch.Size | Sequence[int], density: float, generator: torch.Generator) -> Tensor:
    """Bernoulli(density) keep-mask."""
    return uniform_draws(shape, generator) < density


def dare_drop(tau: Tensor, density: float, rescale: bool, generator: torch.Generator) -> Tensor:
    """DARE: drop each element with probability 1 − density; `rescale` restores tau's L1 norm.

    The paper divides the survivors by density, which keeps the expectation; mergekit (0.1.5)
    scales them back to the task vector's L1 norm instead, exactly rather than on average, and a
    mergekit YAML has to mean the same here.
    """
    if density >= 1.0:
        return tau
    kept = tau * dare_mask(tau.shape, density, generator).to(tau.device)
    return l1_rescaled(tau, kept) if rescale else kept


def linear_combine(taus: Sequence[Tensor], weights: Sequence[float], normalize: bool) -> Tensor:
    """Σ w_i τ_i, divided by Σ w_i when `normalize` (left undivided when that sum is ~0, as mergekit)."""
    out = torch.zeros_like(taus[0])
    for tau, w in zip(taus, weights):
        out.add_(tau, alpha=float(w))
    total = math.fsum(float(w) for w in weights)
    if normalize and abs(total) >= _DIVISOR_EPS:
        out.div_(total)
    return out


def ties_combine(taus: Sequence[Tensor], weights: Sequence[float], normalize: bool) -> Tensor:
    """TIES sign election ("sum" method) and disjoint merge of already-trimmed task vectors.

    Elected sign per element: sign(Σ w_i τ_i), with 0 counted as +. A model contributes w_i τ_i
    only where its weighted entry has the elected sign (trimmed zeros never agree). With
    `normalize`, divide by the summed weights of the agreeing entries (1 where none agree).
    """
    stacked = torch.stack(list(taus))
    w = _weights_like(weights, stacked)
    weighted = stacked * w
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = weighted.sign() == elected
    merged = (weighted * agree).sum(0)
    if normalize:
        divisor = (w * agree).sum(0)
        merged = merged / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return merged
