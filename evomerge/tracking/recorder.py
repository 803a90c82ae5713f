"""Writes one Optuna trial per evaluation from a background thread, in evaluation order.

The search never waits on the database: records go on a queue. `flush()` blocks until the
study has caught up, which is done before each snapshot and at the end so the two agree.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterable

import optuna
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from evomerge.engine.population import EvalRecord
from evomerge.tracking.rdb_writer import bulk_writer_for

_STOP = object()


def record_to_trial(record: EvalRecord) -> optuna.trial.FrozenTrial:
    params: dict[str, Any] = {}
    distributions: dict[str, Any] = {}
    for name, value in record.params.items():
        if isinstance(value, (int,)) and not isinstance(value, bool):
            params[name] = int(value)
            distributions[name] = IntDistribution(0, max(int(value), 1))
        else:
            params[name] = float(value)
            low, high = (0.0, 1.0) if 0.0 <= value <= 1.0 else (min(value, 0.0), max(value, 1.0))
            distributions[name] = FloatDistribution(low, high)
    attrs: dict[str, Any] = {
        "member_id": record.member_id, "parents": record.parents, "generation": record.generation,
        "test_score": record.test_score, "seconds": round(record.seconds, 6), "evaluation": record.number,
    }
    if record.failed:
        attrs["error"] = record.error
        return create_trial(state=TrialState.FAIL, params=params, distributions=distributions, user_attrs=attrs)
    return create_trial(value=record.train_score, params=params, distributions=distributions, user_attrs=attrs,
                        intermediate_values=record.intermediate)


class TrialRecorder:
    def __init__(self, storage: Any, study_name: str, *, create: bool = True,
                 study_attrs: dict[str, Any] | None = None) -> None:
        if create:
            try:
                self.study = optuna.create_study(storage=storage, study_name=study_name, direction="maximize")
            except optuna.exceptions.DuplicatedStudyError:
                raise ValueError(
                    f"an Optuna study named {study_name!r} already exists in this storage; "
                    "resume the run, pass --overwrite for a fresh run folder, or set optuna.study_name"
                ) from None
            for key, value in (study_attrs or {}).items():
                self.study.set_user_attr(key, value)
        else:
            self.study = optuna.load_study(storage=storage, study_name=study_name)
        # SQLite/PostgreSQL at the schema the bulk writer was tested against: one transaction per
        # batch instead of ~25 statements per trial. Anything else (the journal file): add_trials.
        self._bulk = bulk_writer_for(self.study)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._error: BaseException | None = None
        self.written = 0
        self._thread = threading.Thread(target=self._run, name="optuna-recorder", daemon=True)
        self._thread.start()

    def put(self, records: Iterable[EvalRecord]) -> None:
        self._raise_if_failed()
        for record in records:
            self._queue.put(record)

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
            item = self._queue.get()
            batch = [item]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(entry is _STOP for entry in batch)
            trials = [record_to_trial(entry) for entry in batch if entry is not _STOP]
            try:
                if trials and self._error is None:
                    if self._bulk is not None:
                        self._bulk.write(trials)
                    else:
                        self.study.add_trials(trials)
                    self.written += len(trials)
            except BaseException as exc:  # keep draining so flush() never deadlocks
                self._error = exc
            finally:
                for _ in batch:
                    self._queue.task_done()
            if stop:
                return
