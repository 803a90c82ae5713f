"""The M2N2 selection rules as pure functions of the score matrix S[k, j].

Kept separate from the strategy class so each rule can be checked against hand-worked numbers.
Empty archive slots are rows of zeros, which give them zero fitness and zero attraction.
"""

from __future__ import annotations

from typing import Any

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
    return choose_parents_shared(shared, shared.sum(axis=1), filled, use_attraction, rng)


def choose_parents_shared(
    shared: np.ndarray,
    fitness: np.ndarray,
    filled: np.ndarray,
    use_attraction: bool,
    rng: np.random.Generator,
) -> tuple[int, int]:
    """`choose_parents` given F and f already computed (`Niches.choose_parents` makes the same
    draws from caches)."""
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


class _Sampler:
    """Draws a slot with probability proportional to weight; uniform over `slots` if all are zero.

    Exactly `rng.choice(slots, p=w / w.sum())` (same stream, same result; a test pins that), minus
    its argument checks, and with the cumulative weights kept: `Niches` reuses a sampler until
    the archive changes, so a draw costs one random number and a binary search.
    """

    def __init__(self, weights: np.ndarray, slots: np.ndarray) -> None:
        self.slots = slots
        w = np.clip(weights[slots], 0.0, None)
        total = w.sum()
        self.cdf: np.ndarray | None = None
        if total > 0 and np.isfinite(total):
            cdf = np.cumsum(w / total)
            cdf /= cdf[-1]
            self.cdf = cdf

    def draw(self, rng: np.random.Generator) -> int:
        if self.cdf is None:
            return int(rng.choice(self.slots))
        return int(self.slots[self.cdf.searchsorted(rng.random(), side="right")])


def _draw(rng: np.random.Generator, weights: np.ndarray, slots: np.ndarray) -> int:
    return _Sampler(weights, slots).draw(rng)


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


def screen_slot(scores: np.ndarray, child_scores: np.ndarray, indices: np.ndarray, weights: np.ndarray,
                alpha: float, filled: np.ndarray | None = None) -> int | None:
    """The replacement rule on the datapoints a subsampled child was scored on.

    A child observed on the set O (its subset, with draw weights w_j = N_h / m_h, see
    strategies/subsets.py) is compared with the archive on O only, everyone on the same columns:
      - load      z'_j = sum_k S[k, j] + c_j                       for j in O (the child counts)
      - fitness   f'_k = sum_{j in O} w_j S[k, j] / z'_j^alpha     (0 where z'_j = 0), and
                  f'_c = sum_{j in O} w_j c_j / z'_j^alpha for the child.
    The least fit of the archive plus the child loses, ties dropping existing members first (the
    full rule's order); empty slots fill first. S[k, j] is the member's score where known and its
    estimate elsewhere (`estimate_unobserved`, used when `topup: none`). With O the whole set
    every w_j is 1 and this is `replacement_slot`. The weighted sums estimate the full sums
    without bias (Horvitz-Thompson), so the decision is an estimate of the full rule's.
    """
    if filled is not None and not np.all(filled):
        return int(np.argmin(filled))
    idx = np.asarray(indices, dtype=np.int64)
    columns = np.asarray(scores, dtype=np.float64)[:, idx]
    child = np.asarray(child_scores, dtype=np.float64)
    load = columns.sum(axis=0) + child
    denominator = np.where(load > 0, load, 1.0) ** alpha  # where z' = 0 every score is 0 as well
    w = np.asarray(weights, dtype=np.float64) / denominator
    fitness = np.append(columns @ w, child @ w)
    worst = int(np.argmin(fitness))
    return None if worst == columns.shape[0] else worst


def estimate_unobserved(scores: np.ndarray, observed: np.ndarray, filled: np.ndarray) -> np.ndarray:
    """S with every unobserved entry of a filled member estimated (`topup: none`).

    The estimate is a two-way additive model, member ability plus datapoint difficulty:
      m_k = mean of member k's observed scores,
      d_j = mean over the members observed at j of (S[k, j] - m_k)   (0 where nobody is),
      S^[k, j] = clip(m_k + d_j, 0, 1) where k was not observed at j.
    Why not the member's mean alone: that gives every unobserved datapoint the same value, so the
    estimated loads z_j of rarely observed datapoints all look alike and the niches the
    competition is about blur into one. The difficulty term keeps a datapoint that the members
    observed on mostly miss looking uncontested. It is closed-form (no fitting loop in the
    population actor) and, with every entry observed, returns S unchanged. Empty slots stay 0.
    """
    scores = np.asarray(scores, dtype=np.float64)
    mask = np.asarray(observed, dtype=bool) & np.asarray(filled, dtype=bool)[:, None]
    counts = mask.sum(axis=1)
    ability = np.where(counts > 0, (scores * mask).sum(axis=1) / np.maximum(counts, 1), 0.0)
    residual = np.where(mask, scores - ability[:, None], 0.0)
    seen = mask.sum(axis=0)
    difficulty = np.where(seen > 0, residual.sum(axis=0) / np.maximum(seen, 1), 0.0)
    estimate = np.clip(ability[:, None] + difficulty[None, :], 0.0, 1.0)
    out = np.where(mask, scores, estimate)
    out[~np.asarray(filled, dtype=bool)] = 0.0
    return out


