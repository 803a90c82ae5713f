"""M2N2 rules checked against numbers worked out by hand from DESIGN.md ("M2N2, as the engine
implements it"), not against values produced by running the code.

Every expected value below is derived in the comments with exact fractions. Statistical checks use
a seeded numpy Generator, so they are deterministic; tolerances are several standard deviations of
the empirical frequency for the sample size used.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction as Fr

import numpy as np
import pytest

from evomerge.errors import FitnessError
from evomerge.genomes.dense import SIN_EPS, angle_between, slerp_weights, split_slerp
from evomerge.strategies import STRATEGIES, Candidate, Evaluation, Problem
from evomerge.strategies.m2n2 import GA, M2N2
from evomerge.strategies.niches import (
    attraction,
    choose_parents,
    niche_fitness,
    replacement_slot,
    shared_scores,
)


def fr(rows):
    """Exact fractions -> float64 array (the fractions are the hand working)."""
    return np.array([[float(x) for x in row] for row in rows], dtype=np.float64)


def fv(values):
    return np.array([float(x) for x in values], dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# The hand-worked archive used by several tests: 3 members, 4 datapoints, 0/1 scores.
#
#   S = [[1, 1, 0, 0],
#        [1, 0, 0, 1],
#        [0, 0, 0, 1]]
#   z = column sums = [2, 1, 0, 2]          (datapoint 2 is covered by nobody: z_2 = 0)
#
# alpha = 1:  F[k, j] = S[k, j] / z_j, and 0 where z_j = 0
#   F[0] = [1/2, 1/1, 0, 0/2] = [1/2, 1, 0, 0]      f_0 = 3/2
#   F[1] = [1/2, 0,   0, 1/2]                        f_1 = 1
#   F[2] = [0,   0,   0, 1/2]                        f_2 = 1/2
#   sum f = 3  ->  P(A = k) = f / sum f = [1/2, 1/3, 1/6]
# ------------------------------------------------------------------------------------------------
S3 = np.array([[1, 1, 0, 0], [1, 0, 0, 1], [0, 0, 0, 1]], dtype=np.float64)
F3 = fr([[Fr(1, 2), 1, 0, 0], [Fr(1, 2), 0, 0, Fr(1, 2)], [0, 0, 0, Fr(1, 2)]])
f3 = fv([Fr(3, 2), 1, Fr(1, 2)])

# Attraction on S3 (alpha = 1), g_k = sum_j max(0, F[k, j] - F[A, j]):
#   A = 0, F[A] = [1/2, 1, 0, 0]:
#     g_0 = 0
#     g_1 = max(0, 1/2-1/2) + max(0, 0-1) + 0 + max(0, 1/2-0) = 1/2
#     g_2 = 0 + 0 + 0 + max(0, 1/2-0)                          = 1/2
#   A = 1, F[A] = [1/2, 0, 0, 1/2]:
#     g_0 = 0 + max(0, 1-0) + 0 + 0 = 1;  g_1 = 0;  g_2 = max(0, 1/2-1/2) = 0
#   A = 2, F[A] = [0, 0, 0, 1/2]:
#     g_0 = 1/2 + 1 + 0 + 0 = 3/2;  g_1 = 1/2 + 0 + 0 + 0 = 1/2;  g_2 = 0
G3 = {
    0: fv([0, Fr(1, 2), Fr(1, 2)]),
    1: fv([1, 0, 0]),
    2: fv([Fr(3, 2), Fr(1, 2), 0]),
}
# Marginal of B:  P(B=b) = sum_a P(A=a) * g_a[b] / sum g_a
#   P(B=0) = 1/2*0   + 1/3*1 + 1/6*(3/2)/2 = 1/3 + 1/8  = 11/24
#   P(B=1) = 1/2*1/2 + 1/3*0 + 1/6*(1/2)/2 = 1/4 + 1/24 = 7/24
#   P(B=2) = 1/2*1/2 + 1/3*0 + 1/6*0       = 1/4        = 6/24
P_A3 = fv([Fr(1, 2), Fr(1, 3), Fr(1, 6)])
P_B3 = fv([Fr(11, 24), Fr(7, 24), Fr(6, 24)])

N_DRAWS = 20_000
TOL = 0.02  # std of a frequency at n = 20,000 is <= sqrt(1/4 / 20000) = 0.0035, so 0.02 is > 5 sigma


# ================================================================================================
# 1. Competition
# ================================================================================================
def test_competition_alpha_1_zero_load_column():
    # z = [2, 1, 0, 2]; the uncovered column gives 0, never NaN (0/0).
    F = shared_scores(S3, 1.0)
    assert np.all(np.isfinite(F))
    np.testing.assert_allclose(F, F3, rtol=0, atol=1e-15)
    np.testing.assert_allclose(niche_fitness(S3, 1.0), f3, rtol=0, atol=1e-15)
    assert np.all(F[:, 2] == 0.0)


def test_competition_default_alpha_is_1():
    assert M2N2.Options().alpha == 1.0


def test_competition_alpha_0_is_plain_sum():
    # alpha = 0: z_j^0 = 1 for covered columns, so F = S and f = row sums = [2, 2, 1].
    np.testing.assert_array_equal(shared_scores(S3, 0.0), S3)
    np.testing.assert_array_equal(niche_fitness(S3, 0.0), [2.0, 2.0, 1.0])


def test_competition_fractional_alpha_continuous_scores():
    # S (continuous):            z = [1/4, 1, 9/4, 0];  z^(1/2) = [1/2, 1, 3/2, 0]
    #   [[1/8, 1/2, 3/4, 0],
    #    [1/8, 1/4, 3/4, 0],
    #    [0,   1/4, 3/4, 0]]
    # F[0] = [(1/8)/(1/2), (1/2)/1, (3/4)/(3/2), 0] = [1/4, 1/2, 1/2, 0]   f_0 = 5/4
    # F[1] = [1/4, 1/4, 1/2, 0]                                            f_1 = 1
    # F[2] = [0,   1/4, 1/2, 0]                                            f_2 = 3/4
    S = fr([[Fr(1, 8), Fr(1, 2), Fr(3, 4), 0],
            [Fr(1, 8), Fr(1, 4), Fr(3, 4), 0],
            [0, Fr(1, 4), Fr(3, 4), 0]])
    F_hand = fr([[Fr(1, 4), Fr(1, 2), Fr(1, 2), 0],
                 [Fr(1, 4), Fr(1, 4), Fr(1, 2), 0],
                 [0, Fr(1, 4), Fr(1, 2), 0]])
    np.testing.assert_allclose(shared_scores(S, 0.5), F_hand, rtol=0, atol=1e-15)
    np.testing.assert_allclose(niche_fitness(S, 0.5), fv([Fr(5, 4), 1, Fr(3, 4)]), rtol=0, atol=1e-15)


def test_competition_empty_slots_change_nothing():
    # Empty slots are rows of zeros: they add nothing to z and get f = 0.
    S = np.vstack([S3[0], np.zeros(4), S3[1], np.zeros(4), S3[2]])
    np.testing.assert_allclose(niche_fitness(S, 1.0), [1.5, 0.0, 1.0, 0.0, 0.5], rtol=0, atol=1e-15)


# ================================================================================================
# 2. Attraction
# ================================================================================================
@pytest.mark.parametrize("a", [0, 1, 2])
def test_attraction_by_hand(a):
    g = attraction(shared_scores(S3, 1.0), a)
    np.testing.assert_allclose(g, G3[a], rtol=0, atol=1e-15)
    assert g[a] == 0.0  # A never attracts itself


def test_attraction_from_hand_F():
    # Same as above, fed the hand F directly (checks attraction alone, not shared_scores).
    np.testing.assert_allclose(attraction(F3, 0), G3[0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(attraction(F3, 2), G3[2], rtol=0, atol=1e-15)


# ================================================================================================
# 3. Parent sampling
# ================================================================================================
def _draws(scores, filled, alpha, use_attraction, n, seed):
    rng = np.random.default_rng(seed)
    out = np.array([choose_parents(scores, filled, alpha, use_attraction, rng) for _ in range(n)])
    return out[:, 0], out[:, 1]


@pytest.fixture(scope="module")
def draws_with_gaps():
    # S3 placed in slots 0, 2, 4; slots 1 and 3 are empty (zero rows, filled=False).
    S = np.vstack([S3[0], np.zeros(4), S3[1], np.zeros(4), S3[2]])
    filled = np.array([True, False, True, False, True])
    return _draws(S, filled, 1.0, True, N_DRAWS, seed=1234)


def test_parent_a_frequency_matches_fitness(draws_with_gaps):
    a, _ = draws_with_gaps
    assert set(np.unique(a)) <= {0, 2, 4}
    freq = np.array([np.mean(a == k) for k in (0, 2, 4)])
    np.testing.assert_allclose(freq, P_A3, atol=TOL)  # [1/2, 1/3, 1/6]


def test_parent_b_frequency_matches_attraction(draws_with_gaps):
    a, b = draws_with_gaps
    assert set(np.unique(b)) <= {0, 2, 4}  # never an empty slot
    assert not np.any(a == b)  # every A here has sum g > 0, and g_A = 0
    np.testing.assert_allclose([np.mean(b == k) for k in (0, 2, 4)], P_B3, atol=TOL)  # [11, 7, 6]/24
    # Conditionally on A: g / sum g.
    #   A=slot0 -> B in {slot2, slot4} with [1/2, 1/2]
    #   A=slot2 -> B = slot0 always (g = [1, 0, 0])
    #   A=slot4 -> B = slot0 w.p. (3/2)/2 = 3/4, slot2 w.p. 1/4
    b0 = b[a == 0]
    np.testing.assert_allclose([np.mean(b0 == 2), np.mean(b0 == 4)], [0.5, 0.5], atol=TOL)
    assert np.all(b[a == 2] == 0)
    b4 = b[a == 4]  # ~3,300 draws: std ~ 0.0075, so 0.03 is 4 sigma
    np.testing.assert_allclose([np.mean(b4 == 0), np.mean(b4 == 2)], [0.75, 0.25], atol=0.03)


def test_attraction_off_draws_b_from_fitness():
    # use_attraction=False: B ~ f / sum f = [1/2, 1/3, 1/6], independent of A, so B may equal A and,
    # in particular, A = 1 is no longer always followed by B = 0.
    a, b = _draws(S3, np.ones(3, bool), 1.0, False, 12_000, seed=7)
    np.testing.assert_allclose([np.mean(b == k) for k in range(3)], P_A3, atol=TOL)
    # P(B = A) = 1/4 + 1/9 + 1/36 = 7/18
    assert abs(np.mean(a == b) - 7 / 18) < TOL
    b_given_1 = b[a == 1]  # ~4000 draws
    np.testing.assert_allclose([np.mean(b_given_1 == k) for k in range(3)], P_A3, atol=0.03)


def test_sum_g_zero_falls_back_to_uniform_over_other_members():
    # Slots: 0 = A, 1 empty, 2 = d1, 3 empty, 4 = d2.
    #   A = [1, 1, 1, 0], d1 = [1, 0, 0, 0], d2 = [0, 1, 0, 0]
    #   z = [2, 2, 1, 0]
    #   F[A] = [1/2, 1/2, 1, 0] (f = 2);  F[d1] = [1/2, 0, 0, 0] (f = 1/2);  F[d2] = [0, 1/2, 0, 0] (f = 1/2)
    # Every other member is dominated by A (F[k] <= F[A] everywhere) -> g = 0 for all when A = slot 0.
    S = np.array([[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=np.float64)
    filled = np.array([True, False, True, False, True])
    F = shared_scores(S, 1.0)
    np.testing.assert_allclose(F[0], fv([Fr(1, 2), Fr(1, 2), 1, 0]), atol=1e-15)
    np.testing.assert_array_equal(attraction(F, 0), np.zeros(5))

    a, b = _draws(S, filled, 1.0, True, N_DRAWS, seed=99)
    assert np.all(np.isin(a, [0, 2, 4])) and np.all(np.isin(b, [0, 2, 4]))
    # P(A) = [2, 1/2, 1/2] / 3 = [2/3, 1/6, 1/6]
    np.testing.assert_allclose([np.mean(a == k) for k in (0, 2, 4)], [2 / 3, 1 / 6, 1 / 6], atol=TOL)
    b_given_a = b[a == 0]
    assert not np.any(b_given_a == 0)  # never A itself
    np.testing.assert_allclose([np.mean(b_given_a == 2), np.mean(b_given_a == 4)], [0.5, 0.5], atol=TOL)
    # A = slot2: g_0 = 0 + 1/2 + 1 = 3/2, g_4 = 1/2 -> B = slot0 w.p. 3/4
    assert abs(np.mean(b[a == 2] == 0) - 0.75) < 0.04


def test_sum_g_zero_duplicates_pick_the_other_member():
    # Two identical members (+ an empty slot): g = 0 whichever is A, so B is always the other one.
    S = np.array([[1, 0, 1], [1, 0, 1], [0, 0, 0]], dtype=np.float64)
    filled = np.array([True, True, False])
    rng = np.random.default_rng(3)
    for _ in range(200):
        a, b = choose_parents(S, filled, 1.0, True, rng)
        assert {a, b} == {0, 1}


@pytest.mark.parametrize("row", [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
def test_single_member_archive_b_equals_a(row):
    S = np.array([[0, 0, 0], row, [0, 0, 0]], dtype=np.float64)
    filled = np.array([False, True, False])
    rng = np.random.default_rng(5)
    for use_attraction in (True, False):
        for _ in range(50):
            assert choose_parents(S, filled, 1.0, use_attraction, rng) == (1, 1)


def test_choose_parents_refuses_empty_archive():
    with pytest.raises(ValueError):
        choose_parents(np.zeros((3, 2)), np.zeros(3, bool), 1.0, True, np.random.default_rng(0))


# ================================================================================================
# 4. Replacement
# ================================================================================================
def test_replacement_child_replaces_specific_member_with_child_in_load():
    # Archive r0 = [1,1,0,0], r1 = [0,0,1,0], r2 = [0,0,0,1]; child c = [1,1,0,1].
    # Including the child: z = [2, 2, 1, 2]
    #   f(r0) = 1/2 + 1/2 = 1;  f(r1) = 1;  f(r2) = 1/2;  f(c) = 1/2 + 1/2 + 1/2 = 3/2
    #   argmin -> r2 (slot 2).
    # (Without the child in z, f = [2, 1, 1] and the argmin would be slot 1: this checks z includes it.)
    S = np.array([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float64)
    child = np.array([1, 1, 0, 1], dtype=np.float64)
    assert replacement_slot(S, child, 1.0) == 2


def test_replacement_on_s3():
    # S3 + child c = [0,0,1,1]: z = [2, 1, 1, 3]
    #   f(r0) = 1/2 + 1 = 3/2;  f(r1) = 1/2 + 1/3 = 5/6;  f(r2) = 1/3;  f(c) = 1 + 1/3 = 4/3  -> slot 2
    assert replacement_slot(S3, np.array([0, 0, 1, 1.0]), 1.0) == 2


def test_replacement_child_is_argmin_returns_none():
    # S3 + child c = [1,0,0,0]: z = [3, 1, 0, 2]
    #   f(r0) = 1/3 + 1 = 4/3;  f(r1) = 1/3 + 1/2 = 5/6;  f(r2) = 1/2;  f(c) = 1/3  -> child is argmin
    assert replacement_slot(S3, np.array([1, 0, 0, 0.0]), 1.0) is None


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_replacement_tie_drops_existing_member(order):
    # S3 + child c = [0,0,0,1] (= r2): z = [2, 1, 0, 3]
    #   f(r0) = 3/2;  f(r1) = 1/2 + 1/3 = 5/6;  f(r2) = 1/3;  f(c) = 1/3   -> tie: r2 dropped, child enters
    S = S3[list(order)]
    expected = list(order).index(2)
    assert replacement_slot(S, np.array([0, 0, 0, 1.0]), 1.0) == expected


def test_replacement_empty_slots_fill_first():
    # Slots: r0 = [1,0,0,0], r1 = [0,1,0,0], empty, empty; child c = [1,1,0,0]
    #   z = [2, 2, 0, 0]: f = [1/2, 1/2, 0, 0, c: 1]  -> argmin = first empty slot (2)
    S = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=np.float64)
    assert replacement_slot(S, np.array([1, 1, 0, 0.0]), 1.0) == 2
    S[2] = [1, 1, 0, 0]
    # A child that scores 0 everywhere ties the empty slot (f = 0): the empty slot goes first.
    assert replacement_slot(S, np.zeros(4), 1.0) == 3


def test_replacement_alpha_0_vs_alpha_1():
    # r0 = [1,1,0,0], r1 = [1,1,1,0]; child c = [0,0,0,1]
    #   alpha = 0: f = [2, 3, c: 1]                       -> child is argmin -> None
    #   alpha = 1: z = [2, 2, 1, 1]; f = [1, 2, c: 1]     -> tie r0/child -> r0 (slot 0) dropped
    S = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=np.float64)
    c = np.array([0, 0, 0, 1.0])
    assert replacement_slot(S, c, 0.0) is None
    assert replacement_slot(S, c, 1.0) == 0


# ================================================================================================
# 5. SLERP
# ================================================================================================
def test_slerp_end_points():
    a = np.array([1.0, 2.0, -3.0, 0.5])
    b = np.array([-2.0, 0.5, 1.0, 4.0])
    d = a.size
    # split = d: every element uses t = w;  split = 0: every element uses t = 1 - w.
    np.testing.assert_allclose(split_slerp(a, b, d, 0.0), a, rtol=0, atol=1e-12)
    np.testing.assert_allclose(split_slerp(a, b, d, 1.0), b, rtol=0, atol=1e-12)
    np.testing.assert_allclose(split_slerp(a, b, 0, 0.0), b, rtol=0, atol=1e-12)
    np.testing.assert_allclose(split_slerp(a, b, 0, 1.0), a, rtol=0, atol=1e-12)
    omega = angle_between(a, b)
    assert slerp_weights(0.0, omega) == pytest.approx((1.0, 0.0), abs=1e-12)
    assert slerp_weights(1.0, omega) == pytest.approx((0.0, 1.0), abs=1e-12)


def test_slerp_orthogonal_midpoint():
    # A = (1, 0), B = (0, 1): Omega = pi/2, sin Omega = 1; at t = 1/2 both coefficients are
    # sin(pi/4) = sqrt(2)/2  ->  child = (sqrt(2)/2, sqrt(2)/2)
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    assert angle_between(a, b) == pytest.approx(math.pi / 2, abs=1e-15)
    h = math.sqrt(2) / 2
    np.testing.assert_allclose(split_slerp(a, b, 2, 0.5), [h, h], rtol=0, atol=1e-15)


def test_slerp_keeps_unit_norm_linear_does_not():
    # A = (1, 0), B = (cos pi/3, sin pi/3) = (1/2, sqrt(3)/2): Omega = pi/3.
    # SLERP walks the unit circle: child(t) = (cos(t*pi/3), sin(t*pi/3)), norm 1 for every t.
    # At t = 1/2: coefficients sin(pi/6)/sin(pi/3) = (1/2)/(sqrt3/2) = 1/sqrt3 on each,
    #   child = (1/sqrt3)(3/2, sqrt3/2) = (sqrt3/2, 1/2).
    # Linear midpoint = (3/4, sqrt3/4), norm sqrt(9/16 + 3/16) = sqrt3/2 = cos(Omega/2) < 1.
    s3 = math.sqrt(3)
    a, b = np.array([1.0, 0.0]), np.array([0.5, s3 / 2])
    np.testing.assert_allclose(split_slerp(a, b, 2, 0.5), [s3 / 2, 0.5], rtol=0, atol=1e-15)
    for t in (0.1, 0.25, 0.5, 0.7, 0.9):
        child = split_slerp(a, b, 2, t)
        np.testing.assert_allclose(child, [math.cos(t * math.pi / 3), math.sin(t * math.pi / 3)], atol=1e-15)
        assert np.linalg.norm(child) == pytest.approx(1.0, abs=1e-15)
    linear_mid = 0.5 * a + 0.5 * b
    np.testing.assert_allclose(linear_mid, [3 / 4, s3 / 4], atol=1e-15)
    assert np.linalg.norm(linear_mid) == pytest.approx(math.cos(math.pi / 6), abs=1e-15)
    assert np.linalg.norm(linear_mid) < 0.87


def test_slerp_parallel_falls_back_to_exact_linear():
    # B = 2A: Omega = 0 -> linear. At t = 1/4: 3/4*A + 1/4*B = (1.25, 2.5, 3.75), exact in binary.
    a, b = np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0])
    np.testing.assert_array_equal(split_slerp(a, b, 3, 0.25), [1.25, 2.5, 3.75])
    # Anti-parallel: Omega = pi, sin(pi) ~ 1.2e-16 -> linear; midpoint is the origin, not NaN/inf.
    a, b = np.array([1.0, 0.0]), np.array([-1.0, 0.0])
    np.testing.assert_array_equal(split_slerp(a, b, 2, 0.5), [0.0, 0.0])
    np.testing.assert_array_equal(split_slerp(a, b, 2, 0.25), [0.5, 0.0])


def test_slerp_tiny_sine_below_threshold_is_linear():
    # A = (1, 0), B = (1, 1e-7): Omega ~ 1e-7 > 0, but |sin Omega| < SIN_EPS = 1e-6 -> linear:
    # t = 1/2 -> (1, 5e-8) exactly (0.5*1 + 0.5*1 = 1; 0.5*0 + 0.5*1e-7 = 5e-8).
    a, b = np.array([1.0, 0.0]), np.array([1.0, 1e-7])
    omega = angle_between(a, b)
    assert 0 < abs(math.sin(omega)) < SIN_EPS
    assert slerp_weights(0.5, omega) == (0.5, 0.5)
    child = split_slerp(a, b, 2, 0.5)
    assert np.all(np.isfinite(child))
    np.testing.assert_array_equal(child, [1.0, 0.5 * 1e-7])


def test_slerp_zero_vector_parent_no_nan():
    # |A| = 0: no angle; treat as linear -> child = t*B. t = 1/4, B = (1, 2) -> (0.25, 0.5).
    a, b = np.zeros(2), np.array([1.0, 2.0])
    assert angle_between(a, b) == 0.0
    child = split_slerp(a, b, 2, 0.25)
    np.testing.assert_array_equal(child, [0.25, 0.5])
    np.testing.assert_array_equal(split_slerp(b, a, 1, 0.25), [0.75, 0.5])  # split: t=1/4 then 3/4


def test_split_slerp_uses_one_global_angle():
    # A = (1, 0 | 1, 0), B = (1, 1 | -1, 1), split s = 2, w = 1/3.
    #   Global: A.B = 1 - 1 = 0 -> Omega = pi/2, sin Omega = 1.
    #   Per segment the angles would be pi/4 (first half) and 3*pi/4 (second half).
    # Before s, t = w = 1/3: coefficients sin(2/3 * pi/2) = sin(pi/3) = sqrt3/2 on A, sin(pi/6) = 1/2 on B
    #   child[0:2] = sqrt3/2*(1, 0) + 1/2*(1, 1)  = (sqrt3/2 + 1/2, 1/2)
    # From s on, t = 1 - w = 2/3: coefficients 1/2 on A, sqrt3/2 on B
    #   child[2:4] = 1/2*(1, 0) + sqrt3/2*(-1, 1) = (1/2 - sqrt3/2, sqrt3/2)
    s3 = math.sqrt(3)
    a = np.array([1.0, 0.0, 1.0, 0.0])
    b = np.array([1.0, 1.0, -1.0, 1.0])
    assert angle_between(a, b) == pytest.approx(math.pi / 2, abs=1e-15)
    expected = np.array([s3 / 2 + 1 / 2, 1 / 2, 1 / 2 - s3 / 2, s3 / 2])
    child = split_slerp(a, b, 2, 1 / 3)
    np.testing.assert_allclose(child, expected, rtol=0, atol=1e-15)

    # What per-segment angles would give (first half, Omega = pi/4, t = 1/3):
    #   coefficients sin(pi/6)/sin(pi/4) = 1/sqrt2 on A, sin(pi/12)/sin(pi/4) on B -> clearly different.
    per_segment_first = (1 / math.sqrt(2)) * a[:2] + (math.sin(math.pi / 12) / math.sin(math.pi / 4)) * b[:2]
    assert not np.allclose(child[:2], per_segment_first, atol=1e-3)
    # And with the t's swapped (1 - w before s) the first half would be (1/2 + sqrt3/2, sqrt3/2):
    assert abs(child[1] - s3 / 2) > 0.3

    # Split at 0: t = 1 - w = 2/3 everywhere: 1/2*A + sqrt3/2*B
    np.testing.assert_allclose(split_slerp(a, b, 0, 1 / 3), 0.5 * a + s3 / 2 * b, rtol=0, atol=1e-15)
    # Split at 1 (odd): element 0 uses t = 1/3, elements 1..3 use t = 2/3.
    np.testing.assert_allclose(
        split_slerp(a, b, 1, 1 / 3),
        [s3 / 2 + 1 / 2, s3 / 2, 1 / 2 - s3 / 2, s3 / 2], rtol=0, atol=1e-15)


# ================================================================================================
# 6. The strategy end to end
# ================================================================================================
D, N = 8, 6


def toy_scores(genome: np.ndarray) -> np.ndarray:
    """Datapoint j is 'solved' when genome[j] > 0 (a 0/1 score with real niches)."""
    return (np.asarray(genome[:N]) > 0).astype(np.float64)


def _stack(genomes) -> np.ndarray:
    """The archive's dense genomes as one array (empty slots as NaN rows)."""
    size = next(g.size for g in genomes if g is not None)
    return np.stack([np.full(size, np.nan, np.float32) if g is None else g for g in genomes])


