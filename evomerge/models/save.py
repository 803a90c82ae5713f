"""Write a merged model as a Hugging Face folder that `from_pretrained` opens directly.

The tensors may be zero-copy views over seed mappings (they share storage), so they are streamed
through our own safetensors writer, casting one tensor at a time. The folder appears atomically
when it is new, so a crash never leaves a half-written model that looks complete. Shards are at
most 5 GB (transformers' default) with an index when there are several; files are 0644 and the
folder 0755 whatever the umask or mkdtemp chose, so other users and serving containers can read it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import torch

from evomerge.models.deferred import DeferredTensor

from evomerge.models.checkpoint import INDEX, SINGLE
from evomerge.models.errors import CheckpointError
from evomerge.models.safetensors_format import stored_nbytes, write_file

SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
              "chat_template.jinja", "chat_template.json", "preprocessor_config.json")
SAVE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "F32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "BF16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "F16": torch.float16,
}
HF_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}
MAX_SHARD_BYTES = 5 * 1000**3  # transformers' "5GB"
FILE_MODE, DIR_MODE = 0o644, 0o755


def _shards(tensors: Mapping[str, torch.Tensor], cast: torch.dtype | None, limit: int) -> list[list[str]]:
    """Greedy packing in the given order (as transformers does); an oversized tensor gets its own shard."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, t in tensors.items():
        n = stored_nbytes(t, cast)
        if shards[-1] and used + n > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def _saved_dtype(tensors: Mapping[str, torch.Tensor], cast: torch.dtype | None) -> torch.dtype | None:
    """The model's dtype as config.json states it: that of most floating elements written (a bf16
    model keeps a small float32 buffer such as `inv_freq` and is still a bf16 model)."""
    if cast is not None:
        return cast
    counts: dict[torch.dtype, int] = {}
    for t in tensors.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.__getitem__) if counts else None


def _side_files(source: Path | None, saved: torch.dtype | None, include_code: bool = False) -> dict[str, bytes]:
    """Config, generation config and tokenizer files from `source`, with the dtype fixed in config.

    `include_code` also takes the folder's `.py` files (the modelling code `trust_remote_code` runs).
    """
    if source is None or not source.is_dir():
        return {}
    out: dict[str, bytes] = {}
    names = list(SIDE_FILES)
    if include_code:
        names += sorted(p.name for p in source.glob("*.py") if p.is_file())
    for name in names:
        p = source / name
        if p.is_file():
            out[name] = p.read_bytes()
    if "config.json" in out and saved in HF_NAMES:
        try:
            cfg = json.loads(out["config.json"])
        except ValueError as exc:
            raise CheckpointError(f"{source / 'config.json'}: not valid JSON ({exc})") from exc
        changed = False
        keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["dtype"]
        for key in keys:
            if cfg.get(key) != HF_NAMES[saved]:
                cfg[key] = HF_NAMES[saved]
                changed = True
        if changed:
            out["config.json"] = (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()
    return out


def _write_all(dest: Path, tensors: Mapping[str, torch.Tensor], cast: torch.dtype | None,
               max_shard_bytes: int, side: dict[str, bytes], in_place: bool,
               progress: Callable[[int], None] | None = None) -> set[str]:
    """Write every file into dest (via temp names + replace when in_place); returns the names written."""
    def final(name: str) -> Path:
        return dest / (f".{name}.tmp" if in_place else name)

    def commit(name: str) -> None:
        os.chmod(final(name), FILE_MODE)
        if in_place:
            os.replace(final(name), dest / name)

    written: list[str] = []
    meta = {"format": "pt"}
    shards = _shards(tensors, cast, max_shard_bytes)
    if len(shards) == 1:
        write_file(final(SINGLE), tensors.items(), meta, cast, progress=progress)
        written.append(SINGLE)
    else:
        weight_map: dict[str, str] = {}
        total = 0
        for i, names in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            total += write_file(final(fname), ((n, tensors[n]) for n in names), meta, cast, progress=progress)
            weight_map.update({n: fname for n in names})
            written.append(fname)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_bytes(final(INDEX), (json.dumps(index, indent=2) + "\n").encode())
        written.append(INDEX)
    for name, data in side.items():
        _write_bytes(final(name), data)
        written.append(name)
    for name in written:
        commit(name)
    return set(written)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_model_folder(tensors: Mapping[str, torch.Tensor], out_dir: str | Path, *,
                      source: str | Path | None = None, dtype: str | None = None,
                      max_shard_bytes: int = MAX_SHARD_BYTES, include_code: bool = False,
                      progress: Callable[[int], None] | None = None) -> Path:
    """Save tensors (plus source's config/tokenizer files) as an HF folder; returns out_dir.

    `dtype` casts every floating tensor (None: each is written in its own dtype); config.json's
    `dtype`/`torch_dtype` is set to what was written. `include_code` also copies source's `.py`
    files (for `trust_remote_code` models). `progress(nbytes)` is called after each tensor is written.

    Tied weights are left as given: if `lm_head.weight` is absent and the config ties it,
    transformers re-ties it on load, so inventing a copy would only waste space.
    """
    if dtype is not None and dtype not in SAVE_DTYPES:
        raise CheckpointError(f"save dtype {dtype!r} is not one of float32, bfloat16, float16")
    if not tensors:
        raise CheckpointError("nothing to save: no tensors given")
    if max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, (torch.Tensor, DeferredTensor)):
            raise CheckpointError(f"save_model_folder wants str -> tensor, got {type(name).__name__} -> "
                                  f"{type(t).__name__}")
    cast = SAVE_DTYPES[dtype] if dtype is not None else None
    out = Path(out_dir).expanduser()
    side = _side_files(Path(source).expanduser() if source is not None else None, _saved_dtype(tensors, cast),
                       include_code)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder; choose another output path")
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            _write_all(tmp, tensors, cast, max_shard_bytes, side, in_place=False, progress=progress)
            os.chmod(tmp, DIR_MODE)  # mkdtemp made it 0700
            _fsync_dir(tmp)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    else:
        written = _write_all(out, tensors, cast, max_shard_bytes, side, in_place=True, progress=progress)
        for stale in [*out.glob("model*.safetensors"), out / INDEX]:  # from an earlier, differently sharded save
            if stale.name not in written and stale.exists():
                stale.unlink()
    _fsync_dir(out.parent)
    return out
