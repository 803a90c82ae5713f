"""Open the seeds of a search and prove they can be merged, before any worker starts.

Element-wise merging only makes sense when every seed has the same tensors with the same shapes
and dtypes; a mismatch found here costs seconds, found on a worker it costs a search.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from evomerge.models.checkpoint import Checkpoint, open_checkpoint
from evomerge.models.errors import CheckpointError
from evomerge.models.layout import Layout, build_layout

FINITE_CHUNK = 1 << 22  # elements per isfinite() pass: bounded memory for any tensor size

_SAME_ARCH = ("all seeds must share one architecture (same vocabulary, hidden size and layer count); "
              "pick seeds fine-tuned from the same base model, or resize them to match")


def _describe(shape: tuple[int, ...], dtype: str, other_dtype: str) -> str:
    return f"{shape}" if dtype == other_dtype else f"{shape} {dtype}"


def compare(a: Checkpoint, b: Checkpoint) -> None:
    """Raise naming the first tensor (in a's order) where b differs, then b's first extra tensor."""
    for name in a.names():
        if name not in b:
            raise CheckpointError(f"{name}: present in {a.path} but missing in {b.path}; {_SAME_ARCH}")
        (sa, da), (sb, db) = a.spec(name), b.spec(name)
        if sa != sb or da != db:
            if sa == sb:
                raise CheckpointError(
                    f"{name}: dtype {da} in {a.path} vs {db} in {b.path}; re-save the seeds in one dtype "
                    "(e.g. `model.to(torch.bfloat16).save_pretrained(...)`)")
            raise CheckpointError(
                f"{name}: {_describe(sa, da, db)} in {a.path} vs {_describe(sb, db, da)} in {b.path}; {_SAME_ARCH}")
    extra = [n for n in b.names() if n not in a]
    if extra:
        raise CheckpointError(f"{extra[0]}: present in {b.path} but missing in {a.path}; {_SAME_ARCH}")


def assert_finite(ckpt: Checkpoint, layout: Layout) -> None:
    """Refuse NaN/inf weights: they would poison every child that inherits them."""
    for spec in layout.tensors:
        flat = ckpt.view(spec.name).reshape(-1)
        for start in range(0, spec.numel, FINITE_CHUNK):
            chunk = flat[start:start + FINITE_CHUNK]
            ok = torch.isfinite(chunk)
            if not bool(ok.all()):
                first = start + int((~ok).nonzero()[0, 0])
                nan = int(torch.isnan(chunk).sum())
                inf = int((~ok).sum()) - nan
                raise CheckpointError(
                    f"seed {ckpt.path}: tensor {spec.name} is not finite ({nan} NaN, {inf} inf in elements "
                    f"{start}..{start + chunk.numel() - 1}, first at flat index {first}); this checkpoint is "
                    "broken — use another, or set check_finite off only if you know why")


def open_seeds(paths: Sequence[str | Path], *, allow_pickle: bool = False,
               check_finite: bool = True) -> tuple[list[Checkpoint], Layout]:
    """Open every seed, check they are mergeable, and return them with their shared layout."""
    if not paths:
        raise CheckpointError("no seed checkpoints given")
    seeds: list[Checkpoint] = []
    try:
        for p in paths:
            seeds.append(open_checkpoint(p, allow_pickle=allow_pickle))
        for other in seeds[1:]:
            compare(seeds[0], other)
        layout = build_layout(seeds[0])
        if layout.size == 0:
            raise CheckpointError(f"{seeds[0].path}: has no floating-point tensors to merge")
        if check_finite:
            for s in seeds:
                assert_finite(s, layout)
    except BaseException:
        for s in seeds:
            s.close()
        raise
    return seeds, layout