class Harness:
    """Synchronous driver that plays the engine's part: assigns ids, evaluates, tells."""

    def __init__(self, strategy, fitness=toy_scores, next_id: int = 0):
        self.s = strategy
        self.fitness = fitness
        self.next_id = next_id
        self.genomes: dict[int, np.ndarray] = {}
        self.log: list[Candidate] = []

    def ask(self) -> Candidate | None:
        cand = self.s.ask()
        if cand is not None:
            cand.member_id = self.next_id
            self.next_id += 1
            self.genomes[cand.member_id] = cand.genome.copy()
            self.log.append(cand)
        return cand

    def tell(self, cand: Candidate, scores=None, *, failed: bool = False):
        if failed:
            ev = Evaluation(member_id=cand.member_id, scores=None, error="boom")
        else:
            ev = Evaluation(member_id=cand.member_id, scores=self.fitness(cand.genome) if scores is None else scores)
        self.s.tell(cand, ev)

    def step(self) -> Candidate:
        cand = self.ask()
        assert cand is not None
        self.tell(cand)
        return cand

    def run(self, n: int) -> list[Candidate]:
        return [self.step() for _ in range(n)]


def spec_child(pa: np.ndarray, pb: np.ndarray, split: int, w: float) -> np.ndarray:
    """DESIGN.md's crossover formula, written out independently in float64."""
    a, b = pa.astype(np.float64), pb.astype(np.float64)
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    omega = math.acos(max(-1.0, min(1.0, cos)))
    t = np.where(np.arange(a.size) < split, w, 1.0 - w)
    if abs(math.sin(omega)) < 1e-6:
        return (1 - t) * a + t * b
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / math.sin(omega)


