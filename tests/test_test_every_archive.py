"""`fitness.test_every: archive`: a held-out test for every member that enters the archive (and
every new best), run as a test-only job after the tell, recorded against the member after its
trial was written; in-process, on Ray workers (sync and async), on resume, and when it fails."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState
from safetensors.numpy import load_file

from conftest import digits_config
from counting_tasks import read_log
from evomerge import snapshots
from evomerge.engine.late_tests import TestRecord
from evomerge.engine.local import run_local
from evomerge.engine.population import Population
from evomerge.engine.search import SearchOptions, resume_search, run_search
from evomerge.report import summary_table
from evomerge.status import run_status, status_table
from evomerge.strategies.base import Evaluation, Problem
from evomerge.strategies.cmaes import CMAES
from evomerge.strategies.m2n2 import M2N2
from evomerge.tracking import replay_payload
from evomerge.tracking.late_tests import held_out_counts, measured_tests, member_trials, study_trials, with_tests
from evomerge.tracking.plots import progress_series
from evomerge.tracking.storage import JOURNAL_NAME, open_storage
from fitness.digits import DigitsTask

TRAIN = 300


def _config(log, name="ta", budget=120, **overrides):
    options = {"train_size": TRAIN, "log": str(log), **overrides.pop("task_options", {})}
    fitness = {"task": "counting_tasks:CountingDigits", "options": options, "test_every": "archive"}
    return digits_config(name, fitness=fitness, budget={"evaluations": budget}, **overrides)


def _held_out(genome) -> float:
    return DigitsTask({"train_size": TRAIN}).test_score(genome)


def _tell(population, scores):
    candidate = population.ask()
    population.tell(Evaluation(candidate.member_id, np.array(scores, dtype=np.float32)))
    return candidate


# -- the population's side, hand-worked ---------------------------------------------------------

def test_admissions_and_new_bests_are_queued_once_and_rejected_children_never():
    # Archive of 2, alpha 1. Members 0 [1,0,0] and 1 [0,1,0] fill it. Child 2 [.5,0,0]: loads
    # z = [1.5, 1, 0], fitness 0: 1/1.5, 1: 1, 2: .5/1.5, so child 2 is the argmin and rejected
    # (mean 1/6, not a best either). Child 3 [0,1,1]: z = [1, 2, 1], fitness 0: 1, 1: 1/2,
    # 3: 1/2 + 1 = 1.5, so member 1 is dropped and 3 enters; its mean 2/3 is also the new best.
    problem = Problem(dimension=4, num_datapoints=3)
    population = Population(M2N2({"archive_size": 2}, problem, seed=0), budget=10, test_every="archive")
    assert population.test_threshold() == math.inf  # the worker never tests while scoring
    for scores in ([1, 0, 0], [0, 1, 0], [0.5, 0, 0], [0, 1, 1]):
        _tell(population, scores)
    assert sorted(population.strategy.ids.tolist()) == [0, 3]
    jobs = population.take_tests(10)
    assert [job.member_id for job in jobs] == [0, 1, 3]  # member 0 was the first best too: once
    assert population.tests_outstanding and not population.pending_tests
    assert population.best.member_id == 3 and population.best.test_score is None
    population.tell_test(TestRecord(1, 0.25))
    population.tell_test(TestRecord(3, 0.75))
    assert population.best.test_score == 0.75
    population.tell_test(TestRecord(0, float("nan")))  # not finite: not measured
    assert not population.tests_outstanding
    assert population.test_counts() == {"measured": 2, "failed": 0, "outstanding": 0}
    # Child 4 [1,1,0]: z = [2, 2, 1], fitness 0: 1/2, 3: 1/2 + 1, 4: 1/2 + 1/2: member 0 is
    # dropped and 4 enters; its mean 2/3 only ties the best, so it is tested as a member.
    _tell(population, [1, 1, 0])
    assert sorted(population.strategy.ids.tolist()) == [3, 4] and population.best.member_id == 3
    assert [job.member_id for job in population.take_tests(10)] == [4]


def test_a_strategy_without_archive_tests_its_new_bests_only():
    problem = Problem(dimension=4, num_datapoints=2)
    population = Population(CMAES({"popsize": 4}, problem, seed=0), budget=10, test_every="archive")
    flags = []
    for scores in ([0, 1], [0, 0], [1, 1], [1, 0]):
        _tell(population, scores)
        flags.append([job.member_id for job in population.take_tests(10)])
    assert flags == [[0], [], [2], []]


def test_tests_not_back_survive_a_snapshot_and_the_ones_the_study_has_are_dropped():
    problem = Problem(dimension=4, num_datapoints=3)
    population = Population(M2N2({"archive_size": 2}, problem, seed=0), budget=10, test_every="archive")
    for scores in ([1, 0, 0], [0, 1, 0], [0, 1, 1]):
        _tell(population, scores)
    out = population.take_tests(1)  # member 0 is out, 1 and 2 are queued
    assert [job.member_id for job in out] == [0]
    meta, arrays = population.state_dict()
    json.dumps(meta)  # the snapshot's state is JSON
    restored = Population(M2N2({"archive_size": 2}, problem, seed=0), budget=10, test_every="archive")
    restored.load_state_dict(json.loads(json.dumps(meta)), arrays)
    assert [j.member_id for j in restored.late.pending] == [0, 1, 2]  # the one out goes again, first
    assert np.array_equal(restored.late.pending[0].genome, out[0].genome)
    restored.note_measured({1: TestRecord(1, 0.5), 2: TestRecord(2, 0.625)})  # recorded before the crash
    assert [j.member_id for j in restored.take_tests(10)] == [0]
    assert restored.best.member_id == 2 and restored.best.test_score == 0.625
    _tell(restored, [1, 1, 0])  # enters (member 0 is dropped): z = [2, 2, 1], fitness .5, 1.5, 1
    assert [j.member_id for j in restored.take_tests(10)] == [3]


# -- in-process -------------------------------------------------------------------------------

def _admissions(entries, num_datapoints, archive_size=20):
    """Which member ids the M2N2 replacement rule admits, for (member id, scores or None) in
    tell order, and which set a new best: recomputed from the recorded scores alone."""
    strategy = M2N2({"archive_size": archive_size}, Problem(dimension=1, num_datapoints=num_datapoints), seed=0)
    admitted, bests, best = [], [], -math.inf
    for member, scores in entries:
        if scores is None:
            continue
        if strategy._insert(np.zeros(1), np.asarray(scores, dtype=np.float64), member, 0):
            admitted.append(member)
        mean = float(np.mean(scores))
        if mean > best:
            best = mean
            bests.append(member)
    return admitted, bests


def _scores(payload):
    return replay_payload.decode_scores(replay_payload.decode(payload)["s"], TRAIN)


def test_in_process_archive_tests_exactly_the_admitted_members_and_new_bests(tmp_path):
    log = tmp_path / "calls.log"
    records, tests = [], []
    population = run_local(_config(log, budget=150), on_record=records.append, on_test=tests.append)
    evaluations, tested = read_log(log)
    assert evaluations == len(records) == 150
    admitted, bests = _admissions([(r.member_id, _scores(r.replay)) for r in records], TRAIN)
    expected = list(dict.fromkeys(admitted + bests))  # each member once
    assert sorted(t.member_id for t in tests) == sorted(expected)
    assert len(tested) == len(tests) == len(set(t.member_id for t in tests))
    assert set(bests) <= set(admitted)  # here every new best also entered the archive
    rejected = {r.member_id for r in records} - set(expected)
    assert len(rejected) > 20  # a real saving: children the competition turned away
    assert all(r.test_score is None for r in records)  # nothing tested while scoring
    means = {r.member_id: r.train_score for r in records}
    assert sorted(tested) == sorted(means[t.member_id] for t in tests)  # the members' own genomes
    assert population.best.test_score == _held_out(population.best.genome)
    assert population.best.test_score == next(t.test_score for t in tests if t.member_id == population.best.member_id)


# -- on Ray -----------------------------------------------------------------------------------

def _study(summary):
    return optuna.load_study(study_name=summary["study_name"], storage=open_storage(summary["storage"]))


def _check_run(summary, run_dir, log, budget):
    study = _study(summary)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert summary["evaluations"] == len(trials) == budget
    assert all(t.user_attrs["test_score"] is None for t in trials)  # no test while scoring
    evaluations, tested = read_log(log)
    assert evaluations == budget
    admitted, bests = _admissions([(t.user_attrs["member_id"], _scores(t.user_attrs["replay"])
                                    if t.state.name == "COMPLETE" else None) for t in trials], TRAIN)
    measured = measured_tests(study)
    # exactly one test per admission (and per new best), none for a rejected child
    assert sorted(measured) == sorted(set(admitted) | set(bests))
    assert len(tested) == len(measured)
    means = {t.user_attrs["member_id"]: t.value for t in trials}
    assert sorted(tested) == sorted(means[m] for m in measured)
    assert summary["held_out"] == {"test_every": "archive", "measured": len(measured), "failed": 0}
    # summary, best.json, status and plots show the best member's own measured score
    best = summary["best"]
    genome = load_file(str(run_dir / "best.safetensors"))["params"]
    assert best["test_score"] == _held_out(genome) == measured[best["member_id"]].test_score
    assert json.loads((run_dir / "best.json").read_text())["test_score"] == best["test_score"]
    status = run_status(run_dir)
    assert status["best_member"] == best["member_id"] and status["best_test"] == best["test_score"]
    assert status["held_out"] == {"measured": len(measured), "failed": 0}
    assert f"{len(measured)} measured (test_every: archive)" in status_table(status)
    assert f"{len(measured)} measured (test_every: archive)" in summary_table(summary)
    merged = study_trials(study)
    series = progress_series(merged)
    assert np.array_equal(np.isfinite(series["best_test"]), np.isfinite(series["best_train"]))
    assert int(np.isfinite(series["test"]).sum()) == len(measured)
    return admitted, measured


@pytest.mark.parametrize("sync", [True, False])
def test_on_ray_archive_tests_each_admission_once(ray_session, tmp_path, sync):
    log = tmp_path / "calls.log"
    run_dir = tmp_path / "run"
    summary = run_search(_config(log, sync=sync), SearchOptions(out_dir=run_dir, progress=False))
    admitted, measured = _check_run(summary, run_dir, log, 120)
    assert len(admitted) < 120 - 20


def _cut_journal(path, keep_trials):
    """The journal as a crash after its `keep_trials`-th trial line would leave it."""
    lines = path.read_text().splitlines(keepends=True)
    trials, cut = 0, len(lines)
    for i, line in enumerate(lines):
        if json.loads(line)["op_code"] == 4:  # CREATE_TRIAL
            trials += 1
            if trials == keep_trials:
                cut = i + 1
                break
    path.write_text("".join(lines[:cut]))


def test_resume_after_a_kill_sends_the_missing_tests_again(ray_session, tmp_path):
    log = tmp_path / "calls.log"
    run_dir = tmp_path / "run"
    config = _config(log, budget=120, sync=True, snapshots={"every": 40})
    # One sync round per stretch (advance_seconds=0), so that the journal holds each round's
    # tests right after its trials whatever the machine's speed; with the default 0.25 s a fast
    # machine records many rounds in one stretch, every test after all their trials.
    straight = run_search(config, SearchOptions(out_dir=run_dir, progress=False, advance_seconds=0))
    full = measured_tests(_study(straight))
    # The crash: the search got to trial 62 (mid-round, before that round's tests were recorded),
    # its newest snapshot is the last one written before that.
    step = 0
    for path in snapshots.list_snapshots(run_dir):
        taken = int(path.name.split("-")[1])
        if taken >= 62:
            shutil.rmtree(path)
        else:
            step = max(step, taken)
    (run_dir / "summary.json").unlink()
    _cut_journal(run_dir / JOURNAL_NAME, 62)
    kept = measured_tests(optuna.load_study(study_name=straight["study_name"], storage=open_storage(straight["storage"])))
    assert 0 < len(kept) < len(full)
    before = len(read_log(log)[1])
    log.write_text("")  # count what the resumed search does
    summary = resume_search(run_dir, SearchOptions(out_dir=run_dir, progress=False))
    assert summary["recovery"]["replayed"] == 62 - step
    evaluations, tested = read_log(log)
    assert evaluations == 120 - 62  # the trials after the cut, evaluated again
    # every test the study lacked was sent (again), none it had: one per admission overall
    resumed = measured_tests(_study(summary))
    assert sorted(resumed) == sorted(full)  # the same search, the same members tested
    assert len(tested) == len(full) - len(kept)
    assert all(resumed[m].test_score == full[m].test_score for m in full)
    assert before == len(full)
    assert summary["best"] == straight["best"]
    assert summary["held_out"] == straight["held_out"]
    assert run_status(run_dir)["best_test"] == straight["best"]["test_score"] is not None


@pytest.mark.slow  # ~100 s on 2 cores: every killed worker is restarted by Ray
def test_a_test_that_fails_or_kills_its_worker_is_recorded_and_the_search_goes_on(ray_session, tmp_path):
    log = tmp_path / "calls.log"
    run_dir = tmp_path / "run"
    config = _config(log, budget=80, sync=True, task_options={"test_fails": 5, "test_kills": 17},
                     workers={"count": 2, "batch": 1, "max_retries_per_child": 1, "max_restarts": 5})
    summary = run_search(config, SearchOptions(out_dir=run_dir, progress=False))
    assert summary["evaluations"] == 80 and summary["failed"] == 0  # tests never fail an evaluation
    lines = log.read_text().split("\n")
    kills = [line for line in lines if line.startswith("K ")]
    measured = measured_tests(_study(summary))
    failed = {m: r for m, r in measured.items() if r.failed}
    raised = [r for r in failed.values() if r.error.startswith("fitness task raised RuntimeError")]
    died = [r for r in failed.values() if "died" in r.error]
    assert raised and died, (len(raised), len(died))  # both kinds happened on this search
    assert len(kills) == 2 * len(died)  # tried, then once more (max_retries_per_child: 1)
    assert all(r.test_score is None for r in failed.values())
    assert summary["held_out"]["failed"] == len(failed)
    status = run_status(run_dir)
    assert status["held_out"]["failed"] == len(failed)
    trials = study_trials(_study(summary))
    assert sum("test_error" in t.user_attrs for t in trials) == len(failed)


def test_in_process_a_failing_test_is_recorded_and_the_search_goes_on(tmp_path):
    log = tmp_path / "calls.log"
    tests = []
    population = run_local(_config(log, budget=60, task_options={"test_fails": 3}), on_test=tests.append)
    assert population.told == 60 and population.failed == 0
    failed = [t for t in tests if t.failed]
    assert failed and all(t.error.startswith("fitness task raised RuntimeError: simulated test crash") for t in failed)
    assert all(t.test_score is None for t in failed)
    assert population.test_counts() == {"measured": len(tests) - len(failed), "failed": len(failed), "outstanding": 0}


def test_a_late_test_goes_on_its_members_full_row_trial():
    def trial(member, partial=False, topup_of=None, state=TrialState.COMPLETE):
        attrs = {"member_id": member, "test_score": None, **({"partial": True} if partial else {}),
                 **({} if topup_of is None else {"topup_of": topup_of})}
        return optuna.trial.create_trial(state=state, value=None if state == TrialState.FAIL else 0.5,
                                         user_attrs=attrs)
    trials = [trial(0), trial(1, partial=True), trial(2, partial=True, topup_of=1), trial(3, topup_of=1),
              trial(4, partial=True), trial(5, state=TrialState.FAIL)]
    # member 1's full row is the last top-up (trial 3); member 4 entered on its subset alone
    assert member_trials(trials) == {0: 0, 1: 3, 4: 4}
    tests = {0: TestRecord(0, 0.25), 1: TestRecord(1, None, error="boom"), 4: TestRecord(4, 0.5),
             5: TestRecord(5, 0.75)}
    merged = with_tests(trials, tests)
    assert [t.user_attrs["test_score"] for t in merged] == [0.25, None, None, None, 0.5, None]
    assert merged[3].user_attrs["test_error"] == "boom" and "test_error" not in trials[3].user_attrs
    assert held_out_counts(merged) == {"measured": 2, "failed": 1}
