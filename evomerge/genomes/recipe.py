"""Recipe genomes: a child of K seeds, written as breakpoints plus per-segment seed coefficients.

Every M2N2 child of seeds is, element by element, a linear combination of the seeds, and split-
point SLERP only ever creates new breakpoints and new coefficient pairs. So a recipe is a few KB
whatever the model size, and the SLERP angle comes from prefix Gram matrices of the seeds at the
allowed boundaries: a dot product costs segments x K^2, and nothing is materialised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from evomerge.genomes.dense import slerp_weights


@dataclass(frozen=True)
class Recipe:
    breaks: np.ndarray  # int64, strictly increasing, breaks[0] = 0, breaks[-1] = D
    coeffs: np.ndarray  # float64, (segments, K): coefficient of each seed on each segment

    @property
    def num_segments(self) -> int:
        return int(self.coeffs.shape[0])

    @staticmethod
    def seed(index: int, num_seeds: int, size: int) -> "Recipe":
        coeffs = np.zeros((1, num_seeds))
        coeffs[0, index] = 1.0
        return Recipe(np.array([0, size], dtype=np.int64), coeffs)

    def equals(self, other: "Recipe") -> bool:
        return np.array_equal(self.breaks, other.breaks) and np.array_equal(self.coeffs, other.coeffs)


class PrefixGram:
    """P[i] = sum over flat indices j < grid[i] of s_j s_j^T, for the K seeds s, in float64."""

    def __init__(self, grid: np.ndarray, prefix: np.ndarray) -> None:
        self.grid = np.asarray(grid, dtype=np.int64)
        self.prefix = np.asarray(prefix, dtype=np.float64)
        if self.grid[0] != 0 or np.any(np.diff(self.grid) <= 0):
            raise ValueError("grid must start at 0 and increase strictly")

    @property
    def size(self) -> int:
        return int(self.grid[-1])

    @property
    def num_seeds(self) -> int:
        return int(self.prefix.shape[1])

    @classmethod
    def from_chunks(cls, grid: np.ndarray, chunks: Callable[[int, int], np.ndarray]) -> "PrefixGram":
        """`chunks(start, stop)` returns the seeds' values there as a (K, stop - start) array."""
        grid = np.asarray(grid, dtype=np.int64)
        size = int(grid[-1])
        if np.all(np.diff(grid) == 1):  # exact reference behaviour: one boundary per index
            values = np.concatenate([chunks(a, b) for a, b in _spans(0, size, 1 << 16)], axis=1).astype(np.float64)
            prefix = np.zeros((grid.size, values.shape[0], values.shape[0]))
            prefix[1:] = np.cumsum(np.einsum("ki,li->ikl", values, values), axis=0)
            return cls(grid, prefix)
        prefix = None
        for i in range(1, grid.size):
            block = np.asarray(chunks(int(grid[i - 1]), int(grid[i])), dtype=np.float64)
            if prefix is None:
                prefix = np.zeros((grid.size, block.shape[0], block.shape[0]))
            prefix[i] = prefix[i - 1] + block @ block.T
        return cls(grid, prefix)

    def with_element(self, chunks: Callable[[int, int], np.ndarray]) -> "PrefixGram":
        """The Gram of the basis grown by one element, which `chunks` returns as its last row.

        Only the new row and column are computed, the same way `from_chunks` computes the rest,
        so the existing entries keep their bits (a resumed search rebuilds identical numbers).
        """
        k, size, grid = self.num_seeds, self.size, self.grid
        column = np.zeros((grid.size, k + 1))
        if np.all(np.diff(grid) == 1):
            values = np.concatenate([chunks(a, b) for a, b in _spans(0, size, 1 << 16)], axis=1).astype(np.float64)
            column[1:] = np.cumsum((values * values[-1]).T, axis=0)
        else:
            for i in range(1, grid.size):
                block = np.asarray(chunks(int(grid[i - 1]), int(grid[i])), dtype=np.float64)
                column[i] = column[i - 1] + block @ block[-1]
        prefix = np.zeros((grid.size, k + 1, k + 1))
        prefix[:, :k, :k] = self.prefix
        prefix[:, k, :] = column
        prefix[:, :, k] = column
        return PrefixGram(grid, prefix)

    def segment_grams(self, breaks: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.grid, breaks)
        if np.any(self.grid[np.minimum(idx, self.grid.size - 1)] != breaks):
            raise ValueError("recipe breakpoints must lie on the boundary grid")
        return self.prefix[idx[1:]] - self.prefix[idx[:-1]]


def default_grid(size: int, max_boundaries: int = 1 << 16) -> np.ndarray:
    """Every index for small models (exact reference behaviour), else an even grid."""
    if size <= max_boundaries:
        return np.arange(size + 1, dtype=np.int64)
    return np.unique(np.linspace(0, size, max_boundaries + 1).round().astype(np.int64))


def _spans(start: int, stop: int, step: int) -> Iterable[tuple[int, int]]:
    for lo in range(start, stop, step):
        yield lo, min(stop, lo + step)


def widened(coeffs: np.ndarray, width: int) -> np.ndarray:
    """Coefficients over `width` basis elements: a recipe written before elements were added to
    the basis has zero weight on them."""
    if coeffs.shape[1] >= width:
        return coeffs
    return np.concatenate([coeffs, np.zeros((coeffs.shape[0], width - coeffs.shape[1]))], axis=1)


