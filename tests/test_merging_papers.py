"""PCB, STAR and TSV against numbers worked by hand from each paper's rule (see the comments)."""

from __future__ import annotations

import math

import torch

from evomerge.merging import MERGE_METHODS

T = torch.tensor


def run(name: str, base, tensors, per_model=None, **params):
    method = MERGE_METHODS.get(name)
    models = [method.model_params.model_validate(p) for p in (per_model or [{}] * len(tensors))]
    return method(base, tensors, models, method.params(**params), key="w")


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float32), rtol=1e-5, atol=atol)


# ---- PCB ----------------------------------------------------------------------------------------

def test_pcb_balance_drop_and_weighted_mean_by_hand():
    t1, t2 = [1.0, -2.0, 3.0, 0.5], [2.0, 1.0, -1.0, 0.5]
    n = 2
    # outlier clamp of |τ| to sorted[int(4 · 1e-4)] = the smallest and sorted[int(4 · 0.9999 − 1)] =
    # sorted[2], the second largest: |τ1| = [1, 2, 3, .5] -> [1, 2, 2, .5]; |τ2| [2, 1, 1, .5] -> [1, 1, 1, .5]
    c1, c2 = [1.0, -2.0, 2.0, 0.5], [1.0, 1.0, -1.0, 0.5]  # sign(τ) · clamped |τ|
    # intra: clamped |τ| min-max scaled, squared, exp(n ·): [1/3, 1, 1, 0] and [1, 1, 1, 0]
    intra1 = [math.exp(n * v * v) for v in (1 / 3, 1.0, 1.0, 0.0)]
    intra2 = [math.exp(n * v * v) for v in (1.0, 1.0, 1.0, 0.0)]
    # inter: tanh(τ_i · Σ τ), Σ τ = [3, -1, 2, 1]
    total = [3.0, -1.0, 2.0, 1.0]
    b1 = [a * math.tanh(x * s) for a, x, s in zip(intra1, t1, total)]
    b2 = [a * math.tanh(x * s) for a, x, s in zip(intra2, t2, total)]

    def keep(scores, density):  # clamp below sorted[int(4 (1 - density))], min-max to [0, 1]
        floor = sorted(scores)[int(4 * (1 - density))]
        top = max(scores)
        return [(max(v, floor) - floor) / (top - floor) for v in scores]

    s1, s2 = keep(b1, 0.5), keep(b2, 0.5)
    # merged = Σ s τ_clamped / Σ s (0 where Σ s = 0)
    want = [(a * x + b * y) / (a + b) if a + b > 0 else 0.0 for a, x, b, y in zip(s1, c1, s2, c2)]
    base = torch.ones(4)
    pm = [{"density": 0.5}, {"density": 0.5}]
    close(run("pcb", base, [base + T(t1), base + T(t2)], pm), [1 + v for v in want])
    # entry 2 conflicts (τ2 = -1 against Σ = 2): τ2's score there is negative, so only τ1 counts
    assert s2[2] == 0.0 and s1[2] > 0 and want[2] == 2.0
    # weight scales a model's contribution in the numerator, λ the whole merged task vector
    pm = [{"density": 0.5, "weight": 2.0}, {"density": 0.5}]
    want2 = [(2 * a * x + b * y) / (a + b) if a + b > 0 else 0.0 for a, x, b, y in zip(s1, c1, s2, c2)]
    close(run("pcb", base, [base + T(t1), base + T(t2)], pm, **{"lambda": 0.5}), [1 + 0.5 * v for v in want2])


# ---- STAR ---------------------------------------------------------------------------------------

