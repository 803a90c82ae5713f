"""Column genomes (DAM): per seed, one coefficient per input column of every weight matrix.

A recipe cannot say this compactly: the input columns of an HF `(out, in)` weight are strided in
the flat vector, so every element would need its own segment. A column genome is instead a
layout of *groups* (one per tensor, each with its input-column axis, or none for a single
per-seed scalar) plus a (K, C) coefficient matrix: a few KB whatever the model size.

`combine` is the one place where seeds and coefficients meet. DAM's differentiable forward and
the worker's materialisation both call it, so a trained merge and its materialised genome agree
to the bit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class ColumnGroup:
    """One tensor of the flat layout: where it is, its shape, and which axis indexes input columns."""

    name: str
    offset: int
    shape: tuple[int, ...]
    axis: int | None  # None: one coefficient per seed for the whole tensor (biases, norms)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def stop(self) -> int:
        return self.offset + self.numel

    @property
    def width(self) -> int:
        """Coefficients per seed: the number of input columns, or 1."""
        return 1 if self.axis is None else int(self.shape[self.axis])

    def coefficient_shape(self) -> tuple[int, ...]:
        """The shape a seed's coefficient vector takes to broadcast over this tensor."""
        if self.axis is None:
            return (1,) * len(self.shape)
        return tuple(d if i == self.axis else 1 for i, d in enumerate(self.shape))


