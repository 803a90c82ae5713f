"""`evomerge status`: where a run stands, from its study and newest snapshot, while it runs or after."""

from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from evomerge import snapshots
from evomerge.engine.population import mean_staleness, recovery
from evomerge.errors import EvomergeError, SnapshotError
from evomerge.report import evaluations_cell, format_table, group_rows, held_out_cell, held_out_tests_cell
from evomerge.tracking.dashboard import run_storage_url
from evomerge.tracking.late_tests import held_out_counts, study_trials
from evomerge.tracking.storage import open_storage
from evomerge.tracking.trial_record import train_score_of


def run_status(run_dir: Path) -> dict[str, Any]:
    if not run_dir.is_dir():
        raise EvomergeError(f"run folder {run_dir} does not exist")
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else None
    status: dict[str, Any] = {"run": str(run_dir), "state": "finished" if summary else "running or interrupted"}
    try:
        path, meta, arrays = snapshots.load_latest_snapshot(run_dir, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    except SnapshotError:
        path, meta, arrays = None, None, {}
    status["last_snapshot"] = None
    if path is not None:
        age = time.time() - (path / snapshots.STATE).stat().st_mtime
        status["last_snapshot"] = f"{path.name} ({_age(age)} ago)"
    staleness = mean_staleness((meta or {}).get("population", {}))
    status["mean_staleness"] = None if staleness is None else round(staleness, 1)
    status["recovery"] = (summary or {}).get("recovery") or recovery((meta or {}).get("population", {}))
    ids = arrays.get("strategy/ids")
    status["archive_size"] = int((np.asarray(ids) >= 0).sum()) if ids is not None else None
    study, trials = _study(run_dir, config)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    status["evaluations"] = len(trials)
    status["budget"] = config.get("budget", {}).get("evaluations")
    status["failed"] = sum(t.state == TrialState.FAIL for t in trials)
    status["failure_reasons"] = failure_reasons(trials)
    status["datapoints"] = sum(int(t.user_attrs.get("datapoints", 0)) for t in trials)
    status["datapoint_budget"] = config.get("budget", {}).get("datapoints")
    # A child scored on a subset alone has a subset's mean as its value: not comparable with a
    # full row's, so never the best (a last top-up's value is its full row's mean).
    whole = [t for t in complete if not t.user_attrs.get("partial")]
    scored = [(score, t) for t in whole if (score := train_score_of(t)) is not None]
    # The first trial with the highest mean train score: the member the population kept as best.
    best_score, best = max(scored, key=lambda st: (st[0], -st[1].number), default=(None, None))
    status["best_train"] = best_score
    status["best_test"] = None if best is None else best.user_attrs.get("test_score")
    # a top-up's trial has its own id; the member is the child it completed
    status["best_member"] = None if best is None else best.user_attrs.get("topup_of", best.user_attrs.get("member_id"))
    groups = study_groups(study)
    status["groups"] = groups
    if groups is not None:  # a multi-objective study: each group's train (the trial values) and test scores
        status["best_train_scores"] = None if best is None else dict(zip(groups, best.values))
        status["best_test_scores"] = None if best is None else best.user_attrs.get("test_scores")
    parents = {p for t in trials for p in t.user_attrs.get("parents", [])}
    status["distinct_parents"] = len(parents)
    status["test_every"] = (config.get("fitness") or {}).get("test_every", "best")
    status["held_out"] = held_out_counts(trials)
    status["finished_early"] = bool(summary and summary.get("finished_early"))
    if summary:
        status["evals_per_second"] = summary.get("evals_per_second")
    elif meta:
        elapsed = float(meta.get("elapsed_seconds", 0.0))
        told = int(meta["population"]["told"])
        status["evals_per_second"] = round(told / elapsed, 2) if elapsed > 0 else None
    else:
        status["evals_per_second"] = None
    return status


def failure_reasons(trials: list[optuna.trial.FrozenTrial], top: int = 3) -> list[tuple[str, int]]:
    """The commonest kinds of failure, most frequent first: a task's exception without its
    message, other errors with their numbers blanked (which datapoint, how many tries)."""
    kinds: Counter[str] = Counter()
    for trial in trials:
        if trial.state == TrialState.FAIL:
            error = str(trial.user_attrs.get("error") or "no error recorded")
            if error.startswith("fitness task raised "):
                error = error.split(":", 1)[0]
            kinds[re.sub(r"\d+(\.\d+)?", "N", error)] += 1
    return kinds.most_common(top)


def _study(run_dir: Path, config: dict[str, Any]) -> tuple[optuna.Study | None, list[optuna.trial.FrozenTrial]]:
    url = run_storage_url(run_dir)
    name = (config.get("optuna") or {}).get("study_name") or config.get("name")
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        return None, []
    return study, study_trials(study)  # late held-out tests (test_every: archive) merged in


def study_groups(study: optuna.Study | None) -> list[str] | None:
    """The group names of a study recorded with one objective per group, else None."""
    if study is None:
        return None
    groups = study.user_attrs.get("groups")
    if not groups:
        return None
    return [str(name) for name, _ in groups]


def _recovery_cell(counts: dict[str, int] | None) -> str | None:
    """What resumes did with the evaluations the crashes left: none for a search never resumed."""
    if not counts or not any(counts.values()):
        return None
    return (f"{counts['replayed']} replayed from the study, {counts['resent']} re-sent, "
            f"{counts['redone']} redone")


def _datapoints_cell(done: int | None, budget: int | None) -> str | None:
    if not done:
        return None
    return f"{done:,}" if budget is None else f"{done:,} / {budget:,}"


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}min"
    return f"{seconds / 3600:.1f}h"


def status_table(status: dict[str, Any]) -> str:
    budget = status.get("budget")
    rows = [
        ("run", status["run"]),
        ("state", status["state"]),
        ("evaluations", evaluations_cell(status["evaluations"], budget, status.get("finished_early"))),
        ("datapoint-evaluations", _datapoints_cell(status.get("datapoints"), status.get("datapoint_budget"))),
        ("failed", status["failed"]),
        ("commonest failures", "; ".join(f"{n} x {kind}" for kind, n in status.get("failure_reasons") or []) or None),
        ("best train score", status["best_train"]),
        ("best test score", held_out_cell(status["best_test"], status["best_train"] is not None)),
        *group_rows(status.get("best_train_scores"), status.get("best_test_scores")),
        ("best member", status["best_member"]),
        ("held-out tests", held_out_tests_cell(status.get("held_out"), status.get("test_every"))),
        ("archive size", status["archive_size"]),
        ("distinct parents used", status["distinct_parents"]),
        ("last snapshot", status["last_snapshot"]),
        ("evaluations / s", status["evals_per_second"]),
        # Async search: evaluations told while a child was out, i.e. how stale its parents were.
        ("children's staleness (evals)", status["mean_staleness"]),
        ("resumes saved", _recovery_cell(status.get("recovery"))),
    ]
    return format_table(("", "value"), rows)
