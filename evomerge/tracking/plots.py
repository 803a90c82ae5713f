"""PNG plots of a search (fitness curve, archive coverage) and their upload as Optuna artifacts.

Figures are built on `matplotlib.figure.Figure` with an explicit Agg canvas: pyplot is never
imported, so no global figure state is touched and no GUI backend is ever selected.

The artifacts are study-level (`optuna.artifacts.upload_artifact(study_or_trial=study)`), which is
what optuna-dashboard lists on the study page. The dashboard can only serve their bytes when it is
started with the same store: `optuna_dashboard.run_server(storage, artifact_store=
artifact_store(run_dir / ARTIFACT_DIR_NAME))`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import optuna
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from optuna.trial import TrialState

ARTIFACT_DIR_NAME = "artifacts"  # conventional place inside a run folder
DPI = 110
MAX_COLUMN_BINS = 1000
_MAX_LINE_POINTS = 4000  # per curve; more than the ~1000 px of the axes can show

_TRAIN_COLOR = "#1f5fa8"
_MEAN_COLOR = "#9bb7d9"
_TEST_COLOR = "#e07b00"
_FAIL_COLOR = "#d62728"


# ----------------------------------------------------------------------------- helpers

def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)  # binds the Agg canvas to this figure only
    return fig


def _save(fig: Figure, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=12, color="0.35")


def _trial_score(trial: optuna.trial.FrozenTrial) -> float:
    """The train score of a finished trial: the mean over all datapoints (its `train_score`
    attribute where the objectives are groups), else the mean over objectives; NaN if none."""
    if trial.state != TrialState.COMPLETE or not trial.values:
        return math.nan
    recorded = _as_float(trial.user_attrs.get("train_score"))
    if not math.isnan(recorded):
        return recorded
    values = [v for v in trial.values if v is not None]
    return float(np.mean(values)) if values else math.nan


def _as_float(value) -> float:
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def _stride(n: int) -> int:
    return max(1, -(-n // _MAX_LINE_POINTS))


# ----------------------------------------------------------------------------- progress

def progress_series(trials: Sequence[optuna.trial.FrozenTrial]) -> dict[str, np.ndarray]:
    """The numbers `plot_progress` draws, vectorised.

    Trials are taken in trial-number order; x is 1..n. `best_train[i]` is the best train score over
    trials 0..i (NaN before the first success), `best_test[i]` the test score of the trial that set
    it (first trial to reach that best), `rolling` a trailing mean over complete trials only.
    """
    ordered = sorted(trials, key=lambda t: t.number)
    n = len(ordered)
    x = np.arange(1, n + 1, dtype=np.int64)
    train = np.fromiter((_trial_score(t) for t in ordered), dtype=float, count=n)
    test = np.fromiter((_as_float(t.user_attrs.get("test_score")) for t in ordered), dtype=float, count=n)
    failed = np.fromiter((t.state == TrialState.FAIL for t in ordered), dtype=bool, count=n)

    ok = ~np.isnan(train)
    # a subset's mean (fitness.subsample) is never the best: only full rows compete for it
    whole = np.fromiter((not t.user_attrs.get("partial") for t in ordered), dtype=bool, count=n)
    filled = np.where(ok & whole, train, -np.inf)
    best = np.maximum.accumulate(filled) if n else filled
    prev = np.concatenate(([-np.inf], best[:-1])) if n else best
    improved = ok & whole & (filled > prev)
    setter = np.maximum.accumulate(np.where(improved, x - 1, -1)) if n else np.zeros(0, np.int64)
    has_best = setter >= 0
    best_train = np.where(has_best, best, np.nan)
    best_test = np.full(n, np.nan)
    best_test[has_best] = test[setter[has_best]]

    ok_x, ok_v = x[ok], train[ok]
    window = max(1, n // 50)
    if ok_v.size:
        csum = np.concatenate(([0.0], np.cumsum(ok_v)))
        idx = np.arange(1, ok_v.size + 1)
        lo = np.maximum(0, idx - window)
        rolling = (csum[idx] - csum[lo]) / (idx - lo)
    else:
        rolling = np.zeros(0)
    spent = np.fromiter((int(t.user_attrs.get("datapoints", 0)) for t in ordered), dtype=np.int64, count=n)
    return {"x": x, "train": train, "test": test, "failed": failed, "best_train": best_train,
            "best_test": best_test, "rolling_x": ok_x, "rolling": rolling, "window": np.int64(window),
            "datapoints": np.cumsum(spent)}  # datapoint-evaluations spent up to each trial


def plot_progress(trials: list[optuna.trial.FrozenTrial], path: Path, title: str = "") -> Path:
    """Fitness curve of a search: best-so-far train score, a rolling mean of train scores, the
    held-out test score of the best-so-far member, and FAIL trials as red ticks on the x axis."""
    s = progress_series(trials)
    n = s["x"].size
    n_failed = int(s["failed"].sum())
    fig = _new_figure(9.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xlabel("evaluation (trial order)")
    ax.set_ylabel("score")
    subtitle = f"{n:,} evaluation{'' if n == 1 else 's'}" + (f", {n_failed:,} failed" if n_failed else "")
    ax.set_title(f"{title or 'Search progress'}\n{subtitle}", fontsize=11)
    ax.grid(True, alpha=0.3)

    finite = [a[np.isfinite(a)] for a in (s["train"], s["best_test"])]
    allv = np.concatenate(finite) if finite else np.zeros(0)
    unit = allv.size == 0 or (allv.min() >= 0.0 and allv.max() <= 1.0)
    if unit:
        ax.set_ylim(0.0, 1.0)

    if n == 0 or not np.isfinite(s["best_train"]).any():
        _note(ax, "no trials recorded yet" if n == 0 else "no successful evaluation yet")
    small = n <= 60
    marker = "o" if small else None
    st = _stride(n)

    if np.isfinite(s["best_train"]).any():
        # Step curve: only the points where the best changes (plus the last x) are needed.
        bt = s["best_train"]
        valid = np.isfinite(bt)
        change = valid & np.concatenate(([True], bt[1:] != bt[:-1]))
        keep = np.flatnonzero(change)
        xs = np.append(s["x"][keep], s["x"][-1])
        ys = np.append(bt[keep], bt[keep[-1]])
        ax.step(xs, ys, where="post", color=_TRAIN_COLOR, lw=2.0, zorder=4,
                label=f"best train so far (final {bt[keep[-1]]:.3f})")
        if small:
            ax.plot(s["x"][valid], bt[valid], ls="none", marker="o", ms=4, color=_TRAIN_COLOR, zorder=4)

    if s["rolling"].size:
        rx, rv = s["rolling_x"][::st], s["rolling"][::st]
        if rx[-1] != s["rolling_x"][-1]:
            rx, rv = np.append(rx, s["rolling_x"][-1]), np.append(rv, s["rolling"][-1])
        label = "train score" if s["window"] == 1 else f"train score, rolling mean (window {int(s['window']):,})"
        ax.plot(rx, rv, color=_MEAN_COLOR, lw=1.3, marker=marker, ms=3, zorder=2, label=label)

    bte = s["best_test"]
    if np.isfinite(bte).any():
        change = np.concatenate(([True], ~((bte[1:] == bte[:-1]) | (np.isnan(bte[1:]) & np.isnan(bte[:-1])))))
        keep = np.flatnonzero(change)
        xs = np.append(s["x"][keep], s["x"][-1])
        ys = np.append(bte[keep], bte[keep[-1]])
        last = bte[np.isfinite(bte)][-1]
        ax.step(xs, ys, where="post", color=_TEST_COLOR, lw=1.6, ls="--", zorder=3,
                label=f"test score of best-so-far member (final {last:.3f})")
        if small:
            ax.plot(s["x"], bte, ls="none", marker="s", ms=3.5, color=_TEST_COLOR, zorder=3)

    if n_failed:
        fx = s["x"][s["failed"]]
        if fx.size > _MAX_LINE_POINTS:  # ticks closer than a pixel are indistinguishable
            fx = np.unique(np.round(fx / (n / _MAX_LINE_POINTS)) * (n / _MAX_LINE_POINTS))
        ax.plot(fx, np.zeros(fx.size), transform=ax.get_xaxis_transform(), ls="none", marker="|",
                ms=8, mew=1.0, color=_FAIL_COLOR, clip_on=False, zorder=5, label=f"failed ({n_failed:,})")

    if n:
        ax.set_xlim(0.5 if n < 20 else 0, n + (0.5 if n < 20 else 0))
    else:
        ax.set_xlim(0, 1)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=9, framealpha=0.9)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- coverage

def coverage_order(scores: np.ndarray, member_ids: Sequence[int], threshold: float = 0.5):
    """Rows kept (member_id != -1), sorted by mean score descending (ties: lower id first), and
    columns sorted so datapoints covered by the same members sit together: first by how many
    members cover them (score >= threshold), most first, so uncovered datapoints end up on the
    right; within a count, lexicographically on the covered pattern over the sorted rows (best
    member's covered first); then by column mean descending. Returns (S_sorted, ids_sorted,
    column_order)."""
    S = np.asarray(scores, dtype=float)
    if S.ndim != 2:
        raise ValueError(f"scores must be a 2-D (members x datapoints) array, got shape {S.shape}")
    ids = np.asarray(list(member_ids), dtype=np.int64)
    if ids.shape != (S.shape[0],):
        raise ValueError(f"{ids.size} member ids for {S.shape[0]} score rows")
    S = np.nan_to_num(S, nan=0.0)
    keep = ids != -1
    S, ids = S[keep], ids[keep]
    if S.shape[0] == 0 or S.shape[1] == 0:
        return S, ids, np.arange(S.shape[1])
    rows = np.lexsort((ids, -S.mean(axis=1)))
    S, ids = S[rows], ids[rows]
    covered = S >= threshold
    # np.lexsort: the last key is primary. Negated booleans sort covered (True) first.
    keys = [-S.mean(axis=0)] + [~covered[k] for k in range(S.shape[0] - 1, -1, -1)]
    keys.append(-covered.sum(axis=0))
    cols = np.lexsort(keys)
    return S, ids, cols


def _bin_columns(M: np.ndarray, bins: int) -> np.ndarray:
    """Mean over consecutive, near-equal column groups (at most `bins` of them)."""
    n = M.shape[1]
    if n <= bins:
        return M
    edges = np.linspace(0, n, bins + 1).round().astype(np.int64)
    return np.add.reduceat(M, edges[:-1], axis=1) / np.diff(edges)


def plot_coverage(scores: np.ndarray, member_ids: Sequence[int], path: Path, title: str = "",
                  *, threshold: float = 0.5) -> Path:
    """Heatmap of the archive's per-datapoint scores S[k, j], with a strip below showing how many
    members cover each datapoint (score >= threshold; for 0/1 correctness, "gets it right") and
    which datapoints no member covers (red)."""
    S, ids, cols = coverage_order(scores, member_ids, threshold)
    P, N = S.shape
    height = min(12.0, 3.0 + 0.26 * max(P, 1))
    fig = _new_figure(11.0, height)
    heading = title or "Archive coverage"
    if P == 0 or N == 0:
        ax = fig.add_subplot(1, 1, 1)
        ax.set_axis_off()
        ax.set_title(heading)
        _note(ax, "archive is empty" if P == 0 else "no datapoints")
        fig.tight_layout()
        return _save(fig, path)

    S = S[:, cols]
    count = (S >= threshold).sum(axis=0)
    n_cov = int((count > 0).sum())
    binned = _bin_columns(S, MAX_COLUMN_BINS)
    nbins = binned.shape[1]
    count_b = _bin_columns(count[None, :].astype(float), MAX_COLUMN_BINS)[0]
    uncovered_b = _bin_columns((count == 0)[None, :].astype(float), MAX_COLUMN_BINS)[0]
    # Strip RGBA: row 0 = members covering (grey level), row 1 = covered by any (red if not).
    rgba = np.ones((2, nbins, 4))
    grey = 1.0 - 0.85 * count_b / P
    rgba[0, :, :3] = grey[:, None]
    red = np.array([0.84, 0.15, 0.16])
    ok = np.array([0.80, 0.92, 0.80])
    rgba[1, :, :3] = uncovered_b[:, None] * red + (1 - uncovered_b[:, None]) * ok

    grid = fig.add_gridspec(2, 2, height_ratios=[max(P, 3), 1.6], width_ratios=[60, 1],
                            hspace=0.06, wspace=0.02)
    ax = fig.add_subplot(grid[0, 0])
    strip = fig.add_subplot(grid[1, 0], sharex=ax)
    cax = fig.add_subplot(grid[0, 1])

    im = ax.imshow(binned, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0,
                   extent=(0, N, P, 0))
    fsize = 9 if P <= 25 else max(4, int(9 - (P - 25) / 8))
    means = S.mean(axis=1)
    ax.set_yticks(np.arange(P) + 0.5)
    ax.set_yticklabels([f"#{i}  ({m:.3f})" for i, m in zip(ids, means)], fontsize=fsize)
    ax.set_ylabel("member id (mean score)")
    ax.tick_params(axis="x", labelbottom=False)
    binned_note = f" (shown as {nbins:,} column bins)" if nbins < N else ""
    ax.set_title(f"{heading}\n{P} members x {N:,} datapoints{binned_note}; "
                 f"covered by at least one member: {n_cov:,}/{N:,} ({n_cov / N:.1%})", fontsize=11)
    cb = fig.colorbar(im, cax=cax)
    cb.set_label("score" + (" (bin mean)" if nbins < N else ""), fontsize=9)

    strip.imshow(rgba, aspect="auto", interpolation="nearest", extent=(0, N, 2, 0))
    strip.set_yticks([0.5, 1.5])
    strip.set_yticklabels([f"# covering (0-{P})", "covered by any"], fontsize=8)
    strip.set_xlabel(f"datapoints, sorted by how many / which members cover them (score >= {threshold:g}); "
                     "red = covered by none")
    strip.set_xlim(0, N)
    fig.subplots_adjust(left=0.15, right=0.93, top=1 - 0.75 / height, bottom=0.55 / height)
    return _save(fig, path)


# ----------------------------------------------------------------------------- artifacts

def artifact_store(artifact_dir: Path) -> optuna.artifacts.FileSystemArtifactStore:
    """A file-system artifact store rooted at `artifact_dir` (created, made absolute so the
    dashboard and the search agree on it whatever their working directories)."""
    artifact_dir = Path(artifact_dir).expanduser().resolve()
    artifact_dir.mkdir(parents=True, exist_ok=True)
    return optuna.artifacts.FileSystemArtifactStore(artifact_dir)


def attach_plots(study: optuna.Study, paths: Sequence[Path], artifact_dir: Path, *,
                 replace: bool = True) -> list[str]:
    """Upload each file as a study-level Optuna artifact; returns the artifact ids in order.

    With `replace` (the default), a file whose name matches an artifact already on the study
    overwrites that artifact's bytes under the same id, so re-attaching at every snapshot keeps one
    up-to-date entry per plot on the dashboard instead of a growing list.
    """
    paths = [Path(p) for p in paths]
    names = [p.name for p in paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"plot file names must be unique within one attach_plots call: {dupes}")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"no plot file at {p}")
    store = artifact_store(artifact_dir)
    existing = {}
    if replace:
        for meta in optuna.artifacts.get_all_artifact_meta(study):
            existing.setdefault(meta.filename, meta.artifact_id)
    ids: list[str] = []
    for p in paths:
        if p.name in existing:
            artifact_id = existing[p.name]
            with open(p, "rb") as f:
                store.write(artifact_id, f)
        else:
            artifact_id = optuna.artifacts.upload_artifact(
                artifact_store=store, file_path=os.fspath(p), study_or_trial=study)
        ids.append(artifact_id)
    return ids