def aligned(a: Recipe, b: Recipe, extra: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both recipes on the union of their breakpoints (plus `extra`): breaks, A rows, B rows."""
    breaks = np.union1d(np.union1d(a.breaks, b.breaks), np.asarray(list(extra), dtype=np.int64))
    starts = breaks[:-1]
    width = max(a.coeffs.shape[1], b.coeffs.shape[1])
    rows_a = widened(a.coeffs, width)[np.searchsorted(a.breaks, starts, side="right") - 1]
    rows_b = widened(b.coeffs, width)[np.searchsorted(b.breaks, starts, side="right") - 1]
    return breaks, rows_a, rows_b


def recipe_dot(a: Recipe, b: Recipe, gram: PrefixGram) -> float:
    breaks, rows_a, rows_b = aligned(a, b)
    k = rows_a.shape[1]
    if k > gram.num_seeds:
        raise ValueError(f"recipe uses {k} basis elements but the Gram matrices cover {gram.num_seeds}")
    return float(np.einsum("sk,skl,sl->", rows_a, gram.segment_grams(breaks)[:, :k, :k], rows_b))


def recipe_angle(a: Recipe, b: Recipe, gram: PrefixGram) -> float:
    norm = math.sqrt(max(recipe_dot(a, a, gram), 0.0)) * math.sqrt(max(recipe_dot(b, b, gram), 0.0))
    if norm == 0.0:
        return 0.0
    return math.acos(min(1.0, max(-1.0, recipe_dot(a, b, gram) / norm)))


def recipe_split_slerp(a: Recipe, b: Recipe, split: int, ratio: float, gram: PrefixGram) -> Recipe:
    """The recipe of split_slerp(A, B, split, ratio): t = ratio before split, 1 - ratio from it."""
    omega = recipe_angle(a, b, gram)
    breaks, rows_a, rows_b = aligned(a, b, extra=[split] if 0 < split < gram.size else [])
    before = breaks[:-1] < split
    coeffs = np.empty_like(rows_a)
    for mask, t in ((before, ratio), (~before, 1.0 - ratio)):
        ca, cb = slerp_weights(t, omega)
        coeffs[mask] = ca * rows_a[mask] + cb * rows_b[mask]
    return simplify(Recipe(breaks.astype(np.int64), coeffs))


def simplify(recipe: Recipe) -> Recipe:
    """Merge neighbouring segments with identical coefficients, keeping recipes small."""
    if recipe.num_segments <= 1:
        return recipe
    same = np.all(recipe.coeffs[1:] == recipe.coeffs[:-1], axis=1)
    keep = np.concatenate([[True], ~same])
    breaks = np.concatenate([recipe.breaks[:-1][keep], recipe.breaks[-1:]])
    return Recipe(breaks, recipe.coeffs[keep])


def materialise_dense(recipe: Recipe, seeds: list[np.ndarray]) -> np.ndarray:
    """Reference materialisation for small in-memory seeds (tests, exports of small models)."""
    out = np.zeros(seeds[0].shape, dtype=np.float64)
    for (lo, hi), row in zip(zip(recipe.breaks[:-1], recipe.breaks[1:]), recipe.coeffs):
        for k, c in enumerate(row):
            if c != 0.0:
                out[lo:hi] += c * seeds[k][lo:hi].astype(np.float64)
    return out.astype(np.float32)


def pack_recipes(recipes: list[Recipe | None], prefix: str) -> dict[str, np.ndarray]:
    """Many recipes as three flat arrays (safetensors-friendly; no pickle)."""
    present = [r for r in recipes if r is not None]
    k = max(r.coeffs.shape[1] for r in present) if present else 0
    counts = np.array([-1 if r is None else r.num_segments for r in recipes], dtype=np.int64)
    breaks = np.concatenate([r.breaks for r in present]) if present else np.zeros(0, np.int64)
    coeffs = np.concatenate([widened(r.coeffs, k) for r in present]) if present else np.zeros((0, k))
    # Recipes written before elements joined the basis are narrower; keep each one's own width,
    # so an unpacked recipe is the same arrays (and gives the same bits) as the packed one.
    widths = np.array([-1 if r is None else r.coeffs.shape[1] for r in recipes], dtype=np.int64)
    return {f"{prefix}/segments": counts, f"{prefix}/breaks": breaks.astype(np.int64),
            f"{prefix}/coeffs": coeffs.astype(np.float64), f"{prefix}/widths": widths}


def unpack_recipes(arrays: dict[str, np.ndarray], prefix: str) -> list[Recipe | None]:
    counts = arrays[f"{prefix}/segments"]
    breaks, coeffs = arrays[f"{prefix}/breaks"], arrays[f"{prefix}/coeffs"]
    widths = arrays.get(f"{prefix}/widths")
    widths = widths.tolist() if widths is not None else [coeffs.shape[1]] * len(counts)
    recipes: list[Recipe | None] = []
    b = c = 0
    for n, width in zip(counts.tolist(), widths):
        if n < 0:
            recipes.append(None)
            continue
        recipes.append(Recipe(breaks[b:b + n + 1].copy(), coeffs[c:c + n, :width].copy()))
        b, c = b + n + 1, c + n
    return recipes
