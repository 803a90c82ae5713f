"""Bulk insertion of finished trials into an Optuna `RDBStorage`.

`study.add_trials` on an `RDBStorage` costs ~25 SQL statements per trial (one transaction each),
about 17-40 trials/s on SQLite and PostgreSQL alike, while a search evaluates several hundred
candidates per second. `RDBBulkWriter.write` inserts a whole batch of finished trials in ONE
transaction of about 8 statements, straight into Optuna's own tables through Optuna's ORM models
(`optuna.storages._rdb.models`), so table and column names, enum and value encodings come from
the installed Optuna:

* PostgreSQL with psycopg 3: lock; one statement that draws the batch's trial_ids from the trials
  table's own sequence (what its column default draws) and counts; then one COPY per table, from
  text built in Python. Every statement text is fixed, so nothing is parsed per batch size. The
  search is CPU-bound, and this is what costs its cores least: in batches of 10-100 a search's
  trial costs about 0.06 ms of the driver's CPU from FrozenTrials, 0.03-0.045 ms straight from
  the search's records (`write_records`), and 0.1 ms of the server backend's
  (`benchmarks/recorder.py`). The server's share is the per-row work of Optuna's schema: two
  indexes, a sequence default and a foreign-key check for each of a trial's ~11 child rows
  (the foreign-key checks alone are about half of it).
* Anything else (SQLite; PostgreSQL through another driver, or whose trial ids do not come from
  a plain sequence): lock, count, one INSERT per table (SQLAlchemy Core executemany with
  RETURNING, which SQLAlchemy's "insertmanyvalues" sends as multi-row INSERTs of up to 1000 rows;
  SQLite < 3.35 has no RETURNING and gets sqlite3's executemany plus one SELECT for the new
  trial_ids).

What is written is what `study.add_trials(trials)` would have written: the same rows, numbers,
states, values (inf/-inf encoded as Optuna does), params in Optuna's internal representation with
their JSON-serialised distributions, JSON-encoded user/system attributes, intermediate values and
datetimes (converted by the ORM model's own setters). Differences:

* A batch is all or nothing: a trial that fails validation (`FrozenTrial._validate`, wrong number
  of values, unfinished state, distribution incompatible with the study's earlier one for that
  param) makes `write` raise before anything is written, whereas `add_trials` would have
  committed the trials before it.
* Distribution compatibility is checked against this writer's cache of the study's param
  distributions, filled from the database the first time a param name is seen (as Optuna's
  `_CachedStorage` does per process).

Trial numbers continue the study's count. Within the transaction the study row is locked first
(`SELECT ... FOR UPDATE` on PostgreSQL, which is the lock Optuna's own `create_new_trial` takes,
so bulk writers and ordinary Optuna writers on the same study exclude each other; on SQLite a
no-op `UPDATE` of the study row, which takes SQLite's database write lock before the count is
read), then `number = COUNT(trials of the study) + i`, which is exactly Optuna's rule
(`TrialModel.count_past_trials`: the number of the study's trials with a smaller trial_id). The
first batch counts the study; later ones carry the writer's count on, adding the study's trials
with a trial_id above the largest the writer wrote (see `RDBBulkWriter._count_trials` for why
that is the same number), so a batch's cost does not grow with the study.

Readers: Optuna's in-process cache (`optuna.storages._CachedStorage`, which `optuna.create_study`
/ `load_study` wrap an `RDBStorage` in) keeps finished trials, but on every `get_trials()` it asks
the database for all trials with a trial_id above the largest finished one it has seen. Bulk
written trials get new, larger trial_ids, so a `Study` object in the same process (including the
one given to the writer) sees them on its next `get_trials()`; nothing needs reloading.

`supports_bulk` (in `rdb_schema`) says which storages the writer may write to.
"""

from __future__ import annotations

import datetime
import inspect
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import optuna
import sqlalchemy as sa
from optuna import distributions as optuna_distributions
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial

from evomerge.tracking.copy_text import copy_datetime as _copy_datetime
from evomerge.tracking.copy_text import copy_float as _copy_float
from evomerge.tracking.copy_text import copy_json as _copy_json
from evomerge.tracking.copy_text import copy_json_text as _copy_json_text
from evomerge.tracking.copy_text import copy_text as _copy_text
from evomerge.tracking.copy_text import json_text as _json_text
from evomerge.tracking.rdb_schema import schema_problem, unwrap_storage, supports_bulk
from evomerge.tracking.trial_record import (checked_values, distribution_for, distribution_key, record_to_trial,
                                           user_attrs)

