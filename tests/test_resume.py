"""Snapshots and resume: kill -9, Ctrl-C, truncated and corrupt snapshots, changed configs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from conftest import REPO, TESTS_DIR
from evomerge import snapshots
from evomerge.engine.search import SearchOptions, resume_search, run_search
from evomerge.errors import EvomergeError, SnapshotError
from evomerge.tracking.storage import open_storage

EVOMERGE = str(Path(sys.executable).parent / "evomerge")


def _config_dict(name: str, budget: int, every: int) -> dict:
    return {
        "name": name, "seed": 3, "sync": True,
        "fitness": {"task": "flaky_tasks:SlowDigits", "options": {"train_size": 300}},
        "budget": {"evaluations": budget}, "workers": {"count": 2, "batch": 2},
        "snapshots": {"every": every}, "ray": {"num_cpus": 2, "object_store_memory_mb": 100},
    }


def _final_state(run_dir: Path) -> dict[str, np.ndarray]:
    _, _, arrays = snapshots.load_latest_snapshot(run_dir)
    return arrays


def _assert_same_search(a: Path, b: Path) -> None:
    sa, sb = _final_state(a), _final_state(b)
    for key in ("strategy/genomes/values", "strategy/scores", "strategy/ids", "best/values"):
        assert sa[key].tobytes() == sb[key].tobytes(), key


def _trials(run_dir: Path) -> list:
    summary = json.loads((run_dir / "summary.json").read_text())
    study = optuna.load_study(study_name=summary["study_name"], storage=open_storage(summary["storage"]))
    return study.get_trials(deepcopy=False)


def _start_cli_search(tmp_path: Path, name: str, budget: int, every: int) -> tuple[subprocess.Popen, Path]:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(_config_dict(name, budget, every)))
    out = tmp_path / name
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(REPO)])}  # this checkout's evomerge
    proc = subprocess.Popen([EVOMERGE, "search", str(cfg), "--out", str(out), "--quiet"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    return proc, out


def _wait_for_snapshot(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if [p for p in snapshots.list_snapshots(out) if p.name != "step-00000000"]:  # past the one at start
            return
        if proc.poll() is not None:
            raise AssertionError(f"search ended before a snapshot: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("no snapshot appeared")


@pytest.fixture(scope="module")
def reference_run(ray_session, tmp_path_factory) -> Path:
    """The uninterrupted search every resumed one must reproduce bitwise."""
    from evomerge.config import config_from_dict

    out = tmp_path_factory.mktemp("reference") / "run"
    run_search(config_from_dict(_config_dict("resume", 600, 100)), SearchOptions(out_dir=out, progress=False))
    return out


def test_kill_9_then_resume_equals_uninterrupted(ray_session, reference_run, tmp_path):
    proc, out = _start_cli_search(tmp_path, "resume", 600, 100)
    try:
        _wait_for_snapshot(proc, out)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it embedded, without warning
        proc.wait()
    assert not (out / "summary.json").exists()
    summary = resume_search(out, SearchOptions(out_dir=out, progress=False))
    assert summary["evaluations"] == 600
    assert summary["recovery"]["redone"] == 0  # the trials after the snapshot were replayed
    trials = _trials(out)
    assert len(trials) == 600
    assert sorted(t.user_attrs["member_id"] for t in trials) == list(range(600))
    _assert_same_search(out, reference_run)
    reference_values = [t.value for t in _trials(reference_run)]
    assert [t.value for t in trials] == reference_values


def test_ctrl_c_snapshots_and_exits_130(ray_session, reference_run, tmp_path):
    proc, out = _start_cli_search(tmp_path, "resume", 600, 100)
    try:
        _wait_for_snapshot(proc, out)
        proc.send_signal(signal.SIGINT)
        returncode = proc.wait(timeout=60)  # a hang guard, not a speed requirement
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert returncode == 130, proc.stderr.read().decode()[-2000:]
    newest = snapshots.list_snapshots(out)[-1]
    assert "interrupted" in proc.stderr.read().decode()
    summary = resume_search(out, SearchOptions(out_dir=out, progress=False))
    assert summary["evaluations"] == 600 and newest.name != "step-00000600"
    _assert_same_search(out, reference_run)


def test_truncated_newest_snapshot_falls_back(ray_session, reference_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    steps = snapshots.list_snapshots(out)
    newest = steps[-1] / snapshots.TENSORS
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    summary = resume_search(out, SearchOptions(out_dir=out, progress=False), budget=700)
    assert f"skipping {steps[-1]}" in capsys.readouterr().err
    assert summary["evaluations"] == 700
    assert len(_trials(out)) == 700  # re-evaluated steps were not recorded twice


def test_every_snapshot_corrupt_is_a_clear_error_and_deletes_nothing(reference_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    for step in snapshots.list_snapshots(out):
        path = step / snapshots.TENSORS
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SnapshotError, match="no valid snapshot|fresh"):
        resume_search(out, SearchOptions(out_dir=out, progress=False))
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert before == after


def test_changed_config_is_refused_unless_forced(ray_session, reference_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    config = json.loads((out / "config.json").read_text())
    config["strategy"]["options"]["alpha"] = 0.5
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(EvomergeError, match=r"strategy\.options\.alpha \(1\.0 -> 0\.5\)"):
        resume_search(out, SearchOptions(out_dir=out, progress=False), budget=650)
    summary = resume_search(out, SearchOptions(out_dir=out, progress=False), budget=650, force=True)
    assert summary["evaluations"] == 650
