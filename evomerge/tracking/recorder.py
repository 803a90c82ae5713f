"""Writes one Optuna trial per evaluation from a background thread, in evaluation order.

The search never waits on the database: records go on a queue. `flush()` blocks until the
study has caught up, which is done before each snapshot and at the end so the two agree.
"""

from __future__ import annotations

import functools
import json
import math
import os
import queue
import threading
import time
import warnings
from datetime import datetime, timezone
from typing import Any, Iterable

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.storages.journal._file import get_lock_file
from optuna.trial import FrozenTrial, TrialState

from evomerge.engine.late_tests import TestRecord
from evomerge.engine.population import EvalRecord
from evomerge.tracking.late_tests import write_tests
from evomerge.tracking.rdb_writer import bulk_writer_for
from evomerge.tracking.replay_payload import ATTR as REPLAY_ATTR
from evomerge.tracking.trial_record import (checked_values, distribution_for, distribution_json, distribution_key,
                                           record_to_trial, trial_times, user_attrs)

_STOP = object()


class _Tests(list):
    """A queue item of late test results (test_every: archive), not trials."""


@functools.lru_cache(maxsize=4096)
def _param_json(name: str, key: tuple[Any, ...]) -> tuple[str, str]:
    """A parameter's name and its `"name":"<distribution JSON>"` member, as JSON text."""
    name_json = json.dumps(name)
    return name_json, f"{name_json}:{json.dumps(distribution_json(distribution_for(key)))}"


def _number(value: float) -> str:
    """A float as `json.dumps` writes it."""
    return repr(value) if math.isfinite(value) else json.dumps(value)


def _journal_time(seconds: float) -> str:
    """A time.time() value as the journal writes datetimes (UTC ISO 8601, microseconds), quoted."""
    return '"' + datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="microseconds") + '"'


# Optuna majors whose journal CREATE_TRIAL entry `JournalBulkWriter` writes (tests compare the two).
JOURNAL_TESTED_MAJORS = ("4", "5")
_CREATE_TRIAL = 4  # optuna.storages.journal._storage.JournalOperation.CREATE_TRIAL


class JournalBulkWriter:
    """Appends a batch of finished trials to a journal file in one locked, fsynced write.

    `study.add_trials` on a journal costs a file lock, an fsync and a read-back of the file per
    trial: about 0.4 ms of the driver's CPU per evaluation, on a machine whose cores run the
    workers. The entries written are those `add_trials` writes (the same CREATE_TRIAL operation,
    built the same way, after the same validation), so the study reads back the same. Other
    processes see them as they would see add_trials' entries; this process's study object reads
    them on its next access.
    """

    def __init__(self, study: optuna.Study) -> None:
        storage = study._storage
        self.study = study
        self._storage = storage
        self._backend: JournalFileBackend = storage._backend
        self._study_id = study._study_id
        self._objectives = len(study.directions)

    @staticmethod
    def supports(study: optuna.Study) -> bool:
        storage = study._storage
        backend = getattr(storage, "_backend", None)
        return (type(storage) is JournalStorage and type(backend) is JournalFileBackend
                and hasattr(backend, "_lock") and hasattr(backend, "_file_path")
                and optuna.__version__.split(".")[0] in JOURNAL_TESTED_MAJORS)

    def write(self, trials: list[FrozenTrial]) -> None:
        entries = [self._entry(trial) for trial in trials]  # validate them all before writing any
        self._append(entries)

    def write_records(self, records: list[EvalRecord]) -> None:
        """`write([record_to_trial(r) for r in records])` without the FrozenTrials and the dicts in
        between: each entry's JSON line is written straight from the record. The same entries (a
        test compares them) at about a third of the recorder's CPU, which on 2 cores is taken from
        the workers. Every trial of the batch gets the batch's time, as it is recorded together."""
        head = (f'{{"op_code":{_CREATE_TRIAL},"worker_id":{json.dumps(self._storage._replay_result.worker_id)},'
                f'"study_id":{int(self._study_id)},"datetime_start":')
        now = time.time()
        lines = [self._line(head, record, now) for record in records]  # validate all before writing any
        with self._storage._thread_lock, get_lock_file(self._backend._lock):
            with open(self._backend._file_path, "ab") as f:  # as JournalFileBackend.append_logs writes
                f.write(("\n".join(lines) + "\n").encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())

    def _line(self, head: str, record: EvalRecord, now: float) -> str:
        values = "null"
        if record.failed:
            state, value = int(TrialState.FAIL), "null"
        else:
            numbers = checked_values(record, self._objectives)
            state = int(TrialState.COMPLETE)
            if len(numbers) == 1:  # as _entry: one objective in "value", several in "values"
                value = _number(numbers[0])
            else:
                value, values = "null", "[" + ",".join(_number(v) for v in numbers) + "]"
        distributions, params = [], []
        for name, v in record.params.items():
            name_json, member_json = _param_json(name, distribution_key(v))
            internal = float(v)  # what IntDistribution/FloatDistribution.to_internal_repr give
            if math.isnan(internal):
                raise ValueError(f"`{v}` is invalid value.")
            distributions.append(member_json)
            params.append(f"{name_json}:{_number(internal)}")
        attrs = json.dumps(user_attrs(record, replay=False), separators=(",", ":"))
        if record.replay is not None:  # compact JSON already, as json.dumps would write it here
            attrs = f'{attrs[:-1]},"{REPLAY_ATTR}":{record.replay}}}'
        curve = "{}" if record.failed or not record.intermediate else \
            json.dumps(dict(record.intermediate), separators=(",", ":"))
        start, complete = trial_times(record, now)
        return (f'{head}{_journal_time(start)},"state":{state},"value":{value},"values":{values},'
                f'"datetime_complete":{_journal_time(complete)},'
                f'"distributions":{{{",".join(distributions)}}},"params":{{{",".join(params)}}},'
                f'"user_attrs":{attrs},"system_attrs":{{}},"intermediate_values":{curve}}}')

    def _append(self, entries: list[dict[str, Any]]) -> None:
        worker_id = self._storage._replay_result.worker_id
        with self._storage._thread_lock:
            self._backend.append_logs([{"op_code": _CREATE_TRIAL, "worker_id": worker_id, **e} for e in entries])

    def _entry(self, trial: FrozenTrial) -> dict[str, Any]:
        """What `JournalStorage.create_new_trial(study_id, template_trial=trial)` logs."""
        trial._validate()
        if trial.values is not None and len(trial.values) != self._objectives:
            raise ValueError(f"a trial has {len(trial.values)} values but the study has {self._objectives} objectives")
        entry: dict[str, Any] = {"study_id": self._study_id, "datetime_start": None, "state": trial.state}
        if trial.values is not None and len(trial.values) > 1:
            entry["value"], entry["values"] = None, trial.values
        else:
            entry["value"], entry["values"] = trial.value, None
        if trial.datetime_start:
            entry["datetime_start"] = trial.datetime_start.astimezone(timezone.utc).isoformat(timespec="microseconds")
        if trial.datetime_complete:
            entry["datetime_complete"] = trial.datetime_complete.astimezone(timezone.utc).isoformat(
                timespec="microseconds")
        entry["distributions"] = {k: distribution_json(d) for k, d in trial.distributions.items()}
        entry["params"] = {k: trial.distributions[k].to_internal_repr(v) for k, v in trial.params.items()}
        entry["user_attrs"] = trial.user_attrs
        entry["system_attrs"] = trial.system_attrs
        entry["intermediate_values"] = trial.intermediate_values
        return entry


