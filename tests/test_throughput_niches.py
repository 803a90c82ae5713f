"""The fast paths of M2N2's selection rules give bitwise the pure functions' results.

`Niches` caches F and f between archive changes and computes replacement without stacking;
`_draw` replaces `rng.choice(p=...)`. None of them may change a search, so every comparison
here is exact (array_equal, ==), never approximate.
"""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.genomes.offspring import add_noise
from evomerge.strategies.base import Candidate, Evaluation, Problem
from evomerge.strategies.m2n2 import M2N2
from evomerge.strategies.niches import (
    attraction,
    Niches,
    _draw,
    choose_parents,
    niche_fitness,
    replacement_slot,
    shared_scores,
)


def _random_scores(rng: np.random.Generator, rows: int, cols: int, kind: str) -> np.ndarray:
    if kind == "binary":
        scores = (rng.random((rows, cols)) < 0.4).astype(np.float64)
    else:  # continuous, with exact ties (a few distinct levels) and zeros
        scores = rng.integers(0, 5, (rows, cols)) / 4.0 * (rng.random((rows, cols)) < 0.6)
    scores[:, : cols // 5] = 0.0  # columns nobody covers
    return scores


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("kind", ["binary", "continuous"])
def test_replacement_and_fitness_equal_the_pure_functions_through_insertions(alpha, kind):
    rng = np.random.default_rng(int(alpha * 10) + (kind == "binary"))
    rows, cols = 7, 53
    scores = np.zeros((rows, cols))
    filled = np.zeros(rows, dtype=bool)
    niches = Niches(alpha)
    insertions = 0
    for step in range(300):
        child = _random_scores(rng, 1, cols, kind)[0]
        if step % 10 == 0:
            child = scores[rng.integers(rows)].copy()  # exact copy of a member: ties everywhere
        expected = replacement_slot(scores, child, alpha, filled=filled)
        assert niches.replacement_slot(scores, child, filled=filled) == expected
        if expected is not None:
            scores[expected] = child
            filled[expected] = True
            niches.changed()
            insertions += 1
        assert np.array_equal(niches.fitness(scores), niche_fitness(scores, alpha))
    assert insertions > 20
    assert niches.clear_verdicts > 5  # verdicts by the matrix-vector shortcut, still exact


def test_choose_parents_from_the_cache_draws_exactly_the_pure_sequence():
    rng_data = np.random.default_rng(3)
    niches = Niches(1.0)
    scores = _random_scores(rng_data, 9, 40, "continuous")
    filled = np.ones(9, dtype=bool)
    filled[4] = False
    scores[4] = 0.0
    for use_attraction in (True, False):
        fast, pure = np.random.default_rng(11), np.random.default_rng(11)
        for step in range(400):
            if step % 37 == 0:  # the archive changes now and then
                scores[rng_data.integers(9)] = _random_scores(rng_data, 1, 40, "binary")[0]
                scores[4] = 0.0
                niches.changed()
            got = niches.choose_parents(scores, filled, use_attraction, fast)
            assert got == choose_parents(scores, filled, 1.0, use_attraction, pure)
    assert fast.bit_generator.state == pure.bit_generator.state


def test_shared_scores_unchanged_for_cached_use():
    scores = _random_scores(np.random.default_rng(5), 6, 30, "continuous")
    niches = Niches(0.5)
    niches.fitness(scores)
    assert np.array_equal(niches._shared, shared_scores(scores, 0.5))


def test_draw_is_rng_choice_with_probabilities():
    data = np.random.default_rng(1)
    for case in range(3000):
        size = int(data.integers(1, 25))
        weights = data.random(size) * (data.random(size) < 0.7) * 10.0 ** float(data.integers(-6, 6))
        slots = np.flatnonzero(data.random(size) < 0.8)
        if slots.size == 0:
            continue
        fast, reference = np.random.default_rng(case), np.random.default_rng(case)
        for _ in range(3):
            w = np.clip(weights[slots], 0.0, None)
            total = w.sum()
            want = int(reference.choice(slots)) if total <= 0 else int(reference.choice(slots, p=w / total))
            assert _draw(fast, weights, slots) == want


def _run(strategy: M2N2, budget: int) -> list[tuple]:
    """Ask/tell in order on a toy problem whose datapoint j is solved when genome[j] > 0."""
    out = []
    for member_id in range(budget):
        candidate: Candidate | None = strategy.ask()
        assert candidate is not None
        candidate.member_id = member_id
        scores = (candidate.genome[:40] > 0).astype(np.float64)
        strategy.tell(candidate, Evaluation(member_id, scores))
        out.append((candidate.params, candidate.parents, candidate.genome.tobytes()))
    return out


class _Uncached(Niches):
    """Recomputes everything from S every time, as M2N2 did before the cache."""

    def choose_parents(self, scores, filled, use_attraction, rng):
        return choose_parents(scores, filled, self.alpha, use_attraction, rng)

    def replacement_slot(self, scores, child_scores, filled=None):
        return replacement_slot(scores, child_scores, self.alpha, filled=filled)


def test_m2n2_with_the_cache_makes_the_same_children_as_without():
    problem = Problem(dimension=64, num_datapoints=40)
    runs = []
    for niches_class in (Niches, _Uncached):
        strategy = M2N2({"archive_size": 6}, problem, seed=4)
        strategy._niches = niches_class(strategy.options.alpha)
        runs.append(_run(strategy, 400))
    assert runs[0] == runs[1]


def test_mutation_noise_is_float32_and_reproducible():
    genome = np.ones(1000, dtype=np.float32)
    a = add_noise(genome, 0.01, noise_seed=5)
    b = add_noise(genome, 0.01, noise_seed=5)
    assert a.dtype == np.float32 and np.array_equal(a, b)
    assert np.array_equal(genome, np.ones(1000, dtype=np.float32))  # the parent is never modified
    noise = (a - genome).astype(np.float64)
    assert abs(noise.mean()) < 0.002 and 0.009 < noise.std() < 0.011


@pytest.mark.parametrize("kind", ["binary", "graded"])
@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_quick_rejection_by_the_floor_agrees_with_the_full_rule(alpha, kind):
    """Children a little worse than the archive (the common case in a search) are turned away by
    the floor alone; each verdict equals the pure function's, and some children still enter.
    Right/wrong children (float32, as they come off the wire) take the dot-product shortcut."""
    rng = np.random.default_rng(7)
    rows, cols = 10, 200
    scores = (rng.random((rows, cols)) < 0.7).astype(np.float64)
    if kind == "graded":
        scores *= rng.random((rows, cols))
    filled = np.ones(rows, dtype=bool)
    niches = Niches(alpha)
    inserted = 0
    for _ in range(400):
        parent = scores[rng.integers(rows)]
        flips = rng.random(cols) < rng.choice([0.02, 0.1, 0.3])
        child = np.where(flips, 1.0 - parent, parent)
        if kind == "binary":
            child = child.astype(np.float32)
        expected = replacement_slot(scores, child, alpha, filled=filled)
        assert niches.replacement_slot(scores, child, filled=filled) == expected
        if expected is not None:
            scores[expected] = child
            niches.changed()
            inserted += 1
    # graded scores raise the load by less than 1, so the floor is looser and turns fewer away
    assert niches.quick_rejects > (50 if kind == "binary" else 0) and inserted > 5, niches.quick_rejects
    assert niches.clear_verdicts > 5


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_attraction_of_right_or_wrong_scores_is_bitwise_the_general_formula(alpha):
    rng = np.random.default_rng(11)
    scores = _random_scores(rng, 12, 300, "binary")
    niches = Niches(alpha)
    niches.fitness(scores)
    assert niches._misses is not None  # the 0/1 shortcut is taken
    shared = shared_scores(scores, alpha)
    for a in range(12):
        assert np.array_equal(niches._pull_of(a), attraction(shared, a))
    continuous = _random_scores(rng, 12, 300, "continuous")
    niches.changed()
    niches.fitness(continuous)
    assert niches._misses is None
    assert np.array_equal(niches._pull_of(3), attraction(shared_scores(continuous, alpha), 3))