_UNSURE = object()
_EPS = float(np.finfo(np.float64).eps)


class Niches:
    """The competition state of one archive, recomputed only when the archive changes.

    Every ask needs F and f and every tell needs f of the archive plus the child; recomputing them
    from S each time cost more than the rest of M2N2's bookkeeping. The owner calls `changed()`
    whenever S changes. Results are bitwise those of the pure functions above: the same float64
    operations in the same order (tests/test_throughput_niches.py checks it), so caching never
    changes a search.
    """

    # A child is rejected without the full computation only when it trails the floor by more
    # than this relative margin, far above any rounding of the sums (see `replacement_slot`).
    REJECT_MARGIN = 1e-9

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self._load: np.ndarray | None = None  # z of the archive
        self._shared: np.ndarray | None = None
        self._fitness: np.ndarray | None = None
        self._floor: float | None = None  # lowest member fitness any child could leave
        self._weights: np.ndarray | None = None  # 1 / (z + 1)^alpha, the floor's column weights
        self._pull: dict[int, np.ndarray] = {}
        self._samplers: dict[Any, _Sampler] = {}
        self._slots: dict[bytes, np.ndarray] = {}
        self._pulls: dict[int, bool] = {}  # whether anyone covers what member a misses
        self._extended: np.ndarray | None = None  # scratch (P + 1, N) for replacement
        self._gap: np.ndarray | None = None  # scratch (P, N): attraction, the floor
        self._shared_buffer: np.ndarray | None = None  # holds F between changes
        self._misses: np.ndarray | None = None  # S == 0, when every score is 0 or 1
        self.quick_rejects = 0  # children turned away by the floor alone
        self.clear_verdicts = 0  # children placed by one matrix-vector product

    def changed(self) -> None:
        self._load = self._shared = self._fitness = self._floor = None
        self._pull.clear()
        self._samplers.clear()
        self._slots.clear()
        self._pulls.clear()

    def _refresh(self, scores: np.ndarray) -> None:
        """F and f after a change. `shared_scores`'s operations without its temporaries: arrays of
        this size (an archive by the datapoints) are fresh pages from the OS each time, which cost
        more than the arithmetic."""
        if self._shared is None:
            scores = np.asarray(scores, dtype=np.float64)
            self._load = scores.sum(axis=0)
            covered = self._load > 0
            if self._shared_buffer is None or self._shared_buffer.shape != scores.shape:
                self._shared_buffer = np.empty_like(scores)
            shared = self._shared_buffer
            np.divide(scores, self._denominators(self._load), out=shared)
            if not covered.all():
                shared[:, ~covered] = 0.0
            self._shared = shared
            self._fitness = shared.sum(axis=1)
            # Right/wrong scores (digits, exact match) allow a cheaper attraction, see `_pull_of`.
            self._misses = (scores == 0.0) if np.array_equal(scores, scores != 0.0) else None

    def fitness(self, scores: np.ndarray) -> np.ndarray:
        self._refresh(scores)
        assert self._fitness is not None
        return self._fitness

    def choose_parents(self, scores: np.ndarray, filled: np.ndarray, use_attraction: bool,
                       rng: np.random.Generator) -> tuple[int, int]:
        """`choose_parents_shared`'s draws, from samplers kept until the archive changes."""
        self._refresh(scores)
        assert self._shared is not None and self._fitness is not None
        key = filled.tobytes()
        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = np.flatnonzero(filled)
        if slots.size == 0:
            raise ValueError("cannot choose parents from an empty archive")
        by_fitness = self._sampler(("f", key), self._fitness, slots)
        a = by_fitness.draw(rng)
        if not use_attraction:
            return a, by_fitness.draw(rng)
        pull, pulls = self._pull_of(a), self._pulls.get(a)
        if pulls is None:
            pulls = self._pulls[a] = bool(pull.sum() > 0)
        if pulls:
            return a, self._sampler(("g", a, key), pull, slots).draw(rng)
        others = slots[slots != a]
        # Nothing covers what A misses: the reference code divides 0 by 0 here.
        return a, (int(rng.choice(others)) if others.size else a)

    def _sampler(self, key: Any, weights: np.ndarray, slots: np.ndarray) -> _Sampler:
        sampler = self._samplers.get(key)
        if sampler is None:
            sampler = self._samplers[key] = _Sampler(weights, slots)
        return sampler

    def _pull_of(self, a: int) -> np.ndarray:
        """`attraction(shared, a)`, in a reused buffer (the same operations, so the same bits)."""
        pull = self._pull.get(a)
        if pull is None:
            shared = self._shared
            assert shared is not None
            gap = self._scratch(shared.shape)
            if self._misses is not None:
                # 0/1 scores: max(0, F[k, j] - F[a, j]) is F[k, j] where A misses j and exactly 0
                # where A scores (F[k, j] is then 0 or F[a, j] itself): the same terms, one pass less.
                np.multiply(shared, self._misses[a], out=gap)
            else:
                np.subtract(shared, shared[a], out=gap)
                np.maximum(0.0, gap, out=gap)
            pull = self._pull[a] = gap.sum(axis=1)
        return pull

    def _scratch(self, shape: tuple[int, ...]) -> np.ndarray:
        if self._gap is None or self._gap.shape != shape:
            self._gap = np.empty(shape, dtype=np.float64)
        return self._gap

    def _margin(self, terms: int) -> float:
        """Relative gap that rounding cannot close: a sum of `terms` non-negative products errs by
        less than terms x eps of itself, whatever the summation order."""
        return self.REJECT_MARGIN + 4 * terms * _EPS

    def _denominators(self, load: np.ndarray) -> np.ndarray:
        denominator = np.where(load > 0, load, 1.0)
        return denominator if self.alpha == 1.0 else denominator ** self.alpha  # x ** 1.0 == x

    def _below_floor(self, child_scores: np.ndarray) -> bool:
        """Whether the child's fitness in the extended archive trails the floor by the margin.

        A right/wrong child (every score 0 or 1) adds exactly 1 to the load where it is right, so
        its fitness is the sum of the floor's weights 1/(z + 1)^alpha there: one dot product with
        weights kept per archive, instead of the extended load's temporaries. It differs from the
        full sum only in rounding, which the margin is far above. Other children take the full sum.
        """
        child = np.asarray(child_scores)
        right = np.count_nonzero(child)
        if right == np.count_nonzero(child == 1):
            fitness = float(np.dot(child, self._weights)) if right else 0.0
        else:
            child = child.astype(np.float64)
            fitness = float((child / self._denominators(self._load + child)).sum())
        assert self._floor is not None
        return fitness < self._floor * (1.0 - self._margin(child.size))

    def replacement_slot(self, scores: np.ndarray, child_scores: np.ndarray,
                         filled: np.ndarray | None = None) -> int | None:
        """`replacement_slot` without stacking: z of the archive plus the child's row, then F and f
        of the extended archive in a reused buffer.

        Most children lose, and most of those are told so without the full computation. Scores
        lie in [0, 1], so the child raises no column's load by more than 1: every member keeps at
        least its fitness against loads z + 1 (the floor, computed once per archive). A child
        whose own fitness is below the lowest floor, by a margin far larger than rounding, is the
        least fit whatever the full computation's last bits; anything closer is computed fully.
        """
        if filled is not None and not filled.all():
            return int(np.argmin(filled))
        self._refresh(scores)
        assert self._load is not None
        if self._floor is None:
            self._weights = 1.0 / self._denominators(self._load + 1.0)
            floor = self._scratch(scores.shape)
            np.multiply(scores, self._weights, out=floor)
            self._floor = float(floor.sum(axis=1).min())
        if self._below_floor(child_scores):
            self.quick_rejects += 1
            return None
        child = np.asarray(child_scores, dtype=np.float64)
        load = self._load + child  # adding the child's row last is what summing the stack does
        denominator = self._denominators(load)
        clear = self._clear_verdict(scores, child, denominator)
        if clear is not _UNSURE:
            self.clear_verdicts += 1
            return clear
        rows, cols = scores.shape
        if self._extended is None or self._extended.shape != (rows + 1, cols):
            self._extended = np.empty((rows + 1, cols), dtype=np.float64)
        ext = self._extended
        np.divide(scores, denominator, out=ext[:rows])
        np.divide(child, denominator, out=ext[rows])
        covered = load > 0
        if not covered.all():
            ext[:, ~covered] = 0.0
        worst = int(np.argmin(ext.sum(axis=1)))
        return None if worst == rows else worst

    def _clear_verdict(self, scores: np.ndarray, child: np.ndarray, denominator: np.ndarray) -> Any:
        """The slot (or None) when the least fit of the extended archive is clear, else `_UNSURE`.

        Every fitness of the extended archive is its row dotted with 1/denominator: one
        matrix-vector product instead of dividing the whole archive. BLAS sums in its own order,
        so these differ from the full rule's sums in the last bits; a least fit behind the next by
        more than the margin (relative to the largest fitness, which bounds every sum's rounding)
        is the full rule's answer too. Near-ties, where the rule's tie order decides, go the full way.
        """
        weights = 1.0 / denominator  # columns nobody covers hold zeros in every row: no mask needed
        fitness = np.empty(scores.shape[0] + 1)
        np.dot(scores, weights, out=fitness[:-1])
        fitness[-1] = np.dot(child, weights)
        worst = int(np.argmin(fitness))
        least, top = fitness[worst], fitness.max()
        fitness[worst] = np.inf
        if fitness.min() - least <= self._margin(weights.size) * top:
            return _UNSURE
        return None if worst == scores.shape[0] else worst