def _duplicate(study_name: str) -> ValueError:
    return ValueError(f"an Optuna study named {study_name!r} already exists in this storage; "
                      "resume the run, pass --overwrite for a fresh run folder, or set optuna.study_name")


def refuse_existing_study(storage: Any, study_name: str) -> None:
    """The error a fresh search's TrialRecorder would raise, before any actor is started."""
    if study_name in optuna.get_all_study_names(storage):
        raise _duplicate(study_name)


class TrialRecorder:
    """`groups`: the task's (name, size) groups, one maximised objective each (their mean train
    scores, named by `study.set_metric_names`, also kept as the study's `groups` attribute);
    None: one objective, the mean train score."""

    def __init__(self, storage: Any, study_name: str, *, create: bool = True,
                 study_attrs: dict[str, Any] | None = None,
                 groups: list[tuple[str, int]] | None = None) -> None:
        objectives = len(groups) if groups else 1
        if create:
            try:
                self.study = optuna.create_study(storage=storage, study_name=study_name,
                                                 directions=["maximize"] * objectives)
            except optuna.exceptions.DuplicatedStudyError:
                raise _duplicate(study_name) from None
            if groups:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    self.study.set_metric_names([name for name, _ in groups])
                self.study.set_user_attr("groups", [[name, int(size)] for name, size in groups])
            for key, value in (study_attrs or {}).items():
                self.study.set_user_attr(key, value)
        else:
            self.study = optuna.load_study(storage=storage, study_name=study_name)
            if len(self.study.directions) != objectives:
                raise ValueError(
                    f"the Optuna study {study_name!r} has {len(self.study.directions)} objective(s) but the "
                    f"fitness task gives {objectives} ({'one per group' if groups else 'no groups'}); "
                    "resume with the task's options the search started with")
        # SQLite/PostgreSQL at the schema the bulk writer was tested against: one transaction per
        # batch instead of ~25 statements per trial; a journal file: one locked write per batch.
        # Anything else: add_trials.
        self._bulk: Any = bulk_writer_for(self.study)
        if self._bulk is None and JournalBulkWriter.supports(self.study):
            self._bulk = JournalBulkWriter(self.study)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._error: BaseException | None = None
        self.written = 0
        self.tests_written = 0
        self._thread = threading.Thread(target=self._run, name="optuna-recorder", daemon=True)
        self._thread.start()

    def put(self, records: Iterable[EvalRecord]) -> None:
        self._raise_if_failed()
        batch = list(records)
        if batch:
            self._queue.put(batch)  # one queue item per batch: a lock per record showed in profiles

    def put_tests(self, records: Iterable[TestRecord]) -> None:
        """Late tests, written after the trials queued before them (their members' trials)."""
        self._raise_if_failed()
        batch = _Tests(records)
        if batch:
            self._queue.put(batch)

    def flush(self) -> None:
        self._queue.join()
        self._raise_if_failed()

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"recording to Optuna failed: {self._error}") from self._error

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in batch)
            records = [record for item in batch if item is not _STOP and not isinstance(item, _Tests)
                       for record in item]
            tests = [record for item in batch if isinstance(item, _Tests) for record in item]
            try:
                if records and self._error is None:
                    if self._bulk is not None:  # the journal's and RDB's bulk writers
                        self._bulk.write_records(records)
                    else:
                        self.study.add_trials([record_to_trial(record) for record in records])
                    self.written += len(records)
                if tests and self._error is None:
                    self.tests_written += write_tests(self.study, tests)
            except BaseException as exc:  # keep draining so flush() never deadlocks
                self._error = exc
            finally:
                for _ in batch:
                    self._queue.task_done()
            if stop:
                return
