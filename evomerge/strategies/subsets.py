"""Which datapoints a subsampled child is scored on, and how the draw is written down.

On an LLM an evaluation costs about the number of prompts answered, so a child scored on M of
the N datapoints costs M/N of a full evaluation (`fitness.subsample`). M2N2 then judges the child
on exactly those datapoints (evomerge/strategies/niches.py, `screen_slot`).

The draw: stratified by the archive's load. Sort the datapoints by their load z_j (how many
members get them right, stable in j), cut the order into `strata` groups of near-equal size, and
give group h a share of the M draws in proportion to N_h / (1 + zbar_h)^alpha, where zbar_h is
its mean load: per datapoint, a datapoint few members cover is drawn up to (1 + z)^alpha times as
often as one everybody covers. Within a group the draw is uniform without replacement. Why: a
child's shared score on datapoint j is S/z_j^alpha, so the low-load datapoints are where a niche is
won or lost and where the comparison with the weakest member varies most; datapoints every
member gets right move every fitness by about the same small amount and decide little. Spending
the draws where the variance is is Neyman's allocation with sigma_h ~ 1/(1 + zbar_h)^alpha.

Each datapoint's inclusion probability is then known exactly, m_h / N_h, so the comparison weights
each drawn datapoint by N_h / m_h (Horvitz-Thompson): the weighted sum over the subset is an
unbiased estimate of the full sum for every member alike. With M = N every stratum is drawn
whole and every weight is 1.

The draw is a function of the child's own seed (`subset_rng`) and of the archive at its ask, so
it is reproducible; the indices themselves travel with the child, into snapshots and the trial.
A resume that replays the trial draws them again and checks them against the trial's
(evomerge/engine/replay.py).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Subset:
    """The datapoints a child is scored on (sorted), and every datapoint's probability of being
    among them (m_h / N_h for its stratum): the comparison weights are its inverse."""

    indices: np.ndarray
    inclusion: np.ndarray  # (N,)

    @property
    def weights(self) -> np.ndarray:
        return 1.0 / self.inclusion[self.indices]


def subset_rng(base_seed: int, counter: int) -> np.random.Generator:
    """The child's own stream for its draw: independent of the strategy's parent and crossover
    stream, so subsampling leaves every other random choice of the search where it was."""
    return np.random.default_rng(np.random.SeedSequence([int(base_seed) & 0xFFFF_FFFF, 0x5B5E7, int(counter)]))


def allocate(sizes: np.ndarray, rates: np.ndarray, total: int) -> np.ndarray:
    """Draws per stratum: proportional to sizes x rates, at most each stratum's size, at least
    one per stratum while there are enough draws, summing to `total` (largest remainders)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(min(total, sizes.sum()))
    counts = np.zeros(sizes.size, dtype=np.int64)
    if total >= sizes.size:
        counts[:] = np.minimum(1, sizes)
    open_ = counts < sizes
    while counts.sum() < total and open_.any():
        left = total - counts.sum()
        share = np.where(open_, sizes * rates, 0.0)
        ideal = left * share / share.sum()
        step = np.minimum(np.floor(ideal).astype(np.int64), sizes - counts)
        if step.sum() == 0:  # hand out the rest one by one, largest remainder first
            order = np.argsort(-(ideal - np.floor(ideal)), kind="stable")
            for h in order:
                if counts.sum() >= total:
                    break
                if open_[h]:
                    counts[h] += 1
        else:
            counts += step
        open_ = counts < sizes
    return counts


def draw_subset(load: np.ndarray, size: int, alpha: float, strata: int, rng: np.random.Generator) -> Subset:
    """M = `size` datapoints, stratified by `load` (see the module docstring)."""
    n = int(load.size)
    if size >= n:
        return Subset(np.arange(n, dtype=np.int64), np.ones(n))
    inclusion = np.zeros(n)
    order = np.argsort(load, kind="stable")
    groups = np.array_split(order, min(strata, size, n))
    sizes = np.array([g.size for g in groups])
    rates = np.array([1.0 / (1.0 + float(load[g].mean())) ** alpha for g in groups])
    counts = allocate(sizes, rates, size)
    picked = []
    for group, m in zip(groups, counts):
        inclusion[group] = m / group.size
        if m:
            picked.append(rng.choice(group, size=int(m), replace=False))
    return Subset(np.sort(np.concatenate(picked)).astype(np.int64), inclusion)


def widen(observed: np.ndarray, inclusion: np.ndarray, rng: np.random.Generator) -> Subset:
    """The next stage of a staged top-up (`subsample.staged`): as many new datapoints as are
    observed, uniform over the rest, or the whole rest once that would reach half of it.

    Returns the new datapoints and every datapoint's probability of being observed after the
    stage: the stage is a fixed-size uniform draw from the N - |O| unobserved, so
    pi'_j = pi_j + (1 - pi_j) m / (N - |O|) exactly (the weights stay Horvitz-Thompson's)."""
    n = inclusion.size
    rest = np.setdiff1d(np.arange(n, dtype=np.int64), observed)
    m = rest.size if 2 * observed.size >= rest.size else observed.size
    chosen = rest if m == rest.size else np.sort(rng.choice(rest, size=m, replace=False)).astype(np.int64)
    return Subset(chosen, inclusion + (1.0 - inclusion) * (m / rest.size))


def uniform_subset(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """M datapoints uniformly without replacement, sorted (CMA-ES's shared generation subset)."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)


def encode_indices(indices: np.ndarray | None, n: int) -> str | None:
    """A compact, exact text form for a trial's user attrs: the base64 of the membership bitmask
    (N/8 bytes whatever M: 180 bytes for digits' 1,437 datapoints). None: every datapoint."""
    if indices is None:
        return None
    mask = np.zeros(n, dtype=bool)
    mask[np.asarray(indices, dtype=np.int64)] = True
    return base64.b64encode(np.packbits(mask).tobytes()).decode("ascii")


def decode_indices(text: str | None, n: int) -> np.ndarray | None:
    if text is None:
        return None
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8), count=n)
    return np.flatnonzero(bits).astype(np.int64)
