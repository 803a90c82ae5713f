"""Snapshot store: exact round trips, pruning, atomicity under simulated crashes, and verification."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import evomerge.snapshots as snaps
from evomerge.errors import SnapshotError
from evomerge.snapshots import list_snapshots, load_latest_snapshot, load_snapshot, write_snapshot

HUGE = 2**200 + 12345


def _arrays() -> dict[str, np.ndarray]:
    f64 = np.array([0.1, -0.0, np.nan, np.inf, -np.inf, 5e-324], dtype=np.float64)
    return {
        "i64": np.array([-(2**63), 2**63 - 1, 0, -1], dtype=np.int64),
        "u64": np.array([2**64 - 1, 0], dtype=np.uint64),
        "f64": f64,
        "f32_2d": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
        "f16": np.array([1.5, -2.25, 65504.0], dtype=np.float16),
        "bool": np.array([[True, False], [False, True]]),
        "u8": np.arange(256, dtype=np.uint8),
        "c64": np.array([1 + 2j, -3.5j], dtype=np.complex64),
        "scalar0d": np.array(7, dtype=np.int64),
        "scalarf": np.array(np.pi),
        "empty": np.zeros((0, 3), dtype=np.float64),
        "empty_bool": np.zeros((2, 0), dtype=bool),
        "noncontig": np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2].T,
        "bigendian": np.array([1, -2, 70000], dtype=">i4"),
    }


def _meta(step: int = 1) -> dict:
    rng = np.random.Generator(np.random.PCG64(1234))
    return {
        "step": step,
        "huge": HUGE,
        "neg_huge": -HUGE,
        "rng": rng.bit_generator.state,  # contains ints > 2**64
        "nested": {"a": [1, 2.5, None, True, "x\u00e9"], "b": {"c": [[], {}], "d": -0.0}},
        "float": 0.1 + 0.2,
    }


def _listing(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(run_dir.rglob("*"))}


def _reseal(snap: Path, body: dict) -> None:
    """Rewrite state.json with a valid self-checksum, to reach the checks behind it."""
    body.pop("state_sha256", None)
    body["state_sha256"] = hashlib.sha256(snaps._dumps(body).encode()).hexdigest()
    (snap / "state.json").write_text(snaps._dumps(body))


def _state(snap: Path) -> dict:
    return json.loads((snap / "state.json").read_text())


def test_round_trip_is_exact(tmp_path: Path) -> None:
    arrays, meta = _arrays(), _meta()
    path = write_snapshot(tmp_path, 1234, meta, arrays)
    assert path == tmp_path / "snapshots" / "step-00001234"
    assert sorted(p.name for p in path.iterdir()) == ["state.json", "tensors.safetensors"]
    got_meta, got = load_snapshot(path)
    assert got_meta == meta and got_meta["huge"] == HUGE and type(got_meta["huge"]) is int
    assert got_meta["rng"]["state"]["state"] == meta["rng"]["state"]["state"] > 2**64
    assert got_meta["nested"]["b"]["d"] == 0.0 and str(got_meta["nested"]["b"]["d"]) == "-0.0"
    assert sorted(got) == sorted(arrays)
    for k, a in arrays.items():
        assert got[k].dtype == a.dtype, k
        assert got[k].shape == a.shape, k
        assert got[k].tobytes() == a.tobytes(), k  # bitwise, so NaN and -0.0 count
    # A resumed PCG64 must continue the same stream.
    g1 = np.random.Generator(np.random.PCG64())
    g1.bit_generator.state = got_meta["rng"]
    assert g1.random() == np.random.Generator(np.random.PCG64(1234)).random()


def test_bookkeeping_in_state_json(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path, 5, {"k": 1}, {"x": np.ones(3)})
    body = _state(path)
    tfile = path / "tensors.safetensors"
    assert body["format_version"] == snaps.FORMAT_VERSION and body["step"] == 5
    assert body["meta"] == {"k": 1} and "created" in body
    assert body["tensors"]["bytes"] == tfile.stat().st_size
    assert body["tensors"]["sha256"] == hashlib.sha256(tfile.read_bytes()).hexdigest()


def test_keep_last_three_and_ordering(tmp_path: Path) -> None:
    for step in [1, 2, 9, 10, 100]:
        write_snapshot(tmp_path, step, {"s": step}, {"x": np.array([step])})
    names = [p.name for p in list_snapshots(tmp_path)]
    assert names == ["step-00000009", "step-00000010", "step-00000100"]
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == names  # no debris
    write_snapshot(tmp_path, 101, {}, {}, keep=1)
    assert [p.name for p in list_snapshots(tmp_path)] == ["step-00000101"]
    path, meta, arrays = load_latest_snapshot(tmp_path)
    assert path.name == "step-00000101" and meta == {} and arrays == {}


def test_steps_beyond_eight_digits_sort_numerically(tmp_path: Path) -> None:
    write_snapshot(tmp_path, 99_999_999, {}, {})
    write_snapshot(tmp_path, 100_000_000, {}, {})
    assert [p.name for p in list_snapshots(tmp_path)] == ["step-99999999", "step-100000000"]


def test_truncated_newest_falls_back_with_warning(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        write_snapshot(tmp_path, step, {"s": step}, {"x": np.full(100, step, dtype=np.float64)})
    newest = tmp_path / "snapshots" / "step-00000003" / "tensors.safetensors"
    newest.write_bytes(newest.read_bytes()[:-50])
    with pytest.warns(UserWarning, match=r"skipping .*step-00000003.*truncated.*older snapshot"):
        path, meta, arrays = load_latest_snapshot(tmp_path)
    assert path.name == "step-00000002" and meta == {"s": 2}
    assert np.array_equal(arrays["x"], np.full(100, 2.0))
    seen: list[str] = []
    load_latest_snapshot(tmp_path, warn=seen.append)
    assert len(seen) == 1 and "step-00000003" in seen[0]


def test_single_flipped_byte_is_detected(tmp_path: Path) -> None:
    write_snapshot(tmp_path, 1, {}, {"x": np.zeros(64)})
    snap = write_snapshot(tmp_path, 2, {}, {"x": np.zeros(64)})
    tfile = snap / "tensors.safetensors"
    data = bytearray(tfile.read_bytes())
    data[-10] ^= 0x01  # inside the tensor payload, size unchanged
    tfile.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=r"step-00000002.*SHA-256"):
        load_snapshot(snap)
    seen: list[str] = []
    assert load_latest_snapshot(tmp_path, warn=seen.append)[0].name == "step-00000001"
    assert len(seen) == 1


def test_edited_meta_is_detected(tmp_path: Path) -> None:
    snap = write_snapshot(tmp_path, 1, {"seed": 12345}, {})
    text = (snap / "state.json").read_text()
    (snap / "state.json").write_text(text.replace("12345", "12346"))
    with pytest.raises(SnapshotError, match="checksum"):
        load_snapshot(snap)


def test_all_corrupt_raises_naming_each_and_deletes_nothing(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        write_snapshot(tmp_path, step, {}, {"x": np.arange(10)})
    root = tmp_path / "snapshots"
    (root / "step-00000001" / "state.json").write_text("{not json")
    t2 = root / "step-00000002" / "tensors.safetensors"
    t2.write_bytes(t2.read_bytes()[:5])
    (root / "step-00000003" / "tensors.safetensors").unlink()
    before = _listing(tmp_path)
    seen: list[str] = []
    with pytest.raises(SnapshotError) as info:
        load_latest_snapshot(tmp_path, warn=seen.append)
    msg = str(info.value)
    for step, reason in [(1, "not valid JSON"), (2, "bytes"), (3, "missing tensors.safetensors")]:
        assert f"step-0000000{step}: " in msg and reason in msg
    assert "fresh search" in msg
    assert len(seen) == 3
    assert _listing(tmp_path) == before


def test_stale_tmp_is_ignored_then_cleaned(tmp_path: Path) -> None:
    write_snapshot(tmp_path, 1, {"s": 1}, {})
    root = tmp_path / "snapshots"
    complete = write_snapshot(tmp_path, 5, {"s": 5}, {})
    stale = root / ".tmp-step-00000009-deadbeef"
    os.rename(complete, stale)  # looks like a full, newer snapshot, but was never renamed in
    (root / ".tmp-step-00000010-cafe").mkdir()
    (root / "notes.txt").write_text("human file")
    assert [p.name for p in list_snapshots(tmp_path)] == ["step-00000001"]
    assert load_latest_snapshot(tmp_path)[1] == {"s": 1}
    write_snapshot(tmp_path, 2, {"s": 2}, {})
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "step-00000001", "step-00000002"]


def test_no_snapshots(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="no snapshots found.*fresh search"):
        load_latest_snapshot(tmp_path)
    (tmp_path / "snapshots" / ".tmp-step-00000001-x").mkdir(parents=True)
    with pytest.raises(SnapshotError, match="no snapshots found"):
        load_latest_snapshot(tmp_path)
    assert list_snapshots(tmp_path / "missing") == []


@pytest.mark.parametrize("atomic_swap", [True, False])
def test_rewriting_same_step_replaces_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         atomic_swap: bool) -> None:
    if not atomic_swap:
        monkeypatch.setattr(snaps, "_exchange", lambda a, b: False)
    write_snapshot(tmp_path, 1, {"v": "old0"}, {})
    write_snapshot(tmp_path, 7, {"v": "old"}, {"x": np.zeros(3)})
    write_snapshot(tmp_path, 7, {"v": "new"}, {"y": np.ones(2, dtype=np.int64)})
    assert [p.name for p in list_snapshots(tmp_path)] == ["step-00000001", "step-00000007"]
    meta, arrays = load_snapshot(tmp_path / "snapshots" / "step-00000007")
    assert meta == {"v": "new"} and list(arrays) == ["y"]
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == ["step-00000001", "step-00000007"]


def _crashing_rename(*args: object, **kwargs: object) -> None:
    raise OSError("simulated crash")


def test_crash_during_write_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for step in (1, 2, 3):
        write_snapshot(tmp_path, step, {"s": step}, {"x": np.arange(step)})
    before = _listing(tmp_path)
    monkeypatch.setattr(os, "rename", _crashing_rename)
    with pytest.raises(OSError, match="simulated crash"):
        write_snapshot(tmp_path, 4, {"s": 4}, {"x": np.arange(4)})
    monkeypatch.undo()
    assert _listing(tmp_path) == before  # nothing pruned, no step-00000004, no debris
    assert load_latest_snapshot(tmp_path, warn=pytest.fail)[1] == {"s": 3}


def test_crash_leaving_tmp_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real crash skips the cleanup: the half-built folder must stay invisible, then get removed."""
    write_snapshot(tmp_path, 1, {"s": 1}, {})
    monkeypatch.setattr(os, "rename", _crashing_rename)
    monkeypatch.setattr(snaps.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(OSError):
        write_snapshot(tmp_path, 2, {"s": 2}, {"x": np.zeros(5)})
    monkeypatch.undo()
    root = tmp_path / "snapshots"
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert [p.name for p in list_snapshots(tmp_path)] == ["step-00000001"]
    write_snapshot(tmp_path, 3, {"s": 3}, {})
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001", "step-00000003"]


@pytest.mark.parametrize("atomic_swap", [True, False])
def test_crash_while_replacing_keeps_old_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              atomic_swap: bool) -> None:
    write_snapshot(tmp_path, 7, {"v": "old"}, {"x": np.zeros(3)})
    before = _listing(tmp_path)
    if atomic_swap:
        monkeypatch.setattr(snaps, "_exchange", _crashing_rename)
    else:  # the first rename (old -> backup) works, the second (new -> final) crashes
        monkeypatch.setattr(snaps, "_exchange", lambda a, b: False)
        real, calls = os.rename, []

        def flaky(src: object, dst: object) -> None:
            calls.append(dst)
            if len(calls) == 2:
                raise OSError("simulated crash")
            real(src, dst)

        monkeypatch.setattr(os, "rename", flaky)
    with pytest.raises(OSError, match="simulated crash"):
        write_snapshot(tmp_path, 7, {"v": "new"}, {})
    monkeypatch.undo()
    assert _listing(tmp_path) == before
    assert load_snapshot(tmp_path / "snapshots" / "step-00000007")[0] == {"v": "old"}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_meta_rejects_non_finite(tmp_path: Path, bad: float) -> None:
    with pytest.raises(ValueError, match="NaN or infinity"):
        write_snapshot(tmp_path, 1, {"nested": [1, {"x": bad}]}, {})
    assert list_snapshots(tmp_path) == []