def test_from_scratch_initialisation_then_children():
    s = M2N2({}, Problem(dimension=D, num_datapoints=N), seed=0)
    h = Harness(s)
    assert s.sigma == 0.01  # from scratch: mutation on, sigma = 0.01
    i0, i1 = h.ask(), h.ask()
    for c in (i0, i1):
        assert c.parents == () and c.params == {} and c.generation == 0
        assert c.genome.shape == (D,)
    assert not np.array_equal(i0.genome, i1.genome)
    assert s.ask() is None  # nothing told yet
    h.tell(i0)
    assert s.ask() is None  # one initial member still out
    h.tell(i1)
    child = h.ask()
    assert child is not None
    assert set(child.params) == {"parent_a", "parent_b", "mix_ratio", "split_fraction"}
    assert child.params["parent_a"] in (0, 1) and child.params["parent_b"] in (0, 1)
    assert child.parents == (child.params["parent_a"], child.params["parent_b"])
    assert 0.0 <= child.params["mix_ratio"] < 1.0
    assert 0.0 <= child.params["split_fraction"] <= 1.0
    assert child.generation == 1


def test_init_members_option_and_init_sigma():
    s = M2N2({"init_members": 3}, Problem(dimension=4000, num_datapoints=N), seed=1)
    cands = [s.ask() for _ in range(3)]
    assert all(c is not None and c.parents == () for c in cands)
    assert s.ask() is None
    # N(0, 0.01^2): std over 4000 values is within ~2% of 0.01 (allow 10%), mean ~ 0.
    for c in cands:
        assert abs(float(np.std(c.genome)) - 0.01) < 0.001
        assert abs(float(np.mean(c.genome))) < 0.001


