"""Crash-safe, pickle-free snapshots of a search, so `evomerge resume` can trust what it reads.

Each snapshot is `run_dir/snapshots/step-XXXXXXXX/` with `state.json` (the caller's meta under
"meta", plus bookkeeping) and `tensors.safetensors`. Every dtype the engine uses (bool, int8..uint64,
float16/32/64, complex64, 0-d and empty arrays) is stored natively by safetensors, so arrays are kept
as-is; non-native byte order is stored little-endian and cast back on load. Other dtypes (object,
str, complex128, ...) are refused up front. state.json carries its own SHA-256 so a flipped digit in
an RNG state is caught, not silently resumed from.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
from safetensors.numpy import load_file, save_file

from evomerge.errors import SnapshotError

FORMAT_VERSION = 1
STATE, TENSORS = "state.json", "tensors.safetensors"
_STEP_RE = re.compile(r"^step-(\d{8,})$")
_DTYPES = {"bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
           "float16", "float32", "float64", "complex64"}


def _dumps(obj: Any) -> str:
    # One canonical encoding for both writing and verifying state.json's own checksum.
    return json.dumps(obj, sort_keys=True, allow_nan=False, indent=1)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders atomically (Linux renameat2), so replacing a step never has a gap."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:  # AT_FDCWD, RENAME_EXCHANGE
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _check_inputs(step: int, meta: dict, arrays: dict[str, np.ndarray], keep: int) -> str:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"snapshot step must be a non-negative int, got {step!r}")
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    try:
        text = json.dumps(meta, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"snapshot meta contains NaN or infinity, which JSON cannot hold: {e}") from e
    except TypeError as e:
        raise TypeError(f"snapshot meta must be plain JSON (dict/list/str/int/float/bool/None): {e}") from e
    if json.loads(text) != meta:
        raise ValueError("snapshot meta does not round-trip through JSON exactly "
                         "(non-string dict keys or tuples?); use str keys and lists")
    for name, a in arrays.items():
        if not isinstance(name, str) or not isinstance(a, np.ndarray):
            raise TypeError(f"snapshot arrays must map str to np.ndarray, got {name!r}: {type(a).__name__}")
        if a.dtype.newbyteorder("=").name not in _DTYPES:
            raise ValueError(f"array {name!r} has dtype {a.dtype} which snapshots cannot store exactly")
    return text


def write_snapshot(run_dir: Path, step: int, meta: dict, arrays: dict[str, np.ndarray],
                   keep: int = 3) -> Path:
    """Build the snapshot beside its final name and rename it in, so a crash never leaves half of one."""
    _check_inputs(step, meta, arrays, keep)
    snap_root = Path(run_dir) / "snapshots"
    snap_root.mkdir(parents=True, exist_ok=True)
    _fsync(snap_root.parent)  # so the first snapshot's folder entry itself survives a power cut
    for stale in snap_root.glob(".tmp-*"):  # debris of an earlier crash; readers never look at it
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{step:08d}"
    tag = uuid.uuid4().hex[:8]
    tmp, backup, final = snap_root / f".tmp-{name}-{tag}", snap_root / f".tmp-old-{name}-{tag}", snap_root / name
    tmp.mkdir()
    try:
        # safetensors copies the raw buffer and ignores strides; np.require keeps 0-d shapes.
        stored = {k: np.require(a, a.dtype.newbyteorder("<"), "C") for k, a in arrays.items()}
        save_file(stored, str(tmp / TENSORS))
        _fsync(tmp / TENSORS)
        body = {"format_version": FORMAT_VERSION, "step": step, "created_unix": time.time(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "tensors": {"file": TENSORS, "sha256": _sha256(tmp / TENSORS),
                            "bytes": (tmp / TENSORS).stat().st_size},
                "arrays": {k: {"dtype": a.dtype.str, "shape": list(a.shape)} for k, a in arrays.items()},
                "meta": meta}
        body["state_sha256"] = hashlib.sha256(_dumps(body).encode()).hexdigest()
        with open(tmp / STATE, "w", encoding="utf-8") as f:
            f.write(_dumps(body))
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        if not final.exists():
            os.rename(tmp, final)
        elif not _exchange(tmp, final):  # no atomic swap on this OS/fs: brief gap, old copy in .tmp-old-*
            os.rename(final, backup)
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(backup, final)
                raise
        _fsync(snap_root)
    finally:  # our half-built folder, or (after a swap) the replaced old snapshot
        shutil.rmtree(tmp, ignore_errors=True)
        if final.is_dir():  # never drop the backup while it is the only copy of this step
            shutil.rmtree(backup, ignore_errors=True)
    for old in list_snapshots(run_dir)[:-keep]:  # only now that the new one is safely in place
        doomed = snap_root / f".tmp-del-{old.name}-{tag}"
        os.rename(old, doomed)  # a crash mid-delete leaves debris, never a half-deleted step-*
        shutil.rmtree(doomed, ignore_errors=True)
    _fsync(snap_root)
    return final


def list_snapshots(run_dir: Path) -> list[Path]:
    """Oldest first by step number, ignoring temp folders and anything else a human left there."""
    snap_root = Path(run_dir) / "snapshots"
    if not snap_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in snap_root.iterdir()
             if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def load_snapshot(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Refuse anything not bit-for-bit what was written, since resuming from a damaged state is worse than failing."""
    path = Path(path)

    def fail(reason: str) -> SnapshotError:
        return SnapshotError(f"snapshot {path}: {reason}")

    for fname in (STATE, TENSORS):
        if not (path / fname).is_file():
            raise fail(f"missing {fname}")
    try:
        body = json.loads((path / STATE).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise fail(f"{STATE} is not valid JSON ({e})") from None
    if not isinstance(body, dict) or body.get("format_version") != FORMAT_VERSION:
        got = body.get("format_version") if isinstance(body, dict) else None
        raise fail(f"unsupported format version {got!r} (expected {FORMAT_VERSION})")
    claimed = body.pop("state_sha256", None)
    if claimed != hashlib.sha256(_dumps(body).encode()).hexdigest():
        raise fail(f"{STATE} checksum mismatch (file edited or corrupted)")
    m = _STEP_RE.match(path.name)
    if m and int(m.group(1)) != body["step"]:
        raise fail(f"{STATE} says step {body['step']} but the folder name says {int(m.group(1))}")
    tinfo, size = body["tensors"], (path / TENSORS).stat().st_size
    if size != tinfo["bytes"]:
        raise fail(f"{TENSORS} is {size} bytes, expected {tinfo['bytes']} (truncated or overwritten)")
    if _sha256(path / TENSORS) != tinfo["sha256"]:
        raise fail(f"{TENSORS} SHA-256 mismatch (corrupted)")
    try:
        loaded = load_file(str(path / TENSORS))
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise fail(f"{TENSORS} could not be parsed ({e})") from None
    arrays: dict[str, np.ndarray] = {}
    for name, spec in body["arrays"].items():
        if name not in loaded:
            raise fail(f"array {name!r} listed in {STATE} is missing from {TENSORS}")
        a, want = loaded[name], np.dtype(spec["dtype"])
        if a.dtype != want and a.dtype.newbyteorder("=") == want.newbyteorder("="):
            a = a.astype(want)
        if a.dtype != want or list(a.shape) != spec["shape"]:
            raise fail(f"array {name!r} is {a.dtype}{list(a.shape)}, expected {want}{spec['shape']}")
        arrays[name] = a
    return body["meta"], arrays


def load_latest_snapshot(run_dir: Path, warn: Callable[[str], None] = warnings.warn
                         ) -> tuple[Path, dict, dict[str, np.ndarray]]:
    """Fall back past damaged snapshots (a crash can hit any of them) without ever touching disk."""
    tried: list[str] = []
    for path in reversed(list_snapshots(run_dir)):
        try:
            meta, arrays = load_snapshot(path)
        except SnapshotError as e:
            reason = str(e).removeprefix(f"snapshot {path}: ")
            tried.append(f"  {path}: {reason}")
            warn(f"evomerge: skipping {path}: {reason}; using an older snapshot")
            continue
        return path, meta, arrays
    where = Path(run_dir) / "snapshots"
    if not tried:
        raise SnapshotError(f"no snapshots found in {where}; start a fresh search instead of resuming")
    raise SnapshotError(f"no valid snapshot in {where}; tried, newest first:\n" + "\n".join(tried)
                        + "\nNothing was deleted. Start a fresh search, or restore a snapshot from backup.")