def test_star_truncates_to_eta_percent_of_the_nuclear_norm_and_rescales():
    # τ1 = diag(1, 4, 2): σ = [4, 2, 1], Σσ = 7. eta 40: 2.8 is reached by the first (4): keep σ=4,
    # rescaled to 7 -> 7 at (1, 1). τ2 = 5 at (2, 2): σ = [5, 0, 0], kept as is.
    base = torch.zeros(3, 3)
    t1, t2 = torch.diag(T([1.0, 4.0, 2.0])), torch.zeros(3, 3)
    t2[2, 2] = 5.0
    want = torch.zeros(3, 3)
    want[1, 1], want[2, 2] = 7 / 2, 5 / 2  # averaged over the two models
    close(run("star", base, [t1, t2]), want)
    # eta 60: 4.2 needs 4 + 2: keep [4, 2] scaled by 7/6 -> 14/3 at (1, 1) and 7/3 at (2, 2)
    want = torch.zeros(3, 3)
    want[1, 1], want[2, 2] = (14 / 3) / 2, (7 / 3 + 5) / 2
    close(run("star", base, [t1, t2], eta=60), want)
    # a rotated rank-2 matrix: τ = 3 u1 v1ᵀ + 1 u2 v2ᵀ; eta 50 keeps 3 only, rescaled to 4
    u1, u2 = T([0.6, 0.8]), T([-0.8, 0.6])
    v1, v2 = T([1.0, 0.0]), T([0.0, 1.0])
    tau = 3 * torch.outer(u1, v1) + torch.outer(u2, v2)
    close(run("star", torch.zeros(2, 2), [tau], eta=50), 4 * torch.outer(u1, v1))
    # vectors are averaged untouched
    close(run("star", torch.zeros(3), [T([1.0, 2.0, 3.0]), T([3.0, 2.0, 1.0])]), [2.0, 2.0, 2.0])


# ---- TSV ----------------------------------------------------------------------------------------

def polar2(m: torch.Tensor) -> torch.Tensor:
    """Closed form of the nearest rotation/reflection to a 2×2 matrix: M + sign(det) adj(M)ᵀ, normalised."""
    a, b, c, d = (float(x) for x in m.reshape(-1))
    s = 1.0 if a * d - b * c > 0 else -1.0
    r = T([[a + s * d, b - s * c], [c - s * b, d + s * a]])
    return r / torch.linalg.norm(r[:, 0])


def test_tsv_orthogonal_tasks_keep_their_top_direction():
    # 2 tasks on 2×2: each keeps ⌊2/2⌋ = 1 triplet. τ1 = diag(3, 1) keeps 3 e1 e1ᵀ, τ2 = diag(0.5, 2)
    # keeps 2 e2 e2ᵀ; [e1 e2] is already orthonormal, so the merge is diag(3, 2)
    close(run("tsv", torch.zeros(2, 2), [torch.diag(T([3.0, 1.0])), torch.diag(T([0.5, 2.0]))]),
          torch.diag(T([3.0, 2.0])))


def test_tsv_orthogonalises_interfering_singular_vectors():
    # τ1 = 3 e1 e1ᵀ; τ2 = 2 u vᵀ with u = (1, 1)/√2, v = (1, -1)/√2: the left vectors [e1, u]
    # and the right rows [e1ᵀ; vᵀ] overlap, and are replaced by their nearest orthonormal sets
    r = 1 / math.sqrt(2)
    u, v = T([r, r]), T([r, -r])
    t1, t2 = 3 * torch.outer(T([1.0, 0.0]), T([1.0, 0.0])), 2 * torch.outer(u, v)
    left = polar2(T([[1.0, r], [0.0, r]]))        # columns e1, u
    right = polar2(T([[1.0, 0.0], [r, -r]]))      # rows e1ᵀ, vᵀ
    want = left @ torch.diag(T([3.0, 2.0])) @ right
    base = torch.full((2, 2), 0.5)
    close(run("tsv", base, [base + t1, base + t2]), base + want)
    close(run("tsv", base, [base + t1, base + t2], **{"lambda": 0.5}), base + 0.5 * want)
    # the orthogonalised directions really are orthonormal, and differ from the raw ones
    torch.testing.assert_close(left.T @ left, torch.eye(2), rtol=0, atol=1e-6)
    assert not torch.allclose(want, t1 + t2, atol=1e-3)
    # vectors: mean of the task vectors
    close(run("tsv", torch.zeros(2), [T([1.0, 3.0]), T([3.0, 1.0])]), [2.0, 2.0])