def test_children_follow_the_crossover_formula():
    # mutation_sigma = 0, so the child must be exactly the spec's split-point SLERP of its parents.
    s = M2N2({"mutation_sigma": 0.0, "archive_size": 5}, Problem(dimension=D, num_datapoints=N), seed=11)
    h = Harness(s)
    h.run(2)
    splits = set()
    for _ in range(60):
        c = h.step()
        split = round(c.params["split_fraction"] * D)
        assert split == pytest.approx(c.params["split_fraction"] * D)
        splits.add(split)
        expected = spec_child(h.genomes[c.params["parent_a"]], h.genomes[c.params["parent_b"]],
                              split, c.params["mix_ratio"])
        np.testing.assert_allclose(c.genome, expected, rtol=1e-5, atol=1e-7)
    assert len(splits) > 3  # the split is redrawn each time


def test_parents_come_from_the_current_archive():
    s = M2N2({"archive_size": 4}, Problem(dimension=D, num_datapoints=N), seed=2)
    h = Harness(s)
    h.run(2)
    for _ in range(50):
        c = h.ask()
        live = set(int(i) for i in s.ids if i >= 0)
        assert c.params["parent_a"] in live and c.params["parent_b"] in live
        h.tell(c)
    assert (s.ids >= 0).sum() <= 4


