"""The safetensors container, read and written by hand.

Why not the `safetensors` package: its `get_tensor` copies every tensor, and its writer refuses
tensors that share storage (which every zero-copy view of one mmap does) and needs everything in
memory at once. The format is tiny: 8-byte little-endian header length, a JSON header mapping
names to dtype/shape/data_offsets (relative to the end of the header), then raw little-endian data.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from evomerge.models.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the same bound the reference reader uses against garbage

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# Only these enter a Layout: merging integer buffers (position ids, masks) would be meaningless.
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


def itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype string."""
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors dtype string of a torch dtype (error if safetensors cannot store it)."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors") from None


@dataclass(frozen=True)
class Entry:
    """Where one tensor's bytes live: absolute byte range inside its file."""

    shape: tuple[int, ...]
    dtype: str
    start: int
    end: int


def read_header(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """Parse and bounds-check a header, so a truncated file fails here and not as SIGBUS later."""
    fix = f"re-download or re-save {path.name}; the file is incomplete or corrupt"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short for a safetensors header; {fix}")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: header length {n} runs past the end of the file ({size} bytes); {fix}")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from exc
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except ValueError as exc:
        raise CheckpointError(f"{path}: header is not valid safetensors JSON ({exc}); {fix}") from exc
    metadata = header.pop("__metadata__", None) or {}
    base, data_size = 8 + n, size - 8 - n
    entries: dict[str, Entry] = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}; {fix}") from exc
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}, which this torch cannot read")
        if end > data_size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at byte {base + end} but the file has {size} bytes "
                f"(truncated?); {fix}")
        if begin < 0 or end - begin != math.prod(shape) * itemsize(dtype) or min(shape, default=0) < 0:
            raise CheckpointError(f"{path}: tensor {name!r} has data_offsets that do not match its shape; {fix}")
        entries[name] = Entry(shape, dtype, base + begin, base + end)
    spans = sorted((e.start, e.end, k) for k, e in entries.items() if e.end > e.start)
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap; {fix}")
    return entries, {str(k): str(v) for k, v in metadata.items()}


def stored_dtype(t: torch.Tensor, cast: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor is written in: floating tensors take `cast`, the rest keep theirs."""
    return cast if cast is not None and t.is_floating_point() else t.dtype


def stored_nbytes(t: torch.Tensor, cast: torch.dtype | None = None) -> int:
    return t.numel() * torch.empty((), dtype=stored_dtype(t, cast)).element_size()


def write_file(path: Path, tensors: Iterable[tuple[str, torch.Tensor]],
               metadata: Mapping[str, str] | None = None, cast: torch.dtype | None = None,
               progress: Callable[[int], None] | None = None) -> int:
    """Stream tensors into one safetensors file and fsync it; returns the data size in bytes.

    Casting happens one tensor at a time while writing, so peak memory is one tensor, not a model.
    Tensors go in descending element size, then name, so every tensor is naturally aligned
    after the 8-byte-padded header (the order the reference writer uses too). `progress(nbytes)`
    is called after each tensor is written.
    """
    def size(t: torch.Tensor) -> int:
        return torch.empty((), dtype=stored_dtype(t, cast)).element_size()

    items = sorted(tensors, key=lambda kv: (-size(kv[1]), kv[0]))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in items:
        nbytes = t.numel() * size(t)
        header[name] = {"dtype": dtype_name(stored_dtype(t, cast)), "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for _, t in items:
            if t.numel():
                t = t.detach().to("cpu", stored_dtype(t, cast)).contiguous().reshape(-1)
                f.write(t.view(torch.uint8).numpy().data)
                if progress is not None:
                    progress(t.numel() * t.element_size())
        f.flush()
        os.fsync(f.fileno())
    return offset