if TYPE_CHECKING:
    from evomerge.engine.population import EvalRecord

__all__ = ["RDBBulkWriter", "supports_bulk", "bulk_writer_for"]

def bulk_writer_for(study: optuna.Study) -> RDBBulkWriter | None:
    """A bulk writer for `study` if its storage supports one, else None."""
    storage = unwrap_storage(study._storage)
    return RDBBulkWriter(storage, study) if supports_bulk(storage) else None


# -- encodings: evomerge/tracking/copy_text.py ---------------------------------------------------

# The columns COPY writes, in the order the _prepare_copy lines hold them (after trial_id).
_COPY_COLUMNS = {
    "trials": ("trial_id", "number", "study_id", "state", "datetime_start", "datetime_complete"),
    "trial_values": ("trial_id", "objective", "value", "value_type"),
    "trial_params": ("trial_id", "param_name", "param_value", "distribution_json"),
    "trial_user_attributes": ("trial_id", "key", "value_json"),
    "trial_system_attributes": ("trial_id", "key", "value_json"),
    "trial_intermediate_values": ("trial_id", "step", "intermediate_value", "intermediate_value_type"),
}
# Indexes into _PreparedTrial.children, in the order the child tables are written.
_VALUES, _PARAMS, _USER_ATTRS, _SYSTEM_ATTRS, _INTERMEDIATE = range(5)
_CACHE_LIMIT = 4096  # entries per cache; a search's params have a few hundred distinct distributions
# The count carried on from a writer's previous batch looks at most this many of the newest trials.
_NEWER_SCAN = 1000


class _Holder:
    """What the TrialModel datetime setters write into, instead of a TrialModel."""


class _PreparedTrial:
    """A trial's rows, ready before the transaction starts: dicts for SQLAlchemy, or COPY text
    lines (each without its leading trial_id, which is only known inside the transaction)."""

    __slots__ = ("row", "children", "distributions")

    def __init__(self, row: Any, children: tuple[list[Any], ...],
                 distributions: dict[str, tuple[optuna_distributions.BaseDistribution, Any]]) -> None:
        self.row = row
        self.children = children
        # name -> (distribution, its cache key or None)
        self.distributions = distributions