def test_failed_evaluation_never_enters_archive():
    s = M2N2({"archive_size": 4}, Problem(dimension=D, num_datapoints=N), seed=3)
    h = Harness(s)
    i0, i1 = h.ask(), h.ask()
    h.tell(i0, failed=True)
    assert np.all(s.ids == -1)
    h.tell(i1)
    assert sorted(int(i) for i in s.ids if i >= 0) == [1]
    # The one surviving initial member is both parents.
    c = h.ask()
    assert c.params["parent_a"] == 1 and c.params["parent_b"] == 1
    before = (s.ids.copy(), s.scores.copy(), _stack(s.genomes))
    h.tell(c, failed=True)
    np.testing.assert_array_equal(s.ids, before[0])
    np.testing.assert_array_equal(s.scores, before[1])
    np.testing.assert_array_equal(_stack(s.genomes), before[2])
    assert c.member_id not in s.ids


def test_all_random_initial_members_failed_draws_another():
    s = M2N2({}, Problem(dimension=D, num_datapoints=N), seed=3)
    h = Harness(s)
    i0, i1 = h.ask(), h.ask()
    h.tell(i0, failed=True)
    h.tell(i1, failed=True)
    again = h.ask()
    assert again is not None and again.parents == () and again.params == {}
    assert not np.array_equal(again.genome, i0.genome) and not np.array_equal(again.genome, i1.genome)
    assert s.ask() is None  # and waits for its score before making children
    h.tell(again, np.ones(N))
    child = h.ask()
    assert child.parents == (again.member_id, again.member_id)


