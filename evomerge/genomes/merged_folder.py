"""A merge that already sits on disk as a model folder, read back along the seeds' layout.

Data-based merges (fisher, regmean) need each seed's statistics on its own examples, which only
the driver computes (evomerge/engine/data_merges.py): it runs `evomerge merge` once per search
into the run folder. Every other process (population, workers, export) then only reads that
folder, tensor by tensor and BY NAME, into the flat buffer a basis element or a candidate lives
in. The genome itself is the folder's path: a few bytes in snapshots and over the wire.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class MergedFolder:
    path: str  # absolute: workers need not share the driver's working directory
    label: str = ""  # the merge spec's label, for messages

    def materialise(self, basis: Any, out: torch.Tensor | None = None) -> torch.Tensor:
        """The folder's tensors in the basis layout, cast to `out`'s dtype (default float32).

        Refuses a folder whose names or shapes differ from the seeds': it was merged from other
        seeds, and position-based reading would silently scramble the model.
        """
        from evomerge.models import open_checkpoint

        layout = getattr(basis, "layout", None)
        if layout is None:
            raise ValueError(f"merge {self.label or self.path} is a model folder; it binds by tensor name, "
                             "so it needs checkpoint seeds (in-memory seeds have no names)")
        if out is None:
            out = torch.empty(basis.size, dtype=torch.float32)
        if out.dim() != 1 or out.numel() != basis.size:
            raise ValueError(f"materialise needs a flat buffer of {basis.size} values, got {tuple(out.shape)}")
        with open_checkpoint(self.path) as ckpt:
            names = set(ckpt.names())
            missing = [t.name for t in layout.tensors if t.name not in names]
            if missing:
                raise ValueError(f"merged folder {self.path} lacks {len(missing)} of the seeds' tensors "
                                 f"(first: {missing[0]}); it was not merged from these seeds; delete it and "
                                 "start the search again")
            for spec in layout.tensors:
                view = ckpt.view(spec.name)
                if tuple(view.shape) != tuple(spec.shape):
                    raise ValueError(f"merged folder {self.path}: tensor {spec.name} has shape {tuple(view.shape)}, "
                                     f"the seeds' {tuple(spec.shape)}; it was not merged from these seeds")
                out[spec.offset:spec.offset + spec.numel].copy_(view.reshape(-1))
        return out

    def equals(self, other: Any) -> bool:
        return isinstance(other, MergedFolder) and (self.path, self.label) == (other.path, other.label)


def pack_folders(genomes: list[MergedFolder | None], prefix: str) -> dict[str, np.ndarray]:
    """Paths and labels as JSON bytes (no pickle), one entry per genome (None where absent)."""
    rows = [None if g is None else {"path": g.path, "label": g.label} for g in genomes]
    return {f"{prefix}/json": np.frombuffer(json.dumps(rows).encode(), dtype=np.uint8).copy()}


def unpack_folders(arrays: dict[str, np.ndarray], prefix: str) -> list[MergedFolder | None]:
    rows = json.loads(bytes(np.asarray(arrays[f"{prefix}/json"], np.uint8)).decode())
    return [None if r is None else MergedFolder(str(r["path"]), str(r.get("label", ""))) for r in rows]


def spec_folder(spec: Any, space: Any) -> MergedFolder:
    """A data-based merge spec (`MergeSpec`) in a search: the folder the driver merged it into."""
    if space.kind == "dense":
        raise ValueError(f"{spec.method} merges checkpoints by tensor name with each seed's own LM examples; "
                         "in-memory seeds (e.g. `seeds: task`) have neither; use a method without data here, "
                         "or checkpoint seeds")
    if spec.merged is None:
        raise ValueError(f"{spec.method}: no merged folder; the driver merges data-based specs before the search "
                         "starts (`evomerge search`, or `run_local(config, run_dir=...)`)")
    return MergedFolder(spec.merged, spec.label())
