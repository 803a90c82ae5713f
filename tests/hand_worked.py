"""The hand-worked archive and helpers shared by the M2N2 rule and strategy tests."""

from __future__ import annotations

from fractions import Fraction as Fr

import numpy as np


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