def test_all_pretrained_seeds_failed_raises():
    seeds = [np.ones(D, np.float32), -np.ones(D, np.float32)]
    s = M2N2({}, Problem(dimension=D, num_datapoints=N, initial=seeds), seed=3)
    h = Harness(s)
    i0, i1 = h.ask(), h.ask()
    h.tell(i0, failed=True)
    h.tell(i1, failed=True)
    with pytest.raises(FitnessError, match="seed"):
        s.ask()


def test_replacement_inside_the_strategy():
    # archive_size = 3, seeds are irrelevant; scores are told by hand (the S3 example).
    s = M2N2({"archive_size": 3, "init_members": 3, "mutation_sigma": 0.0},
             Problem(dimension=D, num_datapoints=4), seed=4)
    h = Harness(s)
    init = [h.ask() for _ in range(3)]
    for cand, row in zip(init, S3):
        h.tell(cand, row.copy())
    assert list(s.ids) == [0, 1, 2]
    np.testing.assert_array_equal(s.scores, S3)
    # child [1,0,0,0] is the argmin (hand: f(c) = 1/3) -> archive unchanged
    c = h.ask()
    h.tell(c, np.array([1, 0, 0, 0.0]))
    assert list(s.ids) == [0, 1, 2]
    # child [0,0,1,1] replaces slot 2 (hand: f = [3/2, 5/6, 1/3, c: 4/3])
    c = h.ask()
    h.tell(c, np.array([0, 0, 1, 1.0]))
    assert list(s.ids) == [0, 1, c.member_id]
    np.testing.assert_array_equal(s.genomes[2], c.genome)
    np.testing.assert_array_equal(s.scores[2], [0, 0, 1, 1])
    # child [0,0,1,1] again, duplicating slot 2 = [0,0,1,1] (slot 1 = [1,0,0,1]):
    #   z = [2, 1, 2, 3]; f = [1/2+1, 1/2+1/3, 1/2+1/3, c: 1/2+1/3] = [3/2, 5/6, 5/6, 5/6]
    #   three-way tie at 5/6 -> an existing member goes first; the lowest index is slot 1.
    c2 = h.ask()
    h.tell(c2, np.array([0, 0, 1, 1.0]))
    assert list(s.ids) == [0, c2.member_id, c.member_id]


