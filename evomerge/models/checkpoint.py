"""Open one model lazily and memory-mapped, so every worker on a node shares the page cache.

A view is a tensor over a read-only shared mapping of the file: no bytes are copied or even read
until used, and N workers opening the same seed cost one copy of it in RAM. Writing into a view
is a bug (it crashes with SIGSEGV rather than silently corrupting a seed); clone first.
"""

from __future__ import annotations

import json
import mmap
import warnings
from pathlib import Path
from typing import Any

import torch

from evomerge.models.errors import CheckpointError
from evomerge.models.safetensors_format import DTYPES, Entry, dtype_name, read_header

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


class Checkpoint:
    """One model's tensors by name; see `open_checkpoint`."""

    def __init__(self, path: Path, files: list[Path], entries: dict[str, tuple[int, Entry]] | None = None,
                 loaded: dict[str, torch.Tensor] | None = None, allow_pickle: bool = False) -> None:
        self.path = path
        self.files = files
        self.allow_pickle = allow_pickle
        self._entries = entries or {}
        self._loaded = loaded  # only for pickle checkpoints, which cannot be mapped
        self._raw: dict[int, torch.Tensor] = {}  # file index -> uint8 tensor over the whole mapping
        if loaded is not None:
            self._names = list(loaded)
        else:  # layout order: file order, then position inside the file
            self._names = sorted(self._entries, key=lambda k: (self._entries[k][0], self._entries[k][1].start, k))

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, tensors={len(self._names)})"

    def __reduce__(self) -> tuple[Any, ...]:
        """Travel (e.g. to a Ray worker) as a path and reopen there: mappings cannot be shipped."""
        return (_reopen, (str(self.path), self.allow_pickle))

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __contains__(self, name: object) -> bool:
        return name in self._entries if self._loaded is None else name in self._loaded

    def __len__(self) -> int:
        return len(self._names)

    def names(self) -> list[str]:
        """Every tensor (floating or not), in layout order."""
        return list(self._names)

    def spec(self, name: str) -> tuple[tuple[int, ...], str]:
        """Shape and safetensors dtype string, from the header alone (no data is touched)."""
        if self._loaded is not None:
            t = self._get_loaded(name)
            return tuple(t.shape), dtype_name(t.dtype)
        entry = self._entry(name)[1]
        return entry.shape, entry.dtype

    def file_of(self, name: str) -> Path:
        """The file a tensor lives in, for error messages that point at the right shard."""
        return self.files[self._entry(name)[0]] if self._loaded is None else self.files[0]

    def view(self, name: str) -> torch.Tensor:
        """The tensor itself, zero-copy over the mapping (in memory for pickle checkpoints)."""
        if self._loaded is not None:
            return self._get_loaded(name)
        index, entry = self._entry(name)
        raw = self._raw.get(index)
        if raw is None:
            raw = self._raw[index] = _map(self.files[index])
        dtype = DTYPES[entry.dtype]
        data = raw[entry.start:entry.end]
        try:
            return data.view(dtype).reshape(entry.shape)
        except RuntimeError:  # misaligned (non-standard writer): fall back to one aligned copy
            return data.clone().view(dtype).reshape(entry.shape)

    def config(self) -> dict | None:
        """The folder's config.json, parsed; None for a bare file or a folder without one."""
        cfg = self.path / "config.json" if self.path.is_dir() else None
        if cfg is None or not cfg.is_file():
            return None
        try:
            return json.loads(cfg.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{cfg}: not valid JSON ({exc})") from exc

    def close(self) -> None:
        """Drop our mappings; each is unmapped once the last view over it is gone too.

        The mmap is deliberately not closed by hand: views hold raw pointers into it, and an
        explicit close under a live view would turn the next read into a crash.
        """
        self._raw.clear()
        if self._loaded is not None:
            self._loaded = {}

    def _entry(self, name: str) -> tuple[int, Entry]:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def _get_loaded(self, name: str) -> torch.Tensor:
        assert self._loaded is not None
        try:
            return self._loaded[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None


def _reopen(path: str, allow_pickle: bool) -> Checkpoint:
    return open_checkpoint(path, allow_pickle=allow_pickle)


def _map(path: Path) -> torch.Tensor:
    """One read-only shared mapping of a whole file, as a uint8 tensor every view slices."""
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot memory-map ({exc})") from exc
    with warnings.catch_warnings():  # torch warns that the buffer is read-only: that is the point
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mm, dtype=torch.uint8)


def _safetensors_files(path: Path) -> list[Path] | None:
    """The ordered safetensors files of a folder or file, or None if there are none."""
    if path.is_file():
        return [path] if path.suffix == ".safetensors" else None
    index = path / INDEX
    if index.is_file():
        return _files_from_index(index)
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    found = sorted(path.glob("*.safetensors"))
    if len(found) > 1:
        raise CheckpointError(
            f"{path}: {len(found)} .safetensors files but no {INDEX} to say how they fit together; "
            "add the index, or point at one file")
    return found or None


def _files_from_index(index: Path) -> list[Path]:
    """Shard files named by an index, in shard (file name) order; all must exist."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
    out = [index.parent / f for f in files]
    for f in out:
        if not f.is_file():
            raise CheckpointError(
                f"{f}: shard listed in {index.name} does not exist; download the missing shard "
                "(e.g. `huggingface-cli download` again) or re-save the model")
    return out


def _open_safetensors(path: Path, files: list[Path]) -> dict[str, tuple[int, Entry]]:
    entries: dict[str, tuple[int, Entry]] = {}
    for i, f in enumerate(files):
        for name, entry in read_header(f)[0].items():
            if name in entries:
                raise CheckpointError(f"{path}: tensor {name!r} is in both {files[entries[name][0]].name} and {f.name}")
            entries[name] = (i, entry)
    index = path / INDEX
    if path.is_dir() and index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        for name, fname in weight_map.items():
            if name not in entries or files[entries[name][0]].name != fname:
                raise CheckpointError(
                    f"{index}: says {name!r} is in {fname}, but that shard does not hold it; "
                    "the shards and the index are from different saves — re-download or re-save")
    return entries


def _pickle_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path] if path.suffix in PICKLE_SUFFIXES else []
    index = path / "pytorch_model.bin.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: not a valid index ({exc})") from exc
        return [path / n for n in names]
    if (path / "pytorch_model.bin").is_file():
        return [path / "pytorch_model.bin"]
    return sorted(p for s in PICKLE_SUFFIXES for p in path.glob(f"*{s}"))


def _load_pickle(path: Path, files: list[Path]) -> dict[str, torch.Tensor]:
    """Load pickle checkpoints with the restricted unpickler only (weights_only=True)."""
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the index but missing; download it again")
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # the restricted unpickler raises several types
            raise CheckpointError(f"{f}: cannot load as a weights-only torch checkpoint ({exc})") from exc
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{f}: expected a flat dict of name -> tensor")
        out.update({str(k): v.contiguous() for k, v in state.items()})
    return out


def open_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
    """Open an HF folder (single or sharded safetensors) or a bare .safetensors file.

    Headers are read and bounds-checked now; data is mapped on first view. Pickle checkpoints
    are refused unless allow_pickle, because unpickling a file can run arbitrary code.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    files = _safetensors_files(p)
    if files:
        return Checkpoint(p, files, entries=_open_safetensors(p, files), allow_pickle=allow_pickle)
    pickles = _pickle_files(p)
    if not pickles:
        raise CheckpointError(f"{p}: no model.safetensors, sharded safetensors index, or .bin checkpoint found")
    if not allow_pickle:
        raise CheckpointError(
            f"{p}: only a pickle checkpoint ({pickles[0].name}) is present. Loading pickle files can run "
            "arbitrary code, so it is refused. Convert it once, where you trust it: "
            "`python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{p}').save_pretrained('{p}-safetensors')\"` and use that folder, "
            "or, if you trust the file, set `allow_pickle: true` in the config "
            "(it is then loaded with torch.load(weights_only=True), into memory rather than mapped)")
    return Checkpoint(p, pickles, loaded=_load_pickle(p, pickles), allow_pickle=True)
