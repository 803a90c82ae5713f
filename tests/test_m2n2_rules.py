"""M2N2 rules checked against numbers worked out by hand from DESIGN.md ("M2N2, as the engine
implements it"), not against values produced by running the code.

Every expected value below is derived in the comments with exact fractions. Statistical checks use
a seeded numpy Generator, so they are deterministic; tolerances are several standard deviations of
the empirical frequency for the sample size used.
"""

from __future__ import annotations

import math
from fractions import Fraction as Fr

import numpy as np
import pytest

from evomerge.genomes.dense import SIN_EPS, angle_between, slerp_weights, split_slerp
from evomerge.strategies.m2n2 import M2N2
from evomerge.strategies.niches import (
    attraction,
    choose_parents,
    niche_fitness,
    replacement_slot,
    shared_scores,
)

from hand_worked import F3, G3, N_DRAWS, P_A3, P_B3, S3, TOL, f3, fr, fv  # noqa: F401



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