def test_continuous_tie_drops_existing_member_in_strategy():
    """DESIGN.md: "Ties go to existing members first", also for continuous scores once stored.

    (A float32 archive once broke this: float32(0.1) > 0.1 turned the tie into a loss.)

    Hand working: m0 = [1/10, 0], m1 = [0, 1/10], child = [1/10, 0] (duplicate of m0)
      z = [1/5, 1/10];  f(m0) = 1/2, f(m1) = 1, f(child) = 1/2  -> tie -> m0 (slot 0) dropped.
    """
    s = M2N2({"archive_size": 2, "mutation_sigma": 0.0}, Problem(dimension=D, num_datapoints=2), seed=5)
    h = Harness(s)
    i0, i1 = h.ask(), h.ask()
    h.tell(i0, np.array([0.1, 0.0]))
    h.tell(i1, np.array([0.0, 0.1]))
    assert list(s.ids) == [0, 1]
    c = h.ask()
    h.tell(c, np.array([0.1, 0.0]))
    assert list(s.ids) == [c.member_id, 1]


def test_empty_slot_fills_before_zero_scoring_member_is_dropped():
    """Empty slots fill before any member is dropped, even one that scores 0 everywhere
    (a deliberate deviation from the reference's argmin, which would evict it; see niches.py).

    Hand working: archive_size 3; member 0 told [0,0,0,0]; member 1 told [1,0,0,0]
      extended f = [0 (member 0), 0 (empty), 0 (empty), 1 (child)] -> should go to an empty slot.
    """
    s = M2N2({"archive_size": 3}, Problem(dimension=D, num_datapoints=4), seed=6)
    h = Harness(s)
    i0, i1 = h.ask(), h.ask()
    h.tell(i0, np.zeros(4))
    assert 0 in s.ids
    h.tell(i1, np.array([1, 0, 0, 0.0]))
    assert sorted(int(i) for i in s.ids if i >= 0) == [0, 1]


def test_ablation_no_crossover_exact_parent_copy():
    s = M2N2({"crossover": False, "mutation_sigma": 0.0, "archive_size": 4},
             Problem(dimension=D, num_datapoints=N), seed=8)
    h = Harness(s)
    h.run(2)
    for _ in range(20):
        c = h.step()
        assert "mix_ratio" not in c.params and "split_fraction" not in c.params
        assert c.parents == (c.params["parent_a"],)
        np.testing.assert_array_equal(c.genome, h.genomes[c.params["parent_a"]])


def test_ablation_no_crossover_adds_only_mutation_noise():
    dim = 4000
    s = M2N2({"crossover": False}, Problem(dimension=dim, num_datapoints=N), seed=9)
    h = Harness(s)
    h.run(2)
    c = h.step()
    noise = c.genome.astype(np.float64) - h.genomes[c.params["parent_a"]].astype(np.float64)
    # N(0, 0.01^2) on every parameter: std within 10% of 0.01, every entry perturbed.
    assert abs(float(np.std(noise)) - 0.01) < 0.001
    assert abs(float(np.mean(noise))) < 0.001
    assert np.count_nonzero(noise) == dim


def test_ablation_no_split_point():
    s = M2N2({"split_point": False, "mutation_sigma": 0.0, "archive_size": 4},
             Problem(dimension=D, num_datapoints=N), seed=10)
    h = Harness(s)
    h.run(2)
    for _ in range(20):
        c = h.step()
        assert c.params["split_fraction"] == 1.0
        # t = w on every element: whole-vector SLERP of the two parents.
        expected = spec_child(h.genomes[c.params["parent_a"]], h.genomes[c.params["parent_b"]], D,
                              c.params["mix_ratio"])
        np.testing.assert_allclose(c.genome, expected, rtol=1e-5, atol=1e-7)


def _loaded_strategy(options, seed):
    """A strategy whose archive is S3 in slots 0..2 (ids 100, 101, 102), via load_state_dict."""
    s = M2N2({"archive_size": 3, "mutation_sigma": 0.0, **options}, Problem(dimension=4, num_datapoints=4), seed)
    meta, arrays = s.state_dict()
    arrays = {k: np.array(v) for k, v in arrays.items()}
    arrays["scores"] = S3.astype(np.float32)
    arrays["ids"] = np.array([100, 101, 102])
    arrays["genomes/values"] = np.eye(4, dtype=np.float32)[:3] + 0.5
    arrays["genomes/present"] = np.ones(3, dtype=bool)
    meta = dict(meta, init_issued=2, init_told=2)
    s.load_state_dict(meta, arrays)
    return s


def test_attraction_flag_in_strategy():
    # On S3 with attraction: A = member 101 (slot 1) always has B = 100 (g = [1, 0, 0]).
    # Without attraction: B ~ f / sum f = [1/2, 1/3, 1/6] whatever A is.
    on = _loaded_strategy({}, seed=21)
    off = _loaded_strategy({"attraction": False}, seed=21)
    pairs_on = [(c.params["parent_a"], c.params["parent_b"]) for c in (on.ask() for _ in range(1500))]
    pairs_off = [(c.params["parent_a"], c.params["parent_b"]) for c in (off.ask() for _ in range(3000))]
    assert all(b == 100 for a, b in pairs_on if a == 101)
    assert all(a != b for a, b in pairs_on)
    b_off = np.array([b for _, b in pairs_off])
    np.testing.assert_allclose([np.mean(b_off == k) for k in (100, 101, 102)], P_A3, atol=0.035)
    assert np.mean(np.array([a == b for a, b in pairs_off])) == pytest.approx(7 / 18, abs=0.035)


