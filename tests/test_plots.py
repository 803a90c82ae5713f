"""Plots (fitness curve, archive coverage) and their upload as study-level Optuna artifacts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import optuna
import pytest
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState, create_trial

from evomerge.tracking.plots import (
    _bin_columns,
    artifact_store,
    attach_plots,
    coverage_order,
    plot_coverage,
    plot_progress,
    progress_series,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def assert_png(path: Path) -> np.ndarray:
    path = Path(path)
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    # Not a blank canvas: something other than the background was drawn.
    assert float(image[..., :3].std()) > 0.01
    return image


def make_trials(n: int, *, fail_every: int = 0, seed: int = 0) -> list[optuna.trial.FrozenTrial]:
    rng = np.random.default_rng(seed)
    train = np.clip(np.linspace(0.1, 0.9, n) - np.abs(rng.normal(0, 0.1, n)), 0, 1)
    trials = []
    for i in range(n):
        attrs = {"member_id": i, "evaluation": i, "test_score": float(train[i]) - 0.02}
        if fail_every and i % fail_every == fail_every - 1:
            attrs["error"] = "RuntimeError: boom"
            trial = create_trial(state=TrialState.FAIL, user_attrs=attrs)
        else:
            trial = create_trial(value=float(train[i]), user_attrs=attrs)
        trial.number = i
        trials.append(trial)
    return trials


# ------------------------------------------------------------------------ progress

@pytest.mark.parametrize("n", [0, 1])
def test_progress_tiny(tmp_path, n):
    out = plot_progress(make_trials(n), tmp_path / f"p{n}.png", title=f"{n} trials")
    assert out == tmp_path / f"p{n}.png"
    assert_png(out)


def test_progress_only_failures(tmp_path):
    assert_png(plot_progress(make_trials(5, fail_every=1), tmp_path / "fails.png"))


def test_progress_thousands_with_failures(tmp_path):
    trials = make_trials(5000, fail_every=37)
    start = time.perf_counter()
    out = plot_progress(trials, tmp_path / "sub" / "progress.png", title="5k")
    assert time.perf_counter() - start < 3.0
    assert_png(out)


def test_plots_never_import_pyplot_or_switch_backend(tmp_path):
    # In a fresh interpreter: earlier tests in this process may have imported pyplot already.
    code = f"""