class ColumnLayout:
    """Groups covering the flat vector [0, size) contiguously, and where each group's coefficients sit."""

    def __init__(self, groups: Sequence[ColumnGroup]) -> None:
        self.groups = list(groups)
        position = 0
        for g in self.groups:
            if g.offset != position:
                raise ValueError(f"column group {g.name!r} starts at {g.offset}, expected {position}: "
                                 "groups must cover the flat layout contiguously and in order")
            if g.axis is not None and not -len(g.shape) <= g.axis < len(g.shape):
                raise ValueError(f"column group {g.name!r}: axis {g.axis} is out of range for shape {g.shape}")
            position = g.stop
        self.size = position
        widths = np.array([g.width for g in self.groups], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
        self.num_coeffs = int(self.starts[-1])

    def __len__(self) -> int:
        return len(self.groups)

    def coeff_slice(self, index: int) -> slice:
        return slice(int(self.starts[index]), int(self.starts[index + 1]))

    def column_groups(self) -> list[int]:
        """Indices of the groups with per-column coefficients (the ones DAM's cosine penalty looks at)."""
        return [i for i, g in enumerate(self.groups) if g.axis is not None]

    @classmethod
    def from_tensors(cls, tensors: Iterable[tuple[str, tuple[int, ...]]],
                     axis_of: Callable[[str, tuple[int, ...]], int | None]) -> "ColumnLayout":
        """Groups in the given order, contiguous from 0; `axis_of(name, shape)` picks the column axis."""
        groups, offset = [], 0
        for name, shape in tensors:
            shape = tuple(int(d) for d in shape)
            group = ColumnGroup(name, offset, shape, axis_of(name, shape))
            groups.append(group)
            offset = group.stop
        return cls(groups)

    # -- serialisation: as plain arrays, so a genome file is self-contained without pickle --------
    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        ndims = np.array([len(g.shape) for g in self.groups], dtype=np.int64)
        dims = np.array([d for g in self.groups for d in g.shape], dtype=np.int64)
        axes = np.array([-1 if g.axis is None else g.axis % len(g.shape) for g in self.groups], dtype=np.int64)
        return {f"{prefix}/ndims": ndims, f"{prefix}/dims": dims, f"{prefix}/axes": axes}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str, names: Sequence[str] | None = None) -> "ColumnLayout":
        ndims, dims, axes = (np.asarray(arrays[f"{prefix}/{k}"]).tolist() for k in ("ndims", "dims", "axes"))
        shapes, position = [], 0
        for n in ndims:
            shapes.append(tuple(dims[position:position + n]))
            position += n
        names = list(names) if names is not None else [f"group{i}" for i in range(len(shapes))]
        return cls.from_tensors(zip(names, shapes), _AxisList([None if a < 0 else a for a in axes]))

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "fingerprint": self.fingerprint(),
                "groups": [[g.name, list(g.shape), g.axis] for g in self.groups]}

    def fingerprint(self) -> str:
        """Shapes and axes (not names): equal iff coefficient matrices are interchangeable."""
        text = json.dumps([[list(g.shape), g.axis] for g in self.groups], separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


class _AxisList:
    """axis_of that replays a stored list of axes, one per group in order."""

    def __init__(self, axes: list[int | None]) -> None:
        self._axes = iter(axes)

    def __call__(self, name: str, shape: tuple[int, ...]) -> int | None:
        return next(self._axes)


def combine(group: ColumnGroup, coeffs: torch.Tensor, seeds: Sequence[torch.Tensor],
            out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k coeffs[k] (broadcast along the column axis) * seeds[k], in float32.

    `coeffs` is (K, width); `seeds` are K tensors of the group's shape, any floating dtype.
    Differentiable in `coeffs` when `out` is None. The order of operations is fixed (seed 0 first,
    each product rounded, then added), so training and materialisation give the same bits.
    """
    shape = group.coefficient_shape()
    acc = out
    for k, seed in enumerate(seeds):
        c = coeffs[k].reshape(shape)
        w = seed if seed.dtype == torch.float32 else seed.to(torch.float32)
        if acc is None:
            acc = w * c
        elif out is not None and k == 0:
            torch.mul(w, c, out=acc)
        elif out is not None:
            acc.add_(w * c)
        else:
            acc = acc + w * c
    assert acc is not None, "combine needs at least one seed"
    return acc


class _CombineSavingSeeds(torch.autograd.Function):
    """`combine` whose backward keeps the seeds as they are (views of the basis, any dtype).

    Plain autograd through `combine` saves each seed's float32 upcast for the coefficients'
    gradient: K float32 copies of the model (4K bytes a parameter for bf16 seeds). The gradient
    needs only sum(grad * seed_k) over the broadcast axes, which is upcast one group at a time here.
    The forward is `combine` itself, so training and materialisation give the same bits."""

    @staticmethod
    def forward(ctx, coeffs: torch.Tensor, group: ColumnGroup, *seeds: torch.Tensor) -> torch.Tensor:
        ctx.group = group
        ctx.save_for_backward(*seeds)
        return combine(group, coeffs.detach(), seeds)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape = ctx.group.coefficient_shape()
        rows = []
        for seed in ctx.saved_tensors:
            w = seed if seed.dtype == torch.float32 else seed.to(torch.float32)
            rows.append((grad * w).sum_to_size(shape).reshape(-1))
        return (torch.stack(rows), None, *([None] * len(ctx.saved_tensors)))


def combine_trainable(group: ColumnGroup, coeffs: torch.Tensor, seeds: Sequence[torch.Tensor]) -> torch.Tensor:
    """`combine`, differentiable in `coeffs`, holding no float32 copy of the seeds for backward."""
    return _CombineSavingSeeds.apply(coeffs, group, *seeds)


def group_views(basis: Any, group: ColumnGroup) -> list[torch.Tensor]:
    """The K seeds' values of one group from a `Basis`, shaped; zero-copy when one piece holds it."""
    starts = basis._starts
    i = int(np.searchsorted(starts, group.offset, side="right")) - 1
    piece = basis.pieces[i]
    if group.stop <= piece.stop:
        lo, hi = group.offset - piece.start, group.stop - piece.start
        return [v[lo:hi].reshape(group.shape) for v in piece.views]
    parts: list[list[torch.Tensor]] = [[] for _ in range(basis.num_seeds)]
    position = group.offset
    while position < group.stop:
        piece = basis.pieces[i]
        hi = min(group.stop, piece.stop)
        for k, v in enumerate(piece.views):
            parts[k].append(v[position - piece.start:hi - piece.start].to(torch.float32))
        position, i = hi, i + 1
    return [torch.cat(p).reshape(group.shape) for p in parts]


@dataclass(frozen=True)
class ColumnGenome:
    """A DAM merge: the layout it is written in and one coefficient row per seed."""

    layout: ColumnLayout
    coeffs: np.ndarray  # float32, (K, layout.num_coeffs)

    def __post_init__(self) -> None:
        if self.coeffs.ndim != 2 or self.coeffs.shape[1] != self.layout.num_coeffs:
            raise ValueError(f"column genome coefficients must be (K, {self.layout.num_coeffs}), "
                             f"got {self.coeffs.shape}")

    @property
    def num_seeds(self) -> int:
        return int(self.coeffs.shape[0])

    @staticmethod
    def uniform(layout: ColumnLayout, num_seeds: int) -> "ColumnGenome":
        """Every coefficient exactly float32(1/K): DAM's starting point, the plain average."""
        return ColumnGenome(layout, np.full((num_seeds, layout.num_coeffs), 1.0 / num_seeds, dtype=np.float32))

    @staticmethod
    def seed(layout: ColumnLayout, index: int, num_seeds: int) -> "ColumnGenome":
        coeffs = np.zeros((num_seeds, layout.num_coeffs), dtype=np.float32)
        coeffs[index] = 1.0
        return ColumnGenome(layout, coeffs)

    def group_coeffs(self, index: int) -> np.ndarray:
        return self.coeffs[:, self.layout.coeff_slice(index)]

    def equals(self, other: "ColumnGenome") -> bool:
        return (self.layout.fingerprint() == other.layout.fingerprint()
                and np.array_equal(self.coeffs, other.coeffs))

    def materialise(self, basis: Any, out: torch.Tensor | None = None) -> torch.Tensor:
        """The merged flat vector from a `Basis` (memory-mapped checkpoints or in-memory seeds).

        Float32 by default; into a bf16/fp16 `out` each group is summed in float32 first (one
        tensor's worth of scratch) and rounded once, so the seeds' dtype costs no precision.
        """
        if basis.size != self.layout.size:
            raise ValueError(f"column genome covers {self.layout.size} parameters but the basis has {basis.size}")
        if basis.num_seeds != self.num_seeds:
            raise ValueError(f"column genome has coefficients for {self.num_seeds} seeds, the basis has "
                             f"{basis.num_seeds}")
        if out is None:
            out = torch.empty(self.layout.size, dtype=torch.float32)
        coeffs = torch.from_numpy(np.array(self.coeffs, dtype=np.float32))  # a copy: Ray hands out read-only arrays
        with torch.no_grad():
            for i, group in enumerate(self.layout.groups):
                target = out[group.offset:group.stop].view(group.shape)
                acc = target if out.dtype == torch.float32 else torch.empty(group.shape, dtype=torch.float32,
                                                                            device=out.device)
                views = [v.to(out.device) for v in group_views(basis, group)]
                combine(group, coeffs[:, self.layout.coeff_slice(i)].to(out.device), views, out=acc)
                if acc is not target:
                    target.copy_(acc)
        return out

    def materialise_dense(self, seeds: Sequence[np.ndarray]) -> np.ndarray:
        from evomerge.genomes.basis import Basis

        return self.materialise(Basis.from_arrays(seeds)).numpy()


def pack_columns(genomes: list[ColumnGenome | None], prefix: str,
                 layout: ColumnLayout | None = None) -> dict[str, np.ndarray]:
    """Many genomes over one layout as flat arrays (safetensors-friendly; no pickle), layout included."""
    present = [g for g in genomes if g is not None]
    layout = layout or (present[0].layout if present else None)
    if layout is None:
        raise ValueError("pack_columns needs a layout when no genome is present")
    k = present[0].num_seeds if present else 0
    coeffs = np.zeros((len(genomes), k, layout.num_coeffs), dtype=np.float32)
    for i, g in enumerate(genomes):
        if g is not None:
            if g.layout.fingerprint() != layout.fingerprint():
                raise ValueError("all packed column genomes must share one layout")
            coeffs[i] = g.coeffs
    return {f"{prefix}/present": np.array([g is not None for g in genomes], dtype=bool),
            f"{prefix}/coeffs": coeffs, **layout.to_arrays(f"{prefix}/layout")}


def unpack_columns(arrays: dict[str, np.ndarray], prefix: str,
                   layout: ColumnLayout | None = None) -> list[ColumnGenome | None]:
    stored = ColumnLayout.from_arrays(arrays, f"{prefix}/layout")
    if layout is None:
        layout = stored
    elif layout.fingerprint() != stored.fingerprint():
        raise ValueError(f"{prefix}: the stored column layout does not match this model's layout")
    present, coeffs = arrays[f"{prefix}/present"], arrays[f"{prefix}/coeffs"]
    return [ColumnGenome(layout, np.array(coeffs[i], dtype=np.float32)) if present[i] else None
            for i in range(len(present))]


class ColumnSpace:
    """Genome space for DAM over checkpoint seeds: enough for the population to snapshot column genomes.

    DAM proposes genomes itself, so the evolutionary operators are refused with a clear message.
    """

    kind = "columns"

    def __init__(self, layout: ColumnLayout, num_seeds: int) -> None:
        self.layout = layout
        self.size = layout.size
        self._num_seeds = num_seeds

    @property
    def num_seeds(self) -> int:
        return self._num_seeds

    def seed_genome(self, index: int) -> ColumnGenome:
        return ColumnGenome.seed(self.layout, index, self._num_seeds)

    def copy(self, genome: ColumnGenome) -> ColumnGenome:
        return genome  # column genomes are never modified in place

    def realise(self, genome: Any) -> Any:
        """Column genomes are whole as asked (none is bred later): the best goes out as it is."""
        return genome

    def pack(self, genomes: list[Any], prefix: str) -> dict[str, np.ndarray]:
        return pack_columns(list(genomes), prefix, self.layout)

    def unpack(self, arrays: dict[str, np.ndarray], prefix: str) -> list[Any]:
        return unpack_columns(arrays, prefix, self.layout)

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("column genomes are written by the dam strategy only; evolutionary operators "
                         "(crossover, mutation, random starts) need dense or recipe genomes")

    random_genome = draw_split = crossover = mutate = _refuse
