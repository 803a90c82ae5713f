"""The engine for real: Ray actors, a journal-file and a SQLite Optuna study, failing candidates."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState
from safetensors.numpy import load_file

from conftest import digits_config
from evomerge.engine.search import SearchOptions, run_search
from evomerge.tracking.storage import open_storage


def _trials(summary):
    study = optuna.load_study(study_name=summary["study_name"], storage=open_storage(summary["storage"]))
    return study.get_trials(deepcopy=False)


def test_search_on_ray_records_every_evaluation(ray_session, tmp_path):
    config = digits_config("e2e", budget={"evaluations": 150})
    summary = run_search(config, SearchOptions(out_dir=tmp_path / "run", progress=False))
    trials = _trials(summary)
    assert summary["evaluations"] == len(trials) == 150
    assert summary["failed"] == 0
    assert [t.number for t in trials] == list(range(150))
    assert sorted(t.user_attrs["member_id"] for t in trials) == list(range(150))
    values = np.array([t.value for t in trials])
    best = summary["best"]
    assert best["train_score"] == pytest.approx(values.max())
    best_trial = next(t for t in trials if t.user_attrs["member_id"] == best["member_id"])
    assert best_trial.value == pytest.approx(best["train_score"])
    assert best_trial.user_attrs["test_score"] == pytest.approx(best["test_score"])
    # children carry what the strategy chose; initial members carry nothing
    children = [t for t in trials if t.params]
    assert children and all({"parent_a", "parent_b", "mix_ratio", "split_fraction"} <= set(t.params) for t in children)
    # the exported best member scores what the search recorded
    from fitness.digits import DigitsTask
    genome = load_file(str(tmp_path / "run" / "best.safetensors"))["params"]
    task = DigitsTask({"train_size": 300})
    assert float(task.evaluate(genome).mean()) == pytest.approx(best["train_score"])
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["best"]["member_id"] == best["member_id"]
    assert set(saved) >= {"name", "strategy", "evaluations", "failed", "best", "wall_seconds", "storage"}


def test_best_training_score_never_decreases(ray_session, tmp_path):
    config = digits_config("mono", budget={"evaluations": 200})
    summary = run_search(config, SearchOptions(out_dir=tmp_path / "run", progress=False))
    values = [t.value for t in _trials(summary)]
    running = np.maximum.accumulate(values)
    assert running[-1] == pytest.approx(summary["best"]["train_score"])
    assert running[-1] > running[1]  # evolution improved on the two random initial members


def test_sync_mode_is_reproducible(ray_session, tmp_path):
    runs = []
    for i in range(2):
        config = digits_config("sync", budget={"evaluations": 90}, sync=True, seed=7)
        summary = run_search(config, SearchOptions(out_dir=tmp_path / f"run{i}", progress=False))
        trials = _trials(summary)
        best = load_file(str(tmp_path / f"run{i}" / "best.safetensors"))["params"]
        runs.append(([(t.params, t.value, t.user_attrs["member_id"]) for t in trials], best.tobytes()))
    assert runs[0] == runs[1]
    other = run_search(digits_config("sync", budget={"evaluations": 90}, sync=True, seed=8),
                       SearchOptions(out_dir=tmp_path / "other", progress=False))
    assert [t.value for t in _trials(other)] != [v for _, v, _ in runs[0][0]]


def test_failing_fitness_becomes_fail_trials(ray_session, tmp_path):
    config = digits_config("flaky", fitness={"task": "flaky_tasks:FlakyDigits", "options": {"train_size": 300}},
                           budget={"evaluations": 140})
    summary = run_search(config, SearchOptions(out_dir=tmp_path / "run", progress=False))
    trials = _trials(summary)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(trials) == summary["evaluations"] == 140
    assert len(failed) == summary["failed"] > 0
    assert all(t.state == TrialState.COMPLETE for t in trials if t not in failed)
    errors = {t.user_attrs["error"] for t in failed}
    assert any("simulated fitness crash" in e for e in errors)
    assert any("NaN" in e for e in errors)
    assert all(t.value is None for t in failed)
    # `evomerge status` groups them: the exception's type, the NaN message without its numbers
    from evomerge.status import failure_reasons, run_status, status_table

    reasons = dict(failure_reasons(trials))
    crashes = sum("simulated fitness crash" in t.user_attrs["error"] for t in failed)
    assert reasons["fitness task raised RuntimeError"] == crashes
    assert reasons["fitness returned NaN/inf for N of N datapoints (first at N)"] == len(failed) - crashes
    assert f"{crashes} x fitness task raised RuntimeError" in status_table(run_status(tmp_path / "run"))


def test_sqlite_storage(ray_session, tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    config = digits_config("sqlite", budget={"evaluations": 60}, optuna={"storage": url})
    summary = run_search(config, SearchOptions(out_dir=tmp_path / "run", progress=False))
    assert summary["storage"] == url
    assert len(_trials(summary)) == 60


def test_run_folder_is_not_silently_overwritten(ray_session, tmp_path):
    from evomerge.errors import EvomergeError

    config = digits_config("twice", budget={"evaluations": 20})
    run_search(config, SearchOptions(out_dir=tmp_path / "run", progress=False))
    with pytest.raises(EvomergeError, match="resume"):
        run_search(config, SearchOptions(out_dir=tmp_path / "run", progress=False))
    summary = run_search(config, SearchOptions(out_dir=tmp_path / "run", progress=False, overwrite=True))
    assert len(_trials(summary)) == 20


def test_each_snapshot_is_written_when_the_study_holds_its_evaluations(ray_session, tmp_path, monkeypatch):
    """The driver keeps the next stretch of the search queued on the actor while it records and
    snapshots; a snapshot must still agree with the study (a resume counts on it)."""
    from evomerge.engine import search as search_module

    seen = []
    write = search_module.snapshots.write_snapshot

    def checked(run_dir, step, meta, arrays, keep=3):
        study = optuna.load_study(study_name="snap", storage=search_module.open_storage(
            search_module.storage_url(config.optuna.storage, run_dir)))
        seen.append((step, meta["population"]["told"], len(study.get_trials(deepcopy=False)),
                     len(meta["population"]["inflight"])))
        return write(run_dir, step, meta, arrays, keep=keep)

    monkeypatch.setattr(search_module.snapshots, "write_snapshot", checked)
    config = digits_config("snap", budget={"evaluations": 400}, snapshots={"every": 40},
                           workers={"count": 2, "batch": 4})
    summary = run_search(config, SearchOptions(out_dir=tmp_path / "run", progress=False, advance_seconds=0.02))
    assert summary["evaluations"] == 400
    # Snapshots mid-run, then the final one. A snapshot lands at the end of the stretch queued
    # behind the one that crossed `every`, so how many fit in 400 depends on the machine's speed.
    assert len(seen) >= 3, seen
    assert len({step for step, *_ in seen}) == len(seen), seen  # none written twice (the last, too)
    for step, told, trials, _ in seen:
        assert step == told == trials
    assert any(inflight for *_, inflight in seen[:-1])  # mid-run snapshots held children in flight
    assert seen[-1][:3] == (400, 400, 400) and seen[-1][3] == 0


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
def test_a_dam_search_ends_when_its_trained_merge_is_back(ray_session, tmp_path, capsys, sync):
    """DAM has 2 seeds + the uniform merge + steps/eval_every merges to offer; the search stops
    there rather than re-score its final merge for the rest of the budget, and says so. Async,
    the chunks train on a thread and the dispatcher waits for them with nothing in flight."""
    from evomerge.engine.search import resume_search
    from evomerge.status import run_status, status_table

    dam = {"name": "dam", "options": {"steps": 20, "eval_every": 10}}
    config = digits_config("dam-early", seeds="task", strategy=dam, budget={"evaluations": 200}, sync=sync)
    out = tmp_path / "run"
    summary = run_search(config, SearchOptions(out_dir=out, progress=False))
    trials = _trials(summary)
    assert summary["evaluations"] == len(trials) == 5 and summary["finished_early"]
    by_member = sorted(trials, key=lambda t: t.user_attrs["member_id"])
    assert [t.params.get("step") for t in by_member] == [None, None, 0, 10, 20]
    assert "ends at 5 of 200 evaluations" in capsys.readouterr().err
    assert "5 / 200 (strategy finished)" in status_table(run_status(out))
    again = resume_search(out, SearchOptions(out_dir=out, progress=False), budget=400)
    assert again["evaluations"] == len(_trials(again)) == 5
