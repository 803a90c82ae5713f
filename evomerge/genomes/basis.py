"""The seeds a recipe is written in, and the fused pass that turns a recipe into weights.

Workers open checkpoint seeds memory-mapped, so every worker on a node shares one copy through
the page cache; materialising writes straight into a reused float32 buffer, a chunk at a time,
so each seed byte is read once and each output byte written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from evomerge.genomes.recipe import PrefixGram, Recipe, default_grid

CHUNK = 1 << 20  # elements per fused step: large enough that per-op overhead vanishes (measured)


@dataclass
class Piece:
    """A contiguous run of the flat layout (one tensor, or one in-memory vector) in every seed."""

    start: int
    stop: int
    views: list[torch.Tensor]  # flat, one per seed, any floating dtype


class Basis:
    """The seeds, plus any merged models added later as extra elements (hybrid guidance).

    `num_seeds` stays the number of checkpoints: column and layer-wise genomes are written over
    those. Recipes may also use the extra elements, which sit after the seeds (`num_elements`).
    """

    def __init__(self, pieces: list[Piece], size: int, num_seeds: int) -> None:
        self.pieces = pieces
        self.size = size
        self.num_seeds = num_seeds
        self.extra: list[torch.Tensor] = []  # flat float32 vectors of the added elements
        self._starts = np.array([p.start for p in pieces], dtype=np.int64)

    @property
    def num_elements(self) -> int:
        return self.num_seeds + len(self.extra)

    def add_element(self, vector: torch.Tensor) -> int:
        """Append a materialised model as a new element; returns its index among the elements.

        The basis keeps `vector` itself (no model-sized copy): pass a tensor nobody writes to again.
        """
        vector = vector.detach().to(torch.float32).reshape(-1)
        if vector.numel() != self.size:
            raise ValueError(f"a new basis element needs {self.size} values, got {vector.numel()}")
        if not bool(torch.isfinite(vector).all()):
            raise ValueError("a new basis element holds NaN or inf; it cannot join the basis")
        self.extra.append(vector.contiguous())
        return self.num_elements - 1

    def drop_extra(self) -> None:
        self.extra = []

    def _element_views(self, piece: Piece) -> list[torch.Tensor]:
        return piece.views + [e[piece.start:piece.stop] for e in self.extra]

    @classmethod
    def from_arrays(cls, seeds: Sequence[np.ndarray]) -> "Basis":
        views = [torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32)).reshape(-1) for s in seeds]
        size = int(views[0].numel())
        if any(v.numel() != size for v in views):
            raise ValueError("all seeds must have the same number of parameters")
        return cls([Piece(0, size, views)], size, len(views))

    def values(self, start: int, stop: int) -> np.ndarray:
        """Every element's values on [start, stop) as a (num_elements, stop - start) float64 array."""
        parts = []
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        position = start
        while position < stop:
            piece = self.pieces[i]
            hi = min(stop, piece.stop)
            lo_in, hi_in = position - piece.start, hi - piece.start
            parts.append(np.stack([v[lo_in:hi_in].to(torch.float64).numpy() for v in self._element_views(piece)]))
            position, i = hi, i + 1
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

    def prefix_gram(self, max_boundaries: int = 1 << 16) -> PrefixGram:
        """Tensor boundaries are always on the grid, so layer-wise recipes (CMA-ES) fit on it."""
        grid = np.union1d(default_grid(self.size, max_boundaries), self._starts)
        return PrefixGram.from_chunks(grid, self.values)

    def materialise(self, recipe: Recipe, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty(self.size, dtype=torch.float32)
        breaks, coeffs = recipe.breaks, recipe.coeffs
        if int(breaks[-1]) != self.size:
            raise ValueError(f"recipe covers {int(breaks[-1])} parameters but the basis has {self.size}")
        if coeffs.shape[1] > self.num_elements:
            raise ValueError(f"recipe uses {coeffs.shape[1]} basis elements but this basis has "
                             f"{self.num_elements}; the added elements were not sent here")
        for piece in self.pieces:
            seg = int(np.searchsorted(breaks, piece.start, side="right")) - 1
            position = piece.start
            views = self._element_views(piece)
            while position < piece.stop:
                end = min(int(breaks[seg + 1]), piece.stop)
                lo, hi = position - piece.start, end - piece.start
                _combine(out[position:end], [v[lo:hi] for v in views], coeffs[seg])
                position, seg = end, seg + 1
        return out


def _combine(out: torch.Tensor, sources: list[torch.Tensor], row: np.ndarray) -> None:
    active = [(src, float(c)) for src, c in zip(sources, row) if c != 0.0]
    n = out.numel()
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        chunk = out[lo:hi]
        if not active:
            chunk.zero_()
            continue
        first, c0 = active[0]
        if first.dtype == torch.float32:
            torch.mul(first[lo:hi], c0, out=chunk)
        else:  # upcast before multiplying, so bf16/fp16 seeds are combined in float32
            chunk.copy_(first[lo:hi])
            chunk.mul_(c0)
        for src, c in active[1:]:
            chunk.add_(src[lo:hi], alpha=c)