@pytest.mark.parametrize("meta", [{1: "int key"}, {"t": (1, 2)}])
def test_meta_rejects_lossy_json(tmp_path: Path, meta: dict) -> None:
    with pytest.raises(ValueError, match="round-trip"):
        write_snapshot(tmp_path, 1, meta, {})


def test_rejects_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="plain JSON"):
        write_snapshot(tmp_path, 1, {"a": np.int64(3)}, {})
    with pytest.raises(ValueError, match="cannot store exactly"):
        write_snapshot(tmp_path, 1, {}, {"c": np.array([1 + 1j])})  # complex128
    with pytest.raises(ValueError, match="cannot store exactly"):
        write_snapshot(tmp_path, 1, {}, {"o": np.array(["a"], dtype=object)})
    with pytest.raises(ValueError, match="non-negative"):
        write_snapshot(tmp_path, -1, {}, {})
    with pytest.raises(ValueError, match="keep"):
        write_snapshot(tmp_path, 1, {}, {}, keep=0)
    assert not (tmp_path / "snapshots").exists() or list_snapshots(tmp_path) == []


def test_verification_reasons(tmp_path: Path) -> None:
    def fresh(step: int) -> Path:
        return write_snapshot(tmp_path, step, {}, {"a": np.zeros(2), "b": np.ones(3)}, keep=100)

    snap = fresh(1)
    (snap / "state.json").unlink()
    with pytest.raises(SnapshotError, match=r"step-00000001: missing state.json"):
        load_snapshot(snap)

    snap = fresh(2)
    body = _state(snap)
    body["format_version"] = 999
    (snap / "state.json").write_text(json.dumps(body))
    with pytest.raises(SnapshotError, match=r"step-00000002: unsupported format version 999"):
        load_snapshot(snap)

    snap = fresh(3)  # array listed in state.json but not in the (consistently hashed) tensors file
    tfile = snap / "tensors.safetensors"
    save_file({"a": np.zeros(2)}, str(tfile))
    body = _state(snap)
    body["tensors"].update(bytes=tfile.stat().st_size, sha256=hashlib.sha256(tfile.read_bytes()).hexdigest())
    _reseal(snap, body)
    with pytest.raises(SnapshotError, match=r"step-00000003: array 'b' .* missing"):
        load_snapshot(snap)

    snap = fresh(4)  # garbage whose hash and size match what state.json claims
    tfile = snap / "tensors.safetensors"
    tfile.write_bytes(b"\xff" * 40)
    body = _state(snap)
    body["tensors"].update(bytes=40, sha256=hashlib.sha256(b"\xff" * 40).hexdigest())
    _reseal(snap, body)
    with pytest.raises(SnapshotError, match=r"step-00000004: tensors.safetensors could not be parsed"):
        load_snapshot(snap)

    snap = fresh(5)  # a snapshot copied under the wrong folder name
    os.rename(snap, tmp_path / "snapshots" / "step-00000006")
    with pytest.raises(SnapshotError, match="says step 5"):
        load_snapshot(tmp_path / "snapshots" / "step-00000006")


def test_module_never_unpickles() -> None:
    src = Path(snaps.__file__).read_text()
    for banned in ("import pickle", "pickle.", "torch.load", "allow_pickle", "np.load(", "marshal", "eval("):
        assert banned not in src
