"""The M2N2 selection rules as pure functions of the score matrix S[k, j].

Kept separate from the strategy class so each rule can be checked against hand-worked numbers.
Empty archive slots are rows of zeros, which give them zero fitness and zero attraction.
"""

from __future__ import annotations

import numpy as np


def shared_scores(scores: np.ndarray, alpha: float) -> np.ndarray:
    """F[k, j] = S[k, j] / z_j**alpha with z_j = sum_k S[k, j]; 0 where z_j = 0 (competition)."""
    scores = np.asarray(scores, dtype=np.float64)
    load = scores.sum(axis=0)
    shared = np.zeros_like(scores)
    covered = load > 0
    shared[:, covered] = scores[:, covered] / load[covered] ** alpha
    return shared


def niche_fitness(scores: np.ndarray, alpha: float) -> np.ndarray:
    return shared_scores(scores, alpha).sum(axis=1)


def attraction(shared: np.ndarray, parent_a: int) -> np.ndarray:
    """g_k = sum_j max(0, F[k, j] - F[A, j]): reward for covering what A misses."""
    return np.maximum(0.0, shared - shared[parent_a]).sum(axis=1)


def choose_parents(
    scores: np.ndarray,
    filled: np.ndarray,
    alpha: float,
    use_attraction: bool,
    rng: np.random.Generator,
) -> tuple[int, int]:
    """Draw parent A by shared fitness, then B by attraction to A (or by fitness when disabled)."""
    shared = shared_scores(scores, alpha)
    fitness = shared.sum(axis=1)
    slots = np.flatnonzero(filled)
    if slots.size == 0:
        raise ValueError("cannot choose parents from an empty archive")
    a = int(_draw(rng, fitness, slots))
    if use_attraction:
        pull = attraction(shared, a)
        others = slots[slots != a]
        if pull.sum() > 0:
            b = int(_draw(rng, pull, slots))
        elif others.size:
            # Nothing covers what A misses: the reference code divides 0 by 0 here.
            b = int(rng.choice(others))
        else:
            b = a
    else:
        b = int(_draw(rng, fitness, slots))
    return a, b


def _draw(rng: np.random.Generator, weights: np.ndarray, slots: np.ndarray) -> int:
    """Draw a slot with probability proportional to weight; uniform over `slots` if all are zero."""
    w = np.clip(weights[slots], 0.0, None)
    total = w.sum()
    if total <= 0 or not np.isfinite(total):
        return int(rng.choice(slots))
    return int(rng.choice(slots, p=w / total))


def replacement_slot(scores: np.ndarray, child_scores: np.ndarray, alpha: float,
                     filled: np.ndarray | None = None) -> int | None:
    """Slot the child replaces, or None if the child itself is the least fit.

    The child's row counts in the load z. Ties drop existing members first (lowest index), so a
    child that merely ties the weakest member still enters. Empty slots fill first: the reference
    code lets argmin evict a member that scores 0 everywhere while empty slots remain, which
    would silently drop a pretrained seed that scores 0 on an exact-match task.
    """
    if filled is not None and not np.all(filled):
        return int(np.argmin(filled))
    extended = np.vstack([scores, np.asarray(child_scores, dtype=np.float64)[None, :]])
    worst = int(np.argmin(niche_fitness(extended, alpha)))
    return None if worst == scores.shape[0] else worst
