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

from evomerge.genomes.fused_combine import wants_fused
from evomerge.genomes.recipe import PrefixGram, Recipe, default_grid

CHUNK = 1 << 18  # float32 scratch elements per eager step: two 128K halves stay in cache (measured best)
# On a GPU each step is a few kernel launches; 16M elements (64 MB of float32 scratch) keep
# launches to a few hundred per 7B merge, where 1M-element steps would cost thousands.
DEVICE_CHUNK = 1 << 24
FUSED_CHUNK = 1 << 22  # the compiled kernel needs no scratch: larger steps, fewer guarded calls


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
        # auto | fused | eager: whether materialising uses the compiled one-pass kernel; it writes
        # the eager bits either way (fused_combine.py). Searches set `fitness.options.kernel`
        # (default auto) in build_basis; a basis made otherwise (export, tests) stays eager.
        self.kernel = "eager"
        self.extra: list[torch.Tensor] = []  # flat vectors of the added elements, in the seeds' dtype
        self._starts = np.array([p.start for p in pieces], dtype=np.int64)

    @property
    def dtype(self) -> torch.dtype:
        """The seeds' dtype: that of most of their elements (a bf16 model may carry a float32 buffer).

        Merge buffers, bound models, added elements and exports are kept in it (DESIGN: "the
        seeds' dtype end to end"); arithmetic is float32 per chunk.
        """
        counts: dict[torch.dtype, int] = {}
        for piece in self.pieces:
            dt = piece.views[0].dtype
            counts[dt] = counts.get(dt, 0) + piece.stop - piece.start
        return max(counts, key=counts.__getitem__) if counts else torch.float32

    def new_buffer(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """An uninitialised flat vector in the seeds' dtype: what a merge is materialised into."""
        return torch.empty(self.size, dtype=self.dtype, device=device)

    def seed_bytes(self) -> int:
        """Bytes of all seeds as stored (K models of F each for checkpoint seeds)."""
        return sum(v.numel() * v.element_size() for piece in self.pieces for v in piece.views)

    def place(self, device: str | torch.device | None) -> None:
        """Seeds resident on `device` (a GPU: materialising reads them at device bandwidth), or, with
        None, copied into pinned host memory so that chunks stream to a GPU buffer asynchronously.

        Replaces each view tensor by tensor, so the peak is the placed seeds plus one tensor.
        """
        for piece in self.pieces:
            if device is None:
                piece.views = [v if v.is_pinned() else v.pin_memory() for v in piece.views]
            else:
                piece.views = [v.to(device) for v in piece.views]

    @property
    def num_elements(self) -> int:
        return self.num_seeds + len(self.extra)

    def add_element(self, vector: torch.Tensor) -> int:
        """Append a materialised model as a new element; returns its index among the elements.

        The basis keeps `vector` itself when it is already in the seeds' dtype (no model-sized
        copy): pass a tensor nobody writes to again. Others are cast to that dtype once.
        """
        vector = vector.detach().to(self.dtype).reshape(-1)
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

    def prefix_gram(self, max_boundaries: int = 1 << 16, device: torch.device | str | None = None) -> PrefixGram:
        """Tensor boundaries are always on the grid, so layer-wise recipes (CMA-ES) fit on it.

        `device` (a GPU): each grid interval's (K, n) block is upcast to float64 and multiplied
        there, the increments summed on the device and fetched once. The host path (None) turns
        every block into a float64 numpy array first, which is most of its time on a large model.
        The two agree to float64 rounding (sums in another order), not bit for bit; a run keeps
        whichever it computed first (the cache)."""
        grid = np.union1d(default_grid(self.size, max_boundaries), self._starts)
        if device is None:
            return PrefixGram.from_chunks(grid, self.values)
        return PrefixGram(grid, self._prefix_on(grid, torch.device(device)))

    def _prefix_on(self, grid: np.ndarray, device: torch.device) -> np.ndarray:
        k = self.num_elements
        increments = torch.zeros((grid.size, k, k), dtype=torch.float64, device=device)
        for i in range(1, grid.size):
            lo, hi = int(grid[i - 1]), int(grid[i])
            p = int(np.searchsorted(self._starts, lo, side="right")) - 1
            piece = self.pieces[p]  # grid intervals never cross a piece: piece starts are on the grid
            block = torch.stack([v[lo - piece.start:hi - piece.start].to(device=device, dtype=torch.float64)
                                 for v in self._element_views(piece)])
            increments[i] = block @ block.T
        return torch.cumsum(increments, dim=0).cpu().numpy()

    def prepare_kernel(self, out: torch.Tensor) -> bool:
        """Start compiling the fused kernel for rows over all the seeds now (a worker's start), not
        inside its first timed evaluation; under `kernel: fused` wait for it. Whether it is ready."""
        if not wants_fused(self.kernel, self.size) or not self.pieces:
            return False
        from evomerge.genomes.fused_combine import fused_kernel

        piece = max(self.pieces, key=lambda p: p.stop - p.start)
        return fused_kernel([v.dtype for v in piece.views], out.dtype, out.device, _eager,
                            wait=self.kernel == "fused") is not None

    def materialise(self, recipe: Recipe, out: torch.Tensor | None = None) -> torch.Tensor:
        """Weights of `recipe` in `out` (default: a new float32 vector; any floating dtype and device)."""
        if out is None:
            out = torch.empty(self.size, dtype=torch.float32)
        if out.dim() != 1 or out.numel() != self.size or not out.is_floating_point():
            raise ValueError(f"materialise needs a flat floating buffer of {self.size} values, "
                             f"got {tuple(out.shape)} {out.dtype}")
        return self.materialise_span(recipe, 0, self.size, out)

    def materialise_span(self, recipe: Recipe, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Weights of `recipe` on [start, stop) of the flat layout, into `out` (stop - start values).

        Bit for bit the same values `materialise` writes there; lets a caller fill one tensor at a
        time (an export's progress), or fill a tensor of another dtype than the seeds' on its own.
        """
        if not 0 <= start <= stop <= self.size:
            raise ValueError(f"span [{start}, {stop}) is outside the basis of {self.size} values")
        if out.dim() != 1 or out.numel() != stop - start or not out.is_floating_point():
            raise ValueError(f"materialise_span needs a flat floating buffer of {stop - start} values, "
                             f"got {tuple(out.shape)} {out.dtype}")
        breaks, coeffs = recipe.breaks, recipe.coeffs
        if int(breaks[-1]) != self.size:
            raise ValueError(f"recipe covers {int(breaks[-1])} parameters but the basis has {self.size}")
        if coeffs.shape[1] > self.num_elements:
            raise ValueError(f"recipe uses {coeffs.shape[1]} basis elements but this basis has "
                             f"{self.num_elements}; the added elements were not sent here")
        step = DEVICE_CHUNK if out.device.type == "cuda" else CHUNK
        fused = wants_fused(self.kernel, self.size)
        if fused:
            step = FUSED_CHUNK
        # float32 room for two half-steps (the sum and the next product); no larger than the span
        scratch = None if fused else torch.empty(max(min(step, stop - start), 2), dtype=torch.float32,
                                                 device=out.device)
        i = max(int(np.searchsorted(self._starts, start, side="right")) - 1, 0)
        while i < len(self.pieces) and self.pieces[i].start < stop:
            piece = self.pieces[i]
            lo_p, hi_p = max(start, piece.start), min(stop, piece.stop)
            seg = int(np.searchsorted(breaks, lo_p, side="right")) - 1
            position = lo_p
            views = self._element_views(piece)
            while position < hi_p:
                end = min(int(breaks[seg + 1]), hi_p)
                lo, hi = position - piece.start, end - piece.start
                _combine(out[position - start:end - start], [v[lo:hi] for v in views], coeffs[seg], scratch, step,
                         fused, wait=self.kernel == "fused")
                position, seg = end, seg + 1
            i += 1
        return out


def _combine(out: torch.Tensor, sources: list[torch.Tensor], row: Sequence[float],
             scratch: torch.Tensor | None = None, step: int = CHUNK, fused: bool = False,
             wait: bool = True) -> None:
    """out = sum_k row[k] * sources[k], a chunk at a time, in float32.

    Each product is rounded to float32 and the products are summed in source order, then
    rounded once to `out`'s dtype: the arithmetic the fused kernel (`fused_combine`) compiles,
    so both write the same bits. `out` may be bf16/fp16 (the seeds' dtype) and may live on
    another device than the sources (host seeds streamed to a GPU buffer chunk by chunk).
    `scratch` is float32 room for the sum and one product: with it, chunks are half its size. A
    lone coefficient of exactly 1 copies bits, so a seed materialises to itself. `fused`: use the
    compiled kernel; `wait`: for it to compile, rather than running eagerly until it is ready.
    """
    active = [(src, float(c)) for src, c in zip(sources, row) if c != 0.0]
    n = out.numel()
    device = out.device
    if len(active) == 1 and active[0][1] == 1.0 and active[0][0].dtype == out.dtype:
        out.copy_(active[0][0], non_blocking=True)
        return
    if not active:
        out.zero_()
        return
    kernel = None
    if fused:
        from evomerge.genomes.fused_combine import fused_kernel

        kernel = fused_kernel([src.dtype for src, _ in active], out.dtype, device, _eager, wait=wait)
    if kernel is not None:
        coeffs = torch.tensor([c for _, c in active], dtype=torch.float32, device=device)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            kernel(out[lo:hi], coeffs, *(src[lo:hi].to(device, non_blocking=True) for src, _ in active))
        return
    if scratch is None:  # a fused call whose kernel is not ready (compiling) or not usable: eager,
        # in cache-sized halves allocated once, not FUSED_CHUNK-sized ones allocated per step
        cap = DEVICE_CHUNK if device.type == "cuda" else CHUNK
        scratch = torch.empty(max(min(cap, 2 * n), 2), dtype=torch.float32, device=device)
    step = min(step, scratch.numel() // 2)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        room = _scratch(scratch, 2 * (hi - lo), device)
        acc, term = room[:hi - lo], room[hi - lo:]
        exact = out.dtype == torch.float32
        if exact:
            acc = out[lo:hi]
        for j, (src, c) in enumerate(active):
            part = src[lo:hi].to(device, non_blocking=True)
            target = acc if j == 0 else term
            if part.dtype == torch.float32:
                torch.mul(part, c, out=target)
            else:  # upcast before multiplying, so bf16/fp16 seeds are combined in float32
                target.copy_(part)
                target.mul_(c)
            if j:
                acc.add_(term)
        if not exact:
            out[lo:hi].copy_(acc)


def _eager(out: torch.Tensor, sources: list[torch.Tensor], row: Sequence[float]) -> None:
    """The eager combine in one call: what the fused kernel is checked against."""
    _combine(out, sources, row, step=max(out.numel(), 1))


def _scratch(scratch: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    if scratch is None or scratch.numel() < n or scratch.device != device:
        return torch.empty(n, dtype=torch.float32, device=device)
    return scratch[:n]
