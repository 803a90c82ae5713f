"""Work on the seeds that is done once per search, in the driver, and remembered in the run folder.

Reading every seed byte costs about a minute per 7B model. The finite check and the recipe
space's prefix Gram both need such a pass; they run once, and are keyed by a fingerprint of the
seed files (names, sizes, modification times and headers), so a resume, a restarted worker or an
export reads nothing again, while a seed that was replaced in place is checked afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.genomes.recipe import PrefixGram

FINITE_RECORD = "seeds_checked.json"
GRAM_FILE = "prefix_gram.safetensors"


def seed_fingerprint(paths: list[str], allow_pickle: bool = False) -> str:
    """sha256 over each seed's files: name, size, mtime and the safetensors header bytes."""
    from evomerge.models import open_checkpoint

    digest = hashlib.sha256()
    for path in paths:
        with open_checkpoint(path, allow_pickle=allow_pickle) as ckpt:
            files = list(ckpt.files)
        digest.update(str(Path(path).resolve()).encode())
        for file in files:
            st = os.stat(file)
            digest.update(f"{file.name}:{st.st_size}:{st.st_mtime_ns}".encode())
            with open(file, "rb") as f:
                head = f.read(8)
                if len(head) == 8:
                    n = int.from_bytes(head, "little")
                    digest.update(f.read(min(n, 100 << 20)))
    return digest.hexdigest()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_seeds_once(paths: list[str], run_dir: Path, allow_pickle: bool = False,
                     fingerprint: str | None = None) -> bool:
    """Refuse non-finite or mismatched seeds unless this run folder already checked these files.

    Returns True when it ran the check, False when the record said it was done.
    """
    from evomerge.models import open_seeds

    fingerprint = fingerprint or seed_fingerprint(paths, allow_pickle)
    record = _read_json(run_dir / FINITE_RECORD)
    if record is not None and record.get("fingerprint") == fingerprint:
        return False
    print(f"checking {len(paths)} seeds for NaN/inf (once per run folder)", file=sys.stderr)
    seeds, _ = open_seeds(paths, allow_pickle=allow_pickle, check_finite=True)
    for s in seeds:
        s.close()
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(run_dir / FINITE_RECORD,
                  (json.dumps({"fingerprint": fingerprint, "seeds": list(paths)}, indent=2) + "\n").encode())
    return True


def gram_device(config: Any) -> str | None:
    """Where the driver computes the prefix Gram: a GPU when the search's workers use GPUs and this
    process sees one (a GPU node's driver), else the host."""
    if config.workers.num_gpus <= 0:
        return None
    import torch

    return "cuda" if torch.cuda.is_available() else None


def cached_prefix_gram(basis: Any, paths: list[str], max_boundaries: int, run_dir: Path,
                       allow_pickle: bool = False, fingerprint: str | None = None,
                       device: str | None = None) -> tuple[PrefixGram, bool]:
    """The seeds' prefix Gram from `run_dir`'s cache when it matches, else computed and cached.

    Returns (gram, computed). A cache that is unreadable or for other seeds or another grid is
    recomputed and rewritten, never trusted.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import save

    key = {"fingerprint": fingerprint or seed_fingerprint(paths, allow_pickle), "max_boundaries": str(int(max_boundaries)),
           "size": str(int(basis.size)), "num_seeds": str(int(basis.num_seeds))}
    path = run_dir / GRAM_FILE
    if path.is_file():
        try:
            with safe_open(str(path), "np") as f:
                meta = f.metadata() or {}
                if all(meta.get(k) == v for k, v in key.items()):
                    return PrefixGram(f.get_tensor("grid"), f.get_tensor("prefix")), False
        except (SafetensorError, OSError, ValueError) as exc:
            print(f"warning: {path} is unreadable ({exc}); computing the prefix Gram again", file=sys.stderr)
    where = f" on {device}" if device else ""
    print(f"computing the seeds' prefix Gram{where} (once per run folder, cached in {path.name})", file=sys.stderr)
    gram = basis.prefix_gram(max_boundaries, device=device)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, save({"grid": np.ascontiguousarray(gram.grid), "prefix": np.ascontiguousarray(gram.prefix)},
                             metadata=key))
    return gram, True


def will_check_seeds(config: Any) -> bool:
    """What `prepare_seeds` returns as `checked`, known before it runs (workers start meanwhile)."""
    return isinstance(config.seeds, list) and bool(config.seeds)


def prepare_seeds(config: Any, run_dir: Path) -> tuple[PrefixGram | None, bool]:
    """The driver's one pass over checkpoint seeds: (the prefix Gram for recipe genomes, checked).

    Nothing model-sized stays in the driver: the seeds are memory-mapped and closed again.
    """
    from evomerge.engine.basis_spec import checkpoint_basis, genome_kind

    if not will_check_seeds(config):
        return None, False
    paths = list(config.seeds)
    fingerprint = seed_fingerprint(paths, config.allow_pickle)  # headers read once for both records
    check_seeds_once(paths, run_dir, config.allow_pickle, fingerprint)
    if genome_kind(config) != "recipe":
        return None, True
    basis = checkpoint_basis(paths, allow_pickle=config.allow_pickle, check_finite=False)
    try:
        gram, _ = cached_prefix_gram(basis, paths, config.genome.max_boundaries, run_dir, config.allow_pickle,
                                     fingerprint, device=gram_device(config))
    finally:
        for ckpt in getattr(basis, "checkpoints", []):
            ckpt.close()
    return gram, True
