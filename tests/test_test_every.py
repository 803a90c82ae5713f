"""`fitness.test_every`: the held-out test score only for a child that becomes the new best
(`best`, the default), or for every child (`all`); in-process, on Ray workers, and on resume.
`archive` has its own file, test_test_every_archive.py."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import optuna
import pytest
from safetensors.numpy import load_file

from conftest import digits_config
from counting_tasks import read_log
from evomerge import snapshots
from evomerge.config import config_from_dict
from evomerge.engine.local import run_local
from evomerge.engine.population import Population
from evomerge.engine.search import SearchOptions, config_differences, resume_search, run_search
from evomerge.errors import EvomergeError
from evomerge.report import summary_table
from evomerge.status import run_status, status_table
from evomerge.strategies.base import Evaluation, Problem
from evomerge.strategies.m2n2 import M2N2
from evomerge.tracking.plots import progress_series
from evomerge.tracking.storage import open_storage
from fitness.digits import DigitsTask

TRAIN = 300


def _config(log, name="te", budget=150, test_every=None, **overrides):
    fitness = {"task": "counting_tasks:CountingDigits", "options": {"train_size": TRAIN, "log": str(log)}}
    if test_every is not None:
        fitness["test_every"] = test_every
    return digits_config(name, fitness=fitness, budget={"evaluations": budget}, **overrides)


def _new_bests(scores):
    """Flags: which of these train scores (in tell order; None = failed) set a new best."""
    best, flags = -math.inf, []
    for score in scores:
        flags.append(score is not None and score > best)
        if flags[-1]:
            best = score
    return flags


def _trials(summary):
    study = optuna.load_study(study_name=summary["study_name"], storage=open_storage(summary["storage"]))
    return sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)


def _held_out(genome) -> float:
    return DigitsTask({"train_size": TRAIN}).test_score(genome)


def test_default_is_best_and_it_does_not_change_the_search_hash(tmp_path):
    best = _config(tmp_path / "log")
    assert best.fitness.test_every == "best"
    every = _config(tmp_path / "log", test_every="all")
    assert every.fitness.test_every == "all"
    archive = _config(tmp_path / "log", test_every="archive")
    assert archive.fitness.test_every == "archive"
    assert best.hash() == every.hash() == archive.hash()  # which tests are measured; selection never reads them
    with pytest.raises(Exception, match="test_every"):
        _config(tmp_path / "log", test_every="members")


def test_threshold_is_the_best_train_mean_and_none_with_all():
    problem = Problem(dimension=8, num_datapoints=4)
    population = Population(M2N2({}, problem, seed=0), budget=10)
    assert population.test_threshold() == -math.inf
    everyone = Population(M2N2({}, problem, seed=0), budget=10, test_every="all")
    assert everyone.test_threshold() is None
    for pop in (population, everyone):
        for scores in ([1, 0, 0, 1], [0, 0, 0, 1]):
            candidate = pop.ask()
            pop.tell(Evaluation(candidate.member_id, np.array(scores, dtype=np.float32)))
    assert population.test_threshold() == 0.5  # the better one; the worse one did not lower it
    assert everyone.test_threshold() is None


@pytest.mark.parametrize("in_flight", [1, 5])
def test_in_process_best_tests_exactly_the_children_that_became_the_new_best(tmp_path, in_flight):
    log = tmp_path / "calls.log"
    records = []
    population = run_local(_config(log), on_record=records.append, in_flight=in_flight)
    evaluations, tested = read_log(log)
    assert evaluations == len(records) == 150
    flags = _new_bests([r.train_score for r in records])
    # test_score ran for exactly the new bests, in their order, and nothing else got a test score
    assert tested == [r.train_score for r, new in zip(records, flags) if new]
    assert [r.test_score is not None for r in records] == flags
    assert 2 <= len(tested) < 150 // 3  # a real saving on this search
    # the best's test score is its own, measured on its own genome
    best = population.best
    own = next(r for r in records if r.member_id == best.member_id)
    assert best.test_score is not None and best.test_score == own.test_score == _held_out(best.genome)
    # each record's best_test is the then-best member's own measured score
    for record, new in zip(records, flags):
        if new:
            current = record.test_score
        assert record.best_test == current


def test_in_process_all_tests_every_child(tmp_path):
    log = tmp_path / "calls.log"
    records = []
    run_local(_config(log, test_every="all"), on_record=records.append)
    evaluations, tested = read_log(log)
    assert evaluations == len(tested) == 150
    assert tested == [r.train_score for r in records]
    assert all(r.test_score is not None for r in records)


@pytest.mark.parametrize("sync", [False, True])
def test_on_ray_workers_every_new_best_is_tested_and_reported_as_measured(ray_session, tmp_path, sync):
    log = tmp_path / "calls.log"
    summary = run_search(_config(log, sync=sync), SearchOptions(out_dir=tmp_path / "run", progress=False))
    trials = _trials(summary)
    assert summary["evaluations"] == len(trials) == 150 and summary["failed"] == 0
    evaluations, tested = read_log(log)
    assert evaluations == 150
    scores = [t.value for t in trials]
    flags = _new_bests(scores)
    measured = [t.user_attrs["test_score"] is not None for t in trials]
    # Never skipped for a new best; a child sent against an older (lower) best may be tested too.
    assert all(m for m, new in zip(measured, flags) if new)
    assert sorted(tested) == sorted(t.value for t, m in zip(trials, measured) if m)
    assert sum(flags) <= len(tested) < 150 // 2
    # An untested child reads "not measured" (None) in its trial, never 0.
    assert all(t.user_attrs["test_score"] is None for t, m in zip(trials, measured) if not m)
    # summary, status and plots show the best member's own measured score
    best = summary["best"]
    genome = load_file(str(tmp_path / "run" / "best.safetensors"))["params"]
    assert best["test_score"] == _held_out(genome)
    best_trial = next(t for t in trials if t.user_attrs["member_id"] == best["member_id"])
    assert best_trial.user_attrs["test_score"] == best["test_score"]
    status = run_status(tmp_path / "run")
    assert status["best_member"] == best["member_id"] and status["best_test"] == best["test_score"]
    assert "not measured" not in status_table(status) and "not measured" not in summary_table(summary)
    series = progress_series(trials)
    assert np.array_equal(np.isfinite(series["best_test"]), np.isfinite(series["best_train"]))
    assert np.isnan(series["test"]).sum() == 150 - len(tested)


def test_on_ray_workers_all_tests_every_child(ray_session, tmp_path):
    log = tmp_path / "calls.log"
    summary = run_search(_config(log, budget=60, test_every="all"),
                         SearchOptions(out_dir=tmp_path / "run", progress=False))
    evaluations, tested = read_log(log)
    assert evaluations == len(tested) == 60
    assert all(t.user_attrs["test_score"] is not None for t in _trials(summary))


def test_a_best_without_a_test_score_reads_not_measured():
    summary = {"name": "n", "strategy": "m2n2", "evaluations": 3, "failed": 0, "wall_seconds": 1.0,
               "storage": "s", "best": {"member_id": 2, "train_score": 0.5, "test_score": None}}
    row = next(line for line in summary_table(summary).splitlines() if line.startswith("best test score"))
    assert row.split()[-2:] == ["not", "measured"]
    status = {"run": "r", "state": "finished", "evaluations": 3, "budget": 3, "failed": 0, "best_train": 0.5,
              "best_test": None, "best_member": 2, "archive_size": 2, "distinct_parents": 2,
              "last_snapshot": None, "evals_per_second": None, "mean_staleness": None}
    assert "not measured" in status_table(status)
    assert "not measured" not in status_table({**status, "best_train": None, "best_member": None})


def test_a_missing_key_equals_its_default_in_config_differences(tmp_path):
    new = _config(tmp_path / "log").model_dump(mode="json")
    old = json.loads(json.dumps(new))
    del old["fitness"]["test_every"]
    assert config_differences(old, new) == []
    assert config_differences(new, old) == []
    changed = json.loads(json.dumps(new))
    changed["fitness"]["test_every"] = "all"
    assert config_differences(old, changed) == ["fitness.test_every ('best' -> 'all')"]
    del old["genome"]  # a whole section missing: its defaults
    assert config_differences(old, new) == []
    del old["fitness"]["task"]  # a required field has no default: still a difference
    assert config_differences(old, new) == ["fitness.task (None -> 'counting_tasks:CountingDigits')"]


def _strip_test_every(run_dir):
    """Make a run folder look written before `fitness.test_every` existed."""
    config = json.loads((run_dir / "config.json").read_text())
    del config["fitness"]["test_every"]
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    for path in snapshots.list_snapshots(run_dir):
        meta, arrays = snapshots.load_snapshot(path)
        del meta["config"]["fitness"]["test_every"]
        step = int(path.name.split("-")[1])
        snapshots.write_snapshot(run_dir, step, meta, arrays, keep=10)
    return config


def test_resuming_a_run_written_before_test_every_needs_no_force(ray_session, tmp_path):
    log = tmp_path / "calls.log"
    out = tmp_path / "run"
    # An older engine tested every child: that is `all`.
    config = _config(log, budget=80, test_every="all", sync=True, snapshots={"every": 40})
    run_search(config, SearchOptions(out_dir=out, progress=False))
    assert read_log(log)[1].__len__() == 80
    old_config = _strip_test_every(out)
    assert "test_every" not in old_config["fitness"]
    assert config_from_dict(old_config).fitness.test_every == "best"
    before = sorted(p.name for p in snapshots.list_snapshots(out))

    changed = tmp_path / "changed"
    shutil.copytree(out, changed)
    edited = json.loads((changed / "config.json").read_text())
    edited["fitness"]["test_every"] = "all"  # an explicit change is still one
    (changed / "config.json").write_text(json.dumps(edited))
    with pytest.raises(EvomergeError, match=r"fitness\.test_every \('best' -> 'all'\)"):
        resume_search(changed, SearchOptions(out_dir=changed, progress=False), budget=120)

    summary = resume_search(out, SearchOptions(out_dir=out, progress=False), budget=160)
    assert before and summary["evaluations"] == 160
    evaluations, tested = read_log(log)
    assert evaluations == 160
    trials = _trials(summary)
    resumed = trials[80:]
    assert [t.user_attrs["test_score"] is not None for t in trials[:80]] == [True] * 80
    # After the resume, under the default `best`: every new best is tested, against the restored best.
    flags = _new_bests([t.value for t in trials])[80:]
    measured = [t.user_attrs["test_score"] is not None for t in resumed]
    assert all(m for m, new in zip(measured, flags) if new)
    assert len(tested) - 80 == sum(measured) < 80 // 2
    best = summary["best"]
    genome = load_file(str(out / "best.safetensors"))["params"]
    assert best["test_score"] == _held_out(genome)