import sys, matplotlib, numpy as np
backend = matplotlib.get_backend()
from evomerge.tracking.plots import plot_coverage, plot_progress
plot_progress([], {str(tmp_path / 'a.png')!r})
plot_coverage(np.ones((2, 5)), [1, 2], {str(tmp_path / 'b.png')!r})
assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'
assert matplotlib.get_backend() == backend, (backend, matplotlib.get_backend())
"""
    env = {**os.environ, "MPLBACKEND": "svg"}  # a non-Agg default must stay the default
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert_png(tmp_path / "a.png")
    assert_png(tmp_path / "b.png")


def test_progress_series_by_hand():
    values = [0.2, None, 0.5, 0.4, 0.5, 0.7]  # None = FAIL
    tests = [0.1, None, 0.45, 0.9, 0.99, None]  # last one has no test score
    trials = []
    for i, (v, t) in enumerate(zip(values, tests)):
        attrs = {"member_id": i} if t is None else {"member_id": i, "test_score": t}
        if v is None:
            trial = create_trial(state=TrialState.FAIL, user_attrs={**attrs, "error": "x"})
        else:
            trial = create_trial(value=v, user_attrs=attrs)
        trial.number = i
        trials.append(trial)
    s = progress_series(list(reversed(trials)))  # order comes from trial.number
    np.testing.assert_array_equal(s["x"], [1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(s["failed"], [False, True, False, False, False, False])
    np.testing.assert_allclose(s["best_train"], [0.2, 0.2, 0.5, 0.5, 0.5, 0.7])
    # The 0.5 tie at trial 4 does not take over from trial 2; trial 5 set a best but has no test.
    np.testing.assert_allclose(s["best_test"], [0.1, 0.1, 0.45, 0.45, 0.45, np.nan])
    np.testing.assert_array_equal(s["rolling_x"], [1, 3, 4, 5, 6])
    assert int(s["window"]) == 1


def test_progress_rolling_window():
    trials = make_trials(1000)
    s = progress_series(trials)
    assert int(s["window"]) == 20
    v = np.array([t.value for t in trials])
    np.testing.assert_allclose(s["rolling"][-1], v[-20:].mean())
    np.testing.assert_allclose(s["rolling"][4], v[:5].mean())


# ------------------------------------------------------------------------ coverage

def test_coverage_order_drops_empty_and_sorts():
    S = np.array([
        [1, 0, 1, 0],  # id 4, mean .5
        [0, 0, 0, 0],  # empty slot
        [1, 1, 1, 0],  # id 9, mean .75
        [0, 0, 1, 0],  # id 2, mean .25
    ], dtype=float)
    S_sorted, ids, cols = coverage_order(S, [4, -1, 9, 2])
    assert ids.tolist() == [9, 4, 2]
    np.testing.assert_array_equal(S_sorted, S[[2, 0, 3]])
    # Column 2 covered by 3 members, column 0 by 2, column 1 by 1, column 3 by none.
    assert cols.tolist() == [2, 0, 1, 3]


def test_coverage_order_count_before_pattern():
    # Rows already best-first. Column 0: only the best member. Column 1: the two others.
    # Column 2: the best and the third. Columns 3/4 share a pattern; 4 has the higher mean.
    S = np.array([
        [1.0, 0.0, 1.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.2, 0.4],
        [0.0, 1.0, 1.0, 0.0, 0.0],
    ])
    S[0, 3:] = [0.1, 0.1]  # row means .44, .32, .40 -> sorted ids 10, 12, 11
    _, ids, cols = coverage_order(S, [10, 11, 12])
    assert ids.tolist() == [10, 12, 11]
    # Two-member columns first (2 before 1: the best member covers 2), then the one-member
    # column, then the uncovered ones by mean (4 before 3).
    assert cols.tolist() == [2, 1, 0, 4, 3]


def test_coverage_rejects_mismatched_ids(tmp_path):
    with pytest.raises(ValueError):
        plot_coverage(np.ones((3, 4)), [1, 2], tmp_path / "x.png")


def test_coverage_writes_png_and_drops_empty_rows(tmp_path):
    rng = np.random.default_rng(0)
    S = (rng.random((20, 1437)) < 0.8).astype(float)
    ids = list(range(100, 120))
    ids[5] = -1
    S[5] = 0
    assert_png(plot_coverage(S, ids, tmp_path / "cov.png", title="digits"))


def test_coverage_all_empty(tmp_path):
    assert_png(plot_coverage(np.zeros((4, 30)), [-1] * 4, tmp_path / "empty.png"))


def test_coverage_large_n(tmp_path):
    rng = np.random.default_rng(1)
    S = rng.random((8, 50_000))
    start = time.perf_counter()
    out = plot_coverage(S, [3, 1, -1, 7, 8, 9, 10, 11], tmp_path / "big.png")
    assert time.perf_counter() - start < 3.0
    assert_png(out)


def test_column_binning():
    M = np.arange(2 * 50_000, dtype=float).reshape(2, 50_000)
    binned = _bin_columns(M, 1000)
    assert binned.shape == (2, 1000)
    np.testing.assert_allclose(binned[:, 0], M[:, :50].mean(axis=1))
    np.testing.assert_allclose(binned[:, -1], M[:, -50:].mean(axis=1))
    small = np.ones((3, 700))
    assert _bin_columns(small, 1000) is small


# ------------------------------------------------------------------------ artifacts

def test_attach_plots_journal_roundtrip(tmp_path):
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    study.add_trials(make_trials(50, fail_every=10))
    progress = plot_progress(study.get_trials(deepcopy=False), tmp_path / "progress.png")
    coverage = plot_coverage(np.eye(3), [0, 1, 2], tmp_path / "coverage.png")
    artifact_dir = tmp_path / "artifacts"

    ids = attach_plots(study, [progress, coverage], artifact_dir)
    assert len(ids) == 2 and len(set(ids)) == 2

    # A fresh handle on the same journal sees the artifacts.
    reloaded = optuna.load_study(storage=JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal"))),
                                 study_name="s")
    metas = {m.artifact_id: m for m in optuna.artifacts.get_all_artifact_meta(reloaded)}
    assert set(metas) == set(ids)
    assert metas[ids[0]].filename == "progress.png"
    assert metas[ids[1]].filename == "coverage.png"
    assert metas[ids[0]].mimetype == "image/png"
    for artifact_id, src in zip(ids, [progress, coverage]):
        dst = tmp_path / f"down-{artifact_id}.png"
        optuna.artifacts.download_artifact(artifact_store=artifact_store(artifact_dir),
                                           file_path=str(dst), artifact_id=artifact_id)
        assert dst.read_bytes() == src.read_bytes()

    # Re-attaching a newer plot of the same name updates it in place: no duplicate entry.
    plot_progress(study.get_trials(deepcopy=False)[:10], progress)
    again = attach_plots(study, [progress], artifact_dir)
    assert again == [ids[0]]
    assert len(optuna.artifacts.get_all_artifact_meta(study)) == 2
    dst = tmp_path / "again.png"
    optuna.artifacts.download_artifact(artifact_store=artifact_store(artifact_dir),
                                       file_path=str(dst), artifact_id=ids[0])
    assert dst.read_bytes() == progress.read_bytes()

    # replace=False always adds a new artifact.
    extra = attach_plots(study, [progress], artifact_dir, replace=False)
    assert extra[0] not in ids
    assert len(optuna.artifacts.get_all_artifact_meta(study)) == 3


def test_attach_plots_rejects_missing_and_duplicate_names(tmp_path):
    study = optuna.create_study(direction="maximize")
    with pytest.raises(FileNotFoundError):
        attach_plots(study, [tmp_path / "nope.png"], tmp_path / "a")
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    for d in ("x", "y"):
        (tmp_path / d / "p.png").write_bytes(PNG_SIGNATURE)
    with pytest.raises(ValueError):
        attach_plots(study, [tmp_path / "x" / "p.png", tmp_path / "y" / "p.png"], tmp_path / "a")
    assert optuna.artifacts.get_all_artifact_meta(study) == []
