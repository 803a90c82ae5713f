"""The flat parameter vector: which floating tensors, in which order, at which offsets.

Genomes (recipes, dense vectors, split points) index into this vector, so its order must be
deterministic and identical for identically saved models; the fingerprint lets configs and
snapshots refuse a basis whose layout changed underneath them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.models.checkpoint import Checkpoint
from evomerge.models.errors import CheckpointError
from evomerge.models.safetensors_format import FLOAT_DTYPES


@dataclass(frozen=True)
class TensorSpec:
    """One tensor's place in the flat vector (offset and numel in elements, not bytes)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    numel: int

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass
class Layout:
    """Floating-point tensors only, in checkpoint order (file order, then data offset)."""

    tensors: list[TensorSpec]
    size: int
    _by_name: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name = {t.name: t for t in self.tensors}
        if len(self._by_name) != len(self.tensors):
            raise CheckpointError("layout lists a tensor twice")
        offset = 0
        for t in self.tensors:
            if t.offset != offset or t.numel != _prod(t.shape):
                raise CheckpointError(f"layout is inconsistent at {t.name!r}: offsets must be contiguous")
            offset += t.numel
        if offset != self.size:
            raise CheckpointError(f"layout size {self.size} does not equal the sum of its tensors ({offset})")

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def index(self, name: str) -> TensorSpec:
        """The spec of a tensor by name (KeyError-free: a CheckpointError that names it)."""
        try:
            return self._by_name[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is not in the layout") from None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (no pickle), small enough to ship to every worker and into snapshots."""
        return {"size": self.size, "fingerprint": self.fingerprint(),
                "tensors": [[t.name, list(t.shape), t.dtype] for t in self.tensors]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Layout":
        """Rebuild from `to_json`; offsets are recomputed, then checked against size and fingerprint."""
        try:
            layout = from_specs((str(n), tuple(int(d) for d in s), str(dt)) for n, s, dt in data["tensors"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"not a serialised layout ({exc})") from exc
        if "size" in data and int(data["size"]) != layout.size:
            raise CheckpointError(f"serialised layout says size {data['size']}, its tensors add up to {layout.size}")
        if "fingerprint" in data and data["fingerprint"] != layout.fingerprint():
            raise CheckpointError("serialised layout does not match its own fingerprint (edited or corrupt)")
        return layout

    def fingerprint(self) -> str:
        """sha256 over names, shapes and dtypes in order: equal iff genomes are interchangeable."""
        text = json.dumps([[t.name, list(t.shape), t.dtype] for t in self.tensors], separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def from_specs(specs: Any) -> Layout:
    """A Layout from (name, shape, dtype) triples, assigning contiguous offsets in that order."""
    tensors, offset = [], 0
    for name, shape, dtype in specs:
        numel = _prod(shape)
        tensors.append(TensorSpec(name, tuple(shape), dtype, offset, numel))
        offset += numel
    return Layout(tensors, offset)


def build_layout(ckpt: Checkpoint) -> Layout:
    """The layout of a checkpoint: its floating tensors in its names() order."""
    specs = []
    for name in ckpt.names():
        shape, dtype = ckpt.spec(name)
        if dtype in FLOAT_DTYPES:
            specs.append((name, shape, dtype))
    return from_specs(specs)


def read_flat(ckpt: Checkpoint, layout: Layout, out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy a checkpoint's floating tensors into one flat float32 vector (or into `out`).

    Tensors are read one at a time straight from the mapping, so peak memory is the output.
    """
    if out is None:
        out = torch.empty(layout.size, dtype=torch.float32)
    elif out.dim() != 1 or out.numel() != layout.size or not out.is_floating_point():
        raise CheckpointError(f"read_flat: out must be a 1-D floating tensor of {layout.size} elements, "
                              f"got {tuple(out.shape)} {out.dtype}")
    for t in layout.tensors:
        if t.name not in ckpt:
            raise CheckpointError(f"{ckpt.path}: tensor {t.name!r} from the layout is missing")
        shape, dtype = ckpt.spec(t.name)
        if shape != t.shape or dtype != t.dtype:
            raise CheckpointError(f"{ckpt.path}: {t.name}: {shape} {dtype} does not match the layout's "
                                  f"{t.shape} {t.dtype}")
        out[t.offset:t.end].copy_(ckpt.view(t.name).reshape(-1))
    return out