def _run_sequence(seed, n, options=None):
    s = M2N2({"archive_size": 5, **(options or {})}, Problem(dimension=D, num_datapoints=N), seed=seed)
    return Harness(s).run(n)


def test_same_seed_same_children():
    a, b = _run_sequence(42, 40), _run_sequence(42, 40)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.genome, y.genome)
        assert x.params == y.params and x.parents == y.parents and x.generation == y.generation
    c = _run_sequence(43, 40)
    assert not np.array_equal(a[0].genome, c[0].genome)


def test_state_dict_round_trip_mid_run():
    problem = Problem(dimension=D, num_datapoints=N)
    s = M2N2({"archive_size": 5}, problem, seed=77)
    h = Harness(s)
    h.run(25)
    meta, arrays = s.state_dict()
    meta = json.loads(json.dumps(meta))  # must be JSON-able (no pickle)
    arrays = {k: np.array(v, copy=True) for k, v in arrays.items()}
    resume_id = h.next_id

    straight = h.run(15)

    s2 = M2N2({"archive_size": 5}, problem, seed=12345)  # different seed: the state must win
    s2.load_state_dict(meta, arrays)
    h2 = Harness(s2, next_id=resume_id)
    resumed = h2.run(15)
    for x, y in zip(straight, resumed):
        np.testing.assert_array_equal(x.genome, y.genome)
        assert x.params == y.params and x.parents == y.parents
    np.testing.assert_array_equal(s.ids, s2.ids)
    np.testing.assert_array_equal(s.scores, s2.scores)
    np.testing.assert_array_equal(_stack(s.genomes), _stack(s2.genomes))


def test_load_state_dict_rejects_wrong_shapes():
    s = M2N2({"archive_size": 5}, Problem(dimension=D, num_datapoints=N), seed=0)
    meta, arrays = s.state_dict()
    arrays = dict(arrays, scores=np.zeros((4, N), np.float32))
    with pytest.raises(ValueError):
        s.load_state_dict(meta, arrays)


def test_registry_and_defaults():
    assert STRATEGIES.get("m2n2") is M2N2
    assert STRATEGIES.get("ga") is GA
    ga = STRATEGIES.get("ga")({}, Problem(dimension=D, num_datapoints=N), seed=0)
    assert ga.options.alpha == 0.0 and ga.options.attraction is False
    assert ga.options.crossover is True and ga.options.split_point is True
    m = M2N2({}, Problem(dimension=D, num_datapoints=N), seed=0)
    o = m.options
    assert (o.archive_size, o.alpha, o.attraction, o.init_members, o.init_sigma) == (20, 1.0, True, 2, 0.01)
    assert m.sigma == 0.01


def test_ga_uses_plain_sum_replacement():
    # r0 = [1,1,0,0], r1 = [1,1,1,0]; child [0,0,0,1]:
    #   GA (alpha 0): f = [2, 3, 1] -> child dropped;  M2N2 (alpha 1): f = [1, 2, 1] -> r0 dropped (tie).
    def fill(cls):
        s = cls({"archive_size": 2, "mutation_sigma": 0.0}, Problem(dimension=D, num_datapoints=4), seed=0)
        h = Harness(s)
        i0, i1 = h.ask(), h.ask()
        h.tell(i0, np.array([1, 1, 0, 0.0]))
        h.tell(i1, np.array([1, 1, 1, 0.0]))
        c = h.ask()
        h.tell(c, np.array([0, 0, 0, 1.0]))
        return list(s.ids), c.member_id

    ids, _ = fill(GA)
    assert ids == [0, 1]
    ids, child = fill(M2N2)
    assert ids == [child, 1]


def test_pretrained_seeds():
    rng = np.random.default_rng(0)
    s1 = rng.standard_normal(D).astype(np.float32)
    s2 = rng.standard_normal(D).astype(np.float32)
    s1_copy = s1.copy()
    problem = Problem(dimension=D, num_datapoints=N, initial=[s1, s2])
    s = M2N2({}, problem, seed=0)
    assert s.sigma == 0.0  # mutation off by default with seeds
    h = Harness(s)
    c1, c2 = h.ask(), h.ask()
    np.testing.assert_array_equal(c1.genome, s1)
    np.testing.assert_array_equal(c2.genome, s2)
    assert c1.parents == () and c2.parents == ()
    assert s.ask() is None
    h.tell(c1)
    h.tell(c2)
    assert sorted(int(i) for i in s.ids if i >= 0) == [0, 1]  # both inserted by the replacement rule
    # Children of two seeds, no noise: exactly the spec's split-point SLERP.
    for _ in range(10):
        c = h.step()
        expected = spec_child(h.genomes[c.params["parent_a"]], h.genomes[c.params["parent_b"]],
                              round(c.params["split_fraction"] * D), c.params["mix_ratio"])
        np.testing.assert_allclose(c.genome, expected, rtol=1e-5, atol=1e-6)
    # The seed arrays themselves are not mutated by the search.
    np.testing.assert_array_equal(problem.initial[0], s1_copy)

    assert M2N2({"mutation_sigma": 0.05}, problem, seed=0).sigma == 0.05
    with pytest.raises(ValueError):
        M2N2({"archive_size": 2}, Problem(dimension=D, num_datapoints=N, initial=[s1, s2, s1]), seed=0)
