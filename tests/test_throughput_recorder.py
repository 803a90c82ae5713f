"""The journal bulk writer writes what `study.add_trials` writes, batch by batch."""

from __future__ import annotations

import json

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend, JournalStorage

from evomerge.engine.population import EvalRecord
from evomerge.tracking.recorder import JournalBulkWriter, TrialRecorder, record_to_trial


def _records(n: int) -> list[EvalRecord]:
    records = []
    for i in range(n):
        params = {"parent_a": i // 2, "parent_b": i // 3, "mix_ratio": 0.25 + i / (4 * n),
                  "split_fraction": 0.5, "coefficient": -1.5 + i}  # one float outside [0, 1]
        error = "fitness task raised ValueError('boom: \"ü\"\\n')" if i % 7 == 3 else None
        records.append(EvalRecord(
            number=i, member_id=i, train_score=None if error else i / n, test_score=None if error else 0.5,
            params={} if i == 0 else params, parents=[] if i == 0 else [i // 2, i // 3], generation=i % 5,
            seconds=0.001 * i, error=error, intermediate={0: 0.1, 4: 0.3} if i == 5 else None,
            started=1_700_000_000.25 + 3 * i, replay=f'{{"v":1,"a":{i},"g":null,"s":"b:sIA="}}' if i % 2 else None))
    return records


def _study(path) -> optuna.Study:
    storage = JournalStorage(JournalFileBackend(str(path)))
    return optuna.create_study(storage=storage, study_name="s", direction="maximize")


def _entries(path) -> list[dict]:
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    for entry in entries:
        entry.pop("worker_id")  # a random id per storage object
    return entries


def _view(trial: optuna.trial.FrozenTrial) -> tuple:
    return (trial.number, trial.state, trial.values, trial.params, trial.distributions, trial.user_attrs,
            trial.system_attrs, trial.intermediate_values, trial.datetime_start, trial.datetime_complete)


def test_bulk_journal_equals_add_trials(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = [record_to_trial(r) for r in _records(40)]
    reference = _study(tmp_path / "a.journal")
    reference.add_trials(trials)
    bulk = _study(tmp_path / "b.journal")
    assert JournalBulkWriter.supports(bulk)
    writer = JournalBulkWriter(bulk)
    for start in (0, 1, 13, 29):  # uneven batches
        writer.write(trials[start:{0: 1, 1: 13, 13: 29, 29: 40}[start]])
    assert _entries(tmp_path / "b.journal") == _entries(tmp_path / "a.journal")
    # Read back by a fresh storage (another process) and by the writer's own study object.
    for study in (optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(tmp_path / "b.journal")))),
                  bulk):
        assert [_view(t) for t in study.get_trials(deepcopy=False)] == \
            [_view(t) for t in reference.get_trials(deepcopy=False)]


def test_bulk_journal_rejects_an_invalid_batch_whole(tmp_path):
    study = _study(tmp_path / "c.journal")
    good = record_to_trial(_records(2)[1])
    bad = optuna.trial.create_trial(values=[1.0, 2.0])  # two objectives in a one-objective study
    with pytest.raises(ValueError):
        JournalBulkWriter(study).write([good, bad])
    assert study.get_trials() == []


def test_recorder_uses_the_bulk_writer_for_a_journal(tmp_path):
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "d.journal")))
    recorder = TrialRecorder(storage, "s")
    assert isinstance(recorder._bulk, JournalBulkWriter)
    recorder.put(_records(25))
    recorder.close()
    trials = recorder.study.get_trials(deepcopy=False)
    assert [t.number for t in trials] == list(range(25))
    assert [t.user_attrs["member_id"] for t in trials] == list(range(25))


def test_records_written_straight_equal_the_frozen_trial_path(tmp_path):
    """`write_records` skips the FrozenTrials; the journal must not notice (only the times,
    taken once per batch, differ)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    records = _records(40)
    via_trials = _study(tmp_path / "a.journal")
    JournalBulkWriter(via_trials).write([record_to_trial(r) for r in records])
    straight = _study(tmp_path / "b.journal")
    writer = JournalBulkWriter(straight)
    for start, stop in ((0, 1), (1, 13), (13, 40)):
        writer.write_records(records[start:stop])

    def without_times(entries: list[dict]) -> list[dict]:
        return [{k: v for k, v in e.items() if not k.startswith("datetime")} for e in entries]

    a, b = _entries(tmp_path / "a.journal"), _entries(tmp_path / "b.journal")
    assert len(b) == len(a) == 41  # the study's creation, then one entry per trial
    assert without_times(b) == without_times(a)
    assert b == a
    starts = [e["datetime_start"] for e in b[1:]]
    assert starts[0] == "2023-11-14T22:13:20.250000+00:00" and starts[2] == "2023-11-14T22:13:26.250000+00:00"
    assert b[3]["datetime_complete"] == "2023-11-14T22:13:26.252000+00:00"  # trial 2: started + 0.002 s
    fresh = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(tmp_path / "b.journal"))))
    assert [_view(t)[:8] for t in fresh.get_trials(deepcopy=False)] == \
        [_view(t)[:8] for t in via_trials.get_trials(deepcopy=False)]