class RDBBulkWriter:
    """Writes batches of finished trials into `study` (stored in `storage`), one transaction each.

    Not thread-safe by itself; use one writer per thread (several writers, in any threads or
    processes, may write to the same study: numbers stay unique and contiguous).
    """

    def __init__(self, storage: RDBStorage, study: optuna.Study) -> None:
        storage = unwrap_storage(storage)
        problem = schema_problem(storage)
        if problem is not None:
            raise ValueError(f"RDBBulkWriter cannot write to this storage: {problem}")
        self._storage = storage
        self._engine: sa.engine.Engine = storage.engine
        self._sqlite = self._engine.dialect.name == "sqlite"
        # Resolve through `storage` rather than trusting study._study_id: the study object may
        # come from another storage object pointing at the same database.
        self.study_name = study.study_name
        self._study_id = storage.get_study_id_from_name(study.study_name)
        self._n_objectives = len(storage.get_study_directions(self._study_id))
        # executemany with RETURNING (SQLAlchemy's "insertmanyvalues": PostgreSQL; SQLite >= 3.35)
        self._returning_many = bool(self._engine.dialect.insert_executemany_returning)
        # Distributions of the study's params, as Optuna checks compatibility against them.
        self._known_distributions: dict[str, optuna_distributions.BaseDistribution] = {}
        # (param name, distribution key) pairs found compatible with _known_distributions[name]
        self._compatible: set[tuple[str, Any]] = set()
        self._distribution_json: dict[Any, str] = {}  # distribution key -> distribution_to_json
        self._copy_names: dict[str, str] = {}  # param name / attribute key -> COPY field
        self._record_params: dict[tuple[str, Any], tuple[str, str, Any, Any]] = {}  # see _record_param
        # (the study's trial count, its largest trial_id) after this writer's last commit
        self._counted: tuple[int, int] | None = None

        self._trials = models.TrialModel.__table__
        self._studies = models.StudyModel.__table__
        self._params = models.TrialParamModel.__table__
        self._values = models.TrialValueModel.__table__
        self._user_attrs = models.TrialUserAttributeModel.__table__
        self._system_attrs = models.TrialSystemAttributeModel.__table__
        self._intermediate = models.TrialIntermediateValueModel.__table__
        self._child_tables = (self._values, self._params, self._user_attrs, self._system_attrs,
                              self._intermediate)
        # The ORM attributes behind the datetime columns (`_datetime_start_utc` in Optuna 5.0),
        # and the model's setters that convert a datetime into what they hold (None: the column
        # is mapped directly, and the ORM model is built to convert).
        mapper = sa.inspect(models.TrialModel)
        self._dt_attrs = {
            name: mapper.get_property_by_column(self._trials.c[name]).key
            for name in ("datetime_start", "datetime_complete")
        }
        setters = [getattr(inspect.getattr_static(models.TrialModel, name, None), "fset", None)
                   for name in self._dt_attrs]
        self._dt_setters = setters if all(setters) else None

        # New trial_ids always above the ones before (SQLite: max(rowid) + 1; PostgreSQL: checked
        # on the sequence), so the study's count can be carried on from this writer's last batch.
        self._sequence: str | None = None
        if self._engine.dialect.name == "postgresql":
            self._sequence = self._trial_id_sequence()
        self._incremental_count = self._sqlite or self._sequence is not None
        # psycopg 3 on PostgreSQL: every table by COPY, trial_ids drawn from that sequence (see
        # _write_copy). Anything else goes by SQLAlchemy Core.
        self._copy = self._sequence is not None and self._engine.dialect.driver == "psycopg"
        if self._copy:
            self._copy_sql = {table: self._copy_statement(table) for table in (self._trials, *self._child_tables)}
            trials = self._qualified(self._trials)
            self._lock_sql = f"SELECT study_id FROM {self._qualified(self._studies)} WHERE study_id = %s FOR UPDATE"
            ids = "ARRAY(SELECT nextval(%s::regclass) FROM generate_series(1, %s))"
            self._ids_sql = f"SELECT {ids}"
            self._count_sql = f"SELECT count(*) FROM {trials} WHERE study_id = %s"
            self._newer_sql = (f"SELECT {ids}, count(CASE WHEN study_id = %s THEN 1 END), count(*) FROM "
                               f"(SELECT study_id FROM {trials} WHERE trial_id > %s ORDER BY trial_id "
                               f"LIMIT {_NEWER_SCAN}) AS newer")

    # -- PostgreSQL set-up ----------------------------------------------------------------------

    @staticmethod
    def _qualified(table: sa.Table) -> str:
        return f'"{table.schema}"."{table.name}"' if table.schema else f'"{table.name}"'

    def _copy_statement(self, table: sa.Table) -> str:
        names = ", ".join(f'"{c}"' for c in _COPY_COLUMNS[table.name])
        return f"COPY {self._qualified(table)} ({names}) FROM STDIN"

    def _trial_id_sequence(self) -> str | None:
        """The sequence that trials.trial_id defaults to, if ids drawn from it later are always
        larger (increment > 0, no per-session cache, no cycling) and may also be given
        explicitly (not GENERATED ALWAYS). None otherwise."""
        try:
            with self._engine.connect() as conn:
                row = conn.execute(sa.text(
                    "SELECT s.seqrelid::regclass::text, s.seqincrement > 0 AND s.seqcache = 1 AND NOT s.seqcycle "
                    "AND a.attidentity <> 'a' "
                    "FROM pg_catalog.pg_sequence s, pg_catalog.pg_attribute a "
                    "WHERE s.seqrelid = pg_catalog.pg_get_serial_sequence(:table, 'trial_id')::regclass "
                    "AND a.attrelid = CAST(:table AS regclass) AND a.attname = 'trial_id'"
                ), {"table": self._qualified(self._trials)}).first()
        except sa.exc.SQLAlchemyError:  # any doubt means "no"
            return None
        return row[0] if row is not None and row[1] else None

    # -- preparation (outside the transaction) -------------------------------------------------

    def _validated(self, trial: FrozenTrial) -> FrozenTrial:
        trial._validate()
        if not trial.state.is_finished():
            raise ValueError(f"RDBBulkWriter writes finished trials only, got one in state {trial.state.name}")
        if trial.values is not None and len(trial.values) != self._n_objectives:
            raise ValueError(
                f"The added trial has {len(trial.values)} values, which is different from the "
                f"number of objectives {self._n_objectives} in the study."
            )
        return trial

    def _stored_datetimes(self, trial: FrozenTrial) -> tuple[Any, Any]:
        """datetime_start/complete as Optuna's model stores them, converted by the model's own
        setters, run on a bare object (building the ORM model costs more than all the rest of a
        trial's preparation). A finished trial from `create_trial` has one datetime object for
        both, converted once."""
        return self._stored_pair(trial.datetime_start, trial.datetime_complete)

    def _stored_pair(self, start: Any, complete: Any) -> tuple[Any, Any]:
        if self._dt_setters is None:
            model = models.TrialModel(datetime_start=start, datetime_complete=complete)
            return tuple(getattr(model, attr) for attr in self._dt_attrs.values())  # type: ignore[return-value]
        holder = _Holder()
        set_start, set_complete = self._dt_setters
        start_attr, complete_attr = self._dt_attrs.values()
        set_start(holder, start)
        stored_start = getattr(holder, start_attr)
        if complete is start:
            return stored_start, stored_start
        set_complete(holder, complete)
        return stored_start, getattr(holder, complete_attr)

    def _distribution(self, distribution: optuna_distributions.BaseDistribution) -> tuple[str, Any]:
        """(distribution_to_json, cache key or None). Cached for float and int distributions (a
        search records the same few over and over), keyed by their exact attribute values and
        types (1, 1.0 and True are equal keys in a dict but different JSON)."""
        kind = type(distribution)
        if kind is not optuna_distributions.FloatDistribution and kind is not optuna_distributions.IntDistribution:
            return optuna_distributions.distribution_to_json(distribution), None
        attributes = distribution.__dict__.values()
        key = (kind, *attributes, *map(type, attributes))
        text = self._distribution_json.get(key)
        if text is None:
            if len(self._distribution_json) >= _CACHE_LIMIT:
                self._distribution_json.clear()
            text = self._distribution_json[key] = optuna_distributions.distribution_to_json(distribution)
        return text, key

    def _copy_name(self, name: str) -> str:
        """A param name or attribute key as a COPY field; cached, as a search repeats them."""
        text = self._copy_names.get(name)
        if text is None:
            if len(self._copy_names) >= _CACHE_LIMIT:
                self._copy_names.clear()
            text = self._copy_names[name] = _copy_text(name)
        return text

    def _prepare(self, trial: FrozenTrial) -> _PreparedTrial:
        """Rows as dicts of column values, for SQLAlchemy."""
        self._validated(trial)
        start, complete = self._stored_datetimes(trial)
        row = {"study_id": self._study_id, "state": trial.state, "datetime_start": start,
               "datetime_complete": complete}
        children: tuple[list[Any], ...] = ([], [], [], [], [])
        for objective, value in enumerate(trial.values or ()):
            stored, value_type = models.TrialValueModel.value_to_stored_repr(value)
            children[_VALUES].append({"objective": objective, "value": stored, "value_type": value_type})
        distributions = {}
        for name, value in trial.params.items():
            distribution = trial.distributions[name]
            text, key = self._distribution(distribution)
            distributions[name] = (distribution, key)
            children[_PARAMS].append({"param_name": name, "param_value": distribution.to_internal_repr(value),
                                      "distribution_json": text})
        children[_USER_ATTRS].extend({"key": k, "value_json": _json_text(v)} for k, v in trial.user_attrs.items())
        children[_SYSTEM_ATTRS].extend({"key": k, "value_json": _json_text(v)} for k, v in trial.system_attrs.items())
        for step, value in trial.intermediate_values.items():
            stored, value_type = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)
            children[_INTERMEDIATE].append({"step": step, "intermediate_value": stored,
                                            "intermediate_value_type": value_type})
        return _PreparedTrial(row, children, distributions)

    def _prepare_copy(self, trial: FrozenTrial) -> _PreparedTrial:
        """Rows as COPY text lines, each missing its leading "trial_id\t"; the trial's own row
        also misses "number\tstudy_id\t". The same values as `_prepare`, in text: enums by member
        name (as SQLAlchemy's Enum type stores them), numbers by repr, NULL as \\N."""
        self._validated(trial)
        start, complete = self._stored_datetimes(trial)
        row = f"{trial.state.name}\t{_copy_datetime(start)}\t{_copy_datetime(complete)}\n"
        values: list[str] = []
        for objective, value in enumerate(trial.values or ()):
            stored, value_type = models.TrialValueModel.value_to_stored_repr(value)
            values.append(f"{objective}\t{_copy_float(stored)}\t{value_type.name}\n")
        distributions = {}
        params: list[str] = []
        name_text = self._copy_name
        trial_distributions = trial.distributions
        for name, value in trial.params.items():
            distribution = trial_distributions[name]
            text, key = self._distribution(distribution)
            distributions[name] = (distribution, key)
            params.append(f"{name_text(name)}\t"
                          f"{_copy_float(distribution.to_internal_repr(value))}\t{_copy_json(text)}\n")
        user_attrs = [f"{name_text(k)}\t{_copy_json_text(v)}\n" for k, v in trial.user_attrs.items()]
        system_attrs = [f"{name_text(k)}\t{_copy_json_text(v)}\n"
                        for k, v in trial.system_attrs.items()]
        intermediate: list[str] = []
        for step, value in trial.intermediate_values.items():
            stored, value_type = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)
            intermediate.append(f"{step:d}\t{_copy_float(stored)}\t{value_type.name}\n")
        return _PreparedTrial(row, (values, params, user_attrs, system_attrs, intermediate), distributions)

    # -- the transaction ------------------------------------------------------------------------

    def _lock_study(self, conn: sa.Connection) -> None:
        """Serialise writers of this study for the rest of the transaction."""
        if self._sqlite:
            # pysqlite only BEGINs before DML, so a SELECT here would run outside the
            # transaction; a no-op UPDATE starts it and takes SQLite's write lock.
            found = conn.execute(
                sa.update(self._studies).where(self._studies.c.study_id == self._study_id)
                .values(study_name=self._studies.c.study_name)
            ).rowcount
        else:
            found = conn.execute(
                sa.select(self._studies.c.study_id).where(self._studies.c.study_id == self._study_id)
                .with_for_update()
            ).first() is not None
        if not found:
            raise KeyError(f"study {self.study_name!r} (id {self._study_id}) no longer exists")

    def _check_distributions(self, conn: sa.Connection, prepared: list[_PreparedTrial]) -> None:
        """Optuna's rule: a param's distribution must be compatible with the study's earlier one."""
        known = self._known_distributions
        unknown = {name for p in prepared for name in p.distributions} - known.keys()
        for name in sorted(unknown):  # each param name is looked up once per writer
            row = conn.execute(
                sa.select(self._params.c.distribution_json)
                .join(self._trials, self._trials.c.trial_id == self._params.c.trial_id)
                .where(self._trials.c.study_id == self._study_id, self._params.c.param_name == name)
                .limit(1)
            ).first()
            if row is not None:
                known[name] = optuna_distributions.json_to_distribution(row[0])
        first_seen: dict[str, optuna_distributions.BaseDistribution] = {}  # params new to the study
        for p in prepared:
            for name, (distribution, key) in p.distributions.items():
                if key is not None and (name, key) in self._compatible:
                    continue
                previous = known.get(name)
                if previous is None:
                    previous = first_seen.setdefault(name, distribution)
                elif key is not None:  # a pure function of (name, key) once the study has `name`
                    if len(self._compatible) >= _CACHE_LIMIT:
                        self._compatible.clear()
                    optuna_distributions.check_distribution_compatibility(previous, distribution)
                    self._compatible.add((name, key))
                    continue
                if previous is not distribution:
                    optuna_distributions.check_distribution_compatibility(previous, distribution)

    def _count_trials(self, conn: sa.Connection) -> int:
        """The study's trial count: the first new trial's number (Optuna's rule).

        Counting a study costs in proportion to its size (Optuna counts for every trial it
        adds): about 4 ms of the server's CPU per batch at 50,000 trials. So after its first
        batch a writer carries its count on: the count after its last commit, plus the study's
        trials whose trial_id is above the largest it wrote. That is exact because every writer of a
        study draws trial_ids only once it holds the study lock (Optuna's create_new_trial, and
        this writer), ids drawn later are larger (`_incremental_count`), and Optuna never
        deletes a single trial. Only the newest `_NEWER_SCAN` trials of the table are looked at,
        in trial_id order, so the database walks the primary key whatever its statistics say;
        when there are more, the whole study is counted."""
        if self._counted is not None and self._incremental_count:
            before, last_id = self._counted
            newer = (sa.select(self._trials.c.study_id).where(self._trials.c.trial_id > last_id)
                     .order_by(self._trials.c.trial_id).limit(_NEWER_SCAN).subquery())
            mine, seen = conn.execute(
                sa.select(sa.func.count(sa.case((newer.c.study_id == self._study_id, 1))), sa.func.count())
                .select_from(newer)
            ).one()
            if seen < _NEWER_SCAN:
                return before + mine
        return conn.execute(
            sa.select(sa.func.count(self._trials.c.trial_id)).where(self._trials.c.study_id == self._study_id)
        ).scalar_one()

    def _insert_many(self, conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        statement = sa.insert(table)
        if self._returning_many:
            # With RETURNING, SQLAlchemy's "insertmanyvalues" sends the executemany as multi-row
            # INSERTs (up to 1000 rows each) from a cached compiled statement.
            statement = statement.returning(*table.primary_key.columns)
        conn.execute(statement, rows)

    def _insert_trials(self, conn: sa.Connection, rows: list[dict[str, Any]], first_number: int) -> list[int]:
        """Insert the trial rows; their trial_ids, in row order."""
        statement = sa.insert(self._trials)
        if self._returning_many:
            # mapped by number: correct whatever order the database returns the rows in
            statement = statement.returning(self._trials.c.number, self._trials.c.trial_id)
            ids = {number: trial_id for number, trial_id in conn.execute(statement, rows)}
        else:
            conn.execute(statement, rows)
            ids = {number: trial_id for number, trial_id in conn.execute(
                sa.select(self._trials.c.number, self._trials.c.trial_id)
                .where(self._trials.c.study_id == self._study_id, self._trials.c.number >= first_number)
            )}
        return [ids[first_number + i] for i in range(len(rows))]

    def _write_rows(self, conn: sa.Connection, prepared: list[_PreparedTrial]) -> tuple[int, list[int]]:
        """SQLAlchemy Core: lock, count, one INSERT per table. The first number and the trial_ids."""
        self._lock_study(conn)
        self._check_distributions(conn, prepared)
        first_number = self._count_trials(conn)
        rows = [dict(p.row, number=first_number + i) for i, p in enumerate(prepared)]
        trial_ids = self._insert_trials(conn, rows, first_number)
        for index, table in enumerate(self._child_tables):
            self._insert_many(conn, table, [dict(entry, trial_id=trial_id)
                                            for trial_id, p in zip(trial_ids, prepared)
                                            for entry in p.children[index]])
        return first_number, trial_ids

    def _write_copy(self, conn: sa.Connection, prepared: list[_PreparedTrial]) -> tuple[int, list[int]]:
        """PostgreSQL: lock, then one statement that draws the new trial_ids from the trials
        table's sequence (what its default would have drawn) and counts (see `_count_trials`),
        then one COPY per table.

        Every statement text is fixed, so nothing is parsed per batch size (a multi-row INSERT
        has a new text for every size, which psycopg and the server parse again each time), and
        no row goes through SQLAlchemy."""
        cursor = conn.connection.driver_connection.cursor()
        with cursor:
            if cursor.execute(self._lock_sql, (self._study_id,)).fetchone() is None:
                raise KeyError(f"study {self.study_name!r} (id {self._study_id}) no longer exists")
            self._check_distributions(conn, prepared)
            n = len(prepared)
            first_number = None
            if self._counted is not None:
                before, last_id = self._counted
                ids, mine, seen = cursor.execute(self._newer_sql,
                                                 (self._sequence, n, self._study_id, last_id)).fetchone()
                if seen < _NEWER_SCAN:
                    first_number = before + mine
            else:
                (ids,) = cursor.execute(self._ids_sql, (self._sequence, n)).fetchone()
            if first_number is None:
                (first_number,) = cursor.execute(self._count_sql, (self._study_id,)).fetchone()
            ids.sort()  # numbers follow trial_ids
            head = f"\t{self._study_id}\t"
            self._copy_lines(cursor, self._trials, [f"{trial_id}\t{first_number + i}{head}{p.row}"
                                                    for i, (trial_id, p) in enumerate(zip(ids, prepared))])
            for index, table in enumerate(self._child_tables):
                self._copy_lines(cursor, table, [f"{trial_id}\t{line}" for trial_id, p in zip(ids, prepared)
                                                 for line in p.children[index]])
        return first_number, ids

    def _copy_lines(self, cursor: Any, table: sa.Table, lines: list[str]) -> None:
        if lines:
            with cursor.copy(self._copy_sql[table]) as copy:
                copy.write("".join(lines))

    def write(self, trials: Sequence[FrozenTrial]) -> None:
        """Add `trials` (finished: COMPLETE, PRUNED or FAIL) to the study, numbered in order after
        its existing trials, in one transaction: either all of them are written or none."""
        if not trials:
            return
        prepare = self._prepare_copy if self._copy else self._prepare
        self._write_prepared([prepare(trial) for trial in trials])

    def write_records(self, records: Sequence[EvalRecord]) -> None:
        """`write([record_to_trial(r) for r in records])`. By COPY straight from the records: the
        FrozenTrials, their validation and a datetime per trial were half of the recorder's CPU
        (which a CPU-bound search takes from its workers). The rows are the same (a test compares
        them), except that every trial of the batch gets the batch's time. Other paths go through
        the FrozenTrials."""
        if not self._copy:
            self.write([record_to_trial(record) for record in records])
            return
        if not records:
            return
        now = datetime.datetime.now()  # create_trial's clock
        when = _copy_datetime(self._stored_pair(now, now)[0])
        self._write_prepared([self._prepare_record_copy(record, when) for record in records])

    def _prepare_record_copy(self, record: EvalRecord, when: str) -> _PreparedTrial:
        """`_prepare_copy(record_to_trial(record))`, with `when` as both datetimes."""
        values: list[str] = []
        if record.failed:
            state = "FAIL"
        else:
            state = "COMPLETE"
            for objective, value in enumerate(checked_values(record, self._n_objectives)):
                stored, value_type = models.TrialValueModel.value_to_stored_repr(value)
                values.append(f"{objective}\t{_copy_float(stored)}\t{value_type.name}\n")
        distributions = {}
        params: list[str] = []
        for name, v in record.params.items():
            name_text, json_text, distribution, key = self._record_param(name, distribution_key(v))
            internal = float(v)  # what IntDistribution/FloatDistribution.to_internal_repr give
            if math.isnan(internal):
                raise ValueError(f"`{v}` is invalid value.")
            distributions[name] = (distribution, key)
            params.append(f"{name_text}\t{_copy_float(internal)}\t{json_text}\n")
        name_text = self._copy_name
        attrs = [f"{name_text(k)}\t{_copy_json_text(v)}\n" for k, v in user_attrs(record).items()]
        intermediate: list[str] = []
        if not record.failed and record.intermediate:
            for step, value in record.intermediate.items():
                stored, value_type = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)
                intermediate.append(f"{step:d}\t{_copy_float(stored)}\t{value_type.name}\n")
        row = f"{state}\t{when}\t{when}\n"
        return _PreparedTrial(row, (values, params, attrs, [], intermediate), distributions)

    def _record_param(self, name: str, key: tuple[Any, ...]) -> tuple[str, str, Any, Any]:
        """(name, distribution JSON) as COPY fields, the distribution and its cache key."""
        cached = self._record_params.get((name, key))
        if cached is None:
            if len(self._record_params) >= _CACHE_LIMIT:
                self._record_params.clear()
            distribution = distribution_for(key)
            text, cache_key = self._distribution(distribution)
            cached = self._record_params[(name, key)] = (self._copy_name(name), _copy_json(text), distribution,
                                                         cache_key)
        return cached

    def _write_prepared(self, prepared: list[_PreparedTrial]) -> None:
        with self._engine.begin() as conn:
            first_number, trial_ids = (self._write_copy if self._copy else self._write_rows)(conn, prepared)
        # committed: the count and these distributions are now the study's
        self._counted = (first_number + len(prepared), max(trial_ids))
        for p in prepared:
            for name, (distribution, _) in p.distributions.items():
                self._known_distributions.setdefault(name, distribution)
