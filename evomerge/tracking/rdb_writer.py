"""Bulk insertion of finished trials into an Optuna `RDBStorage`.

`study.add_trials` on an `RDBStorage` costs ~25 SQL statements per trial (one transaction each),
about 17-40 trials/s on SQLite and PostgreSQL alike, while a search evaluates several hundred
candidates per second. `RDBBulkWriter.write` inserts a whole batch of finished trials in ONE
transaction of about 8 statements: lock, count, one INSERT per table (SQLAlchemy Core executemany
with RETURNING, which SQLAlchemy's "insertmanyvalues" sends as multi-row INSERTs of up to 1000
rows; SQLite < 3.35 has no RETURNING and gets sqlite3's executemany plus one SELECT for the new
trial_ids), straight into Optuna's own tables through Optuna's ORM models
(`optuna.storages._rdb.models`), so table and column names, enum and value encodings come from
the installed Optuna.

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
(`TrialModel.count_past_trials`: the number of the study's trials with a smaller trial_id).

Readers: Optuna's in-process cache (`optuna.storages._CachedStorage`, which `optuna.create_study`
/ `load_study` wrap an `RDBStorage` in) keeps finished trials, but on every `get_trials()` it asks
the database for all trials with a trial_id above the largest finished one it has seen. Bulk
written trials get new, larger trial_ids, so a `Study` object in the same process (including the
one given to the writer) sees them on its next `get_trials()`; nothing needs reloading.

`supports_bulk(storage)` is deliberately conservative: an RDBStorage on SQLite or PostgreSQL at
their default isolation level (SERIALIZABLE / READ COMMITTED; not AUTOCOMMIT, not REPEATABLE
READ, under which a writer that waited for the lock would count a stale snapshot), whose
installed Optuna's alembic head is one this module was tested against and whose database is at
that head, and whose ORM models have exactly the tables and columns written here. Anything else
should use `study.add_trials`.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from typing import Any

import optuna
import sqlalchemy as sa
from optuna import distributions as optuna_distributions
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial

__all__ = ["RDBBulkWriter", "supports_bulk", "bulk_writer_for", "TESTED_ALEMBIC_REVISIONS"]

# Alembic revisions of Optuna's RDB schema this writer was tested against (Optuna 5.0's head;
# unchanged since Optuna 3.2).
TESTED_ALEMBIC_REVISIONS = frozenset({"v3.2.0.a"})
# Dialect -> the isolation level the locking scheme relies on: on PostgreSQL, READ COMMITTED (a
# writer that waited for the study row lock must see the trials committed meanwhile); SQLite's
# transactions are serialisable. Not AUTOCOMMIT anywhere (a batch must be one transaction).
SUPPORTED_DIALECTS = {"sqlite": "SERIALIZABLE", "postgresql": "READ COMMITTED"}

# Exactly the columns of each table this module reads or writes. A table with any other column
# set (say, a new NOT NULL column) means a schema this writer does not know.
_EXPECTED_COLUMNS: dict[Any, frozenset[str]] = {
    models.StudyModel: frozenset({"study_id", "study_name"}),
    models.TrialModel: frozenset({"trial_id", "number", "study_id", "state", "datetime_start",
                                  "datetime_complete"}),
    models.TrialParamModel: frozenset({"param_id", "trial_id", "param_name", "param_value",
                                       "distribution_json"}),
    models.TrialValueModel: frozenset({"trial_value_id", "trial_id", "objective", "value",
                                       "value_type"}),
    models.TrialUserAttributeModel: frozenset({"trial_user_attribute_id", "trial_id", "key",
                                               "value_json"}),
    models.TrialSystemAttributeModel: frozenset({"trial_system_attribute_id", "trial_id", "key",
                                                 "value_json"}),
    models.TrialIntermediateValueModel: frozenset({"trial_intermediate_value_id", "trial_id", "step",
                                                   "intermediate_value", "intermediate_value_type"}),
}
_EXPECTED_TABLE_NAMES = {
    models.StudyModel: "studies",
    models.TrialModel: "trials",
    models.TrialParamModel: "trial_params",
    models.TrialValueModel: "trial_values",
    models.TrialUserAttributeModel: "trial_user_attributes",
    models.TrialSystemAttributeModel: "trial_system_attributes",
    models.TrialIntermediateValueModel: "trial_intermediate_values",
}


def _unwrap(storage: Any) -> Any:
    """The RDBStorage behind Optuna's `_CachedStorage` wrapper (what `Study._storage` holds)."""
    if isinstance(storage, optuna.storages._CachedStorage):
        return storage._backend
    return storage


def _schema_problem(storage: Any) -> str | None:
    """Why the bulk writer must not be used with `storage`, or None if it may."""
    storage = _unwrap(storage)
    if not isinstance(storage, RDBStorage):
        return f"not an RDBStorage ({type(storage).__name__})"
    dialect = storage.engine.dialect
    if dialect.name not in SUPPORTED_DIALECTS:
        return f"untested database dialect {dialect.name!r}"
    isolation = SUPPORTED_DIALECTS[dialect.name]
    configured = {storage.engine.get_execution_options().get("isolation_level"),
                  getattr(dialect, "_on_connect_isolation_level", None)} - {None}
    if configured - {isolation}:
        return f"the engine is configured with isolation level {sorted(configured)}, not {isolation}"
    for model, columns in _EXPECTED_COLUMNS.items():
        table = getattr(model, "__table__", None)
        if table is None or table.name != _EXPECTED_TABLE_NAMES[model]:
            return f"{model.__name__} does not map the table {_EXPECTED_TABLE_NAMES[model]!r}"
        found = {column.name for column in table.columns}
        if found != columns:
            return f"{table.name} has columns {sorted(found)}, expected {sorted(columns)}"
    for model, name in ((models.TrialValueModel, "value_to_stored_repr"),
                        (models.TrialIntermediateValueModel, "intermediate_value_to_stored_repr")):
        if not callable(getattr(model, name, None)):
            return f"{model.__name__}.{name} is missing"
    for name in ("FINITE", "INF_POS", "INF_NEG"):
        if not hasattr(models.TrialValueModel.TrialValueType, name):
            return f"TrialValueModel.TrialValueType.{name} is missing"
    head = storage.get_head_version()
    if head not in TESTED_ALEMBIC_REVISIONS:
        return f"installed Optuna's schema head {head!r} is not one this writer was tested against"
    current = storage.get_current_version()
    if current != head:
        return f"the database schema is at {current!r}, not the installed Optuna's head {head!r}"
    with storage.engine.connect() as conn:
        level = conn.get_isolation_level()
    if level != isolation:
        return f"transactions run at isolation level {level}, not {isolation}"
    return None


def supports_bulk(storage: Any) -> bool:
    """True if `RDBBulkWriter` may write into `storage` (an RDBStorage, or Optuna's cached wrapper
    of one) — i.e. its schema is the one this module was tested against. False otherwise,
    including when checking fails: callers then fall back to `study.add_trials`."""
    try:
        return _schema_problem(storage) is None
    except Exception:  # noqa: BLE001 - any doubt means "no"
        return False


def bulk_writer_for(study: optuna.Study) -> RDBBulkWriter | None:
    """A bulk writer for `study` if its storage supports one, else None."""
    storage = _unwrap(study._storage)
    return RDBBulkWriter(storage, study) if supports_bulk(storage) else None


class _PreparedTrial:
    __slots__ = ("row", "params", "values", "user_attrs", "system_attrs", "intermediate", "distributions")

    def __init__(self) -> None:
        self.row: dict[str, Any] = {}
        self.params: list[dict[str, Any]] = []
        self.values: list[dict[str, Any]] = []
        self.user_attrs: list[dict[str, Any]] = []
        self.system_attrs: list[dict[str, Any]] = []
        self.intermediate: list[dict[str, Any]] = []
        self.distributions: dict[str, optuna_distributions.BaseDistribution] = {}


class RDBBulkWriter:
    """Writes batches of finished trials into `study` (stored in `storage`), one transaction each.

    Not thread-safe by itself; use one writer per thread (several writers, in any threads or
    processes, may write to the same study: numbers stay unique and contiguous).
    """

    def __init__(self, storage: RDBStorage, study: optuna.Study) -> None:
        storage = _unwrap(storage)
        problem = _schema_problem(storage)
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
        # psycopg 3 on PostgreSQL: child tables by COPY (see _copy_rows)
        self._copy = self._engine.dialect.name == "postgresql" and self._engine.dialect.driver == "psycopg"
        # Distributions of the study's params, as Optuna checks compatibility against them.
        self._known_distributions: dict[str, optuna_distributions.BaseDistribution] = {}

        self._trials = models.TrialModel.__table__
        self._studies = models.StudyModel.__table__
        self._params = models.TrialParamModel.__table__
        self._values = models.TrialValueModel.__table__
        self._user_attrs = models.TrialUserAttributeModel.__table__
        self._system_attrs = models.TrialSystemAttributeModel.__table__
        self._intermediate = models.TrialIntermediateValueModel.__table__
        # The ORM attributes behind the datetime columns (`_datetime_start_utc` in Optuna 5.0).
        mapper = sa.inspect(models.TrialModel)
        self._dt_attrs = {
            name: mapper.get_property_by_column(self._trials.c[name]).key
            for name in ("datetime_start", "datetime_complete")
        }

    # -- preparation (outside the transaction) -------------------------------------------------

    def _stored_datetimes(self, trial: FrozenTrial) -> dict[str, Any]:
        """datetime_start/complete as Optuna's model stores them, via the model's own setters."""
        model = models.TrialModel(datetime_start=trial.datetime_start,
                                  datetime_complete=trial.datetime_complete)
        return {name: getattr(model, attr) for name, attr in self._dt_attrs.items()}

    def _prepare(self, trial: FrozenTrial) -> _PreparedTrial:
        trial._validate()
        if not trial.state.is_finished():
            raise ValueError(f"RDBBulkWriter writes finished trials only, got one in state {trial.state.name}")
        if trial.values is not None and len(trial.values) != self._n_objectives:
            raise ValueError(
                f"The added trial has {len(trial.values)} values, which is different from the "
                f"number of objectives {self._n_objectives} in the study."
            )
        out = _PreparedTrial()
        out.row = {"study_id": self._study_id, "state": trial.state, **self._stored_datetimes(trial)}
        for objective, value in enumerate(trial.values or ()):
            stored, value_type = models.TrialValueModel.value_to_stored_repr(value)
            out.values.append({"objective": objective, "value": stored, "value_type": value_type})
        for name, value in trial.params.items():
            distribution = trial.distributions[name]
            out.distributions[name] = distribution
            out.params.append({
                "param_name": name,
                "param_value": distribution.to_internal_repr(value),
                "distribution_json": optuna_distributions.distribution_to_json(distribution),
            })
        out.user_attrs = [{"key": key, "value_json": json.dumps(value)} for key, value in trial.user_attrs.items()]
        out.system_attrs = [{"key": key, "value_json": json.dumps(value)}
                            for key, value in trial.system_attrs.items()]
        for step, value in trial.intermediate_values.items():
            stored, value_type = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)
            out.intermediate.append({"step": step, "intermediate_value": stored,
                                     "intermediate_value_type": value_type})
        return out

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
        unknown = {name for p in prepared for name in p.distributions} - self._known_distributions.keys()
        for name in sorted(unknown):  # each param name is looked up once per writer
            row = conn.execute(
                sa.select(self._params.c.distribution_json)
                .join(self._trials, self._trials.c.trial_id == self._params.c.trial_id)
                .where(self._trials.c.study_id == self._study_id, self._params.c.param_name == name)
                .limit(1)
            ).first()
            if row is not None:
                self._known_distributions[name] = optuna_distributions.json_to_distribution(row[0])
        known = dict(self._known_distributions)
        for p in prepared:
            for name, distribution in p.distributions.items():
                previous = known.setdefault(name, distribution)
                if previous is not distribution:
                    optuna_distributions.check_distribution_compatibility(previous, distribution)

    def _insert_many(self, conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if self._copy:
            return self._copy_rows(conn, table, rows)
        statement = sa.insert(table)
        if self._returning_many:
            # With RETURNING, SQLAlchemy's "insertmanyvalues" sends the executemany as multi-row
            # INSERTs (up to 1000 rows each) from a cached compiled statement.
            statement = statement.returning(*table.primary_key.columns)
        conn.execute(statement, rows)

    def _copy_rows(self, conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
        """PostgreSQL: child rows by COPY, one fixed statement per table.

        Multi-row INSERTs have a different text for every batch size, so psycopg re-parses each
        one; that cost ~1 ms of the driver's CPU per trial, on cores the fitness workers need.
        Enum columns hold the member's name, as SQLAlchemy's Enum type stores it."""
        columns = list(rows[0])
        cursor = conn.connection.driver_connection.cursor()
        names = ", ".join(f'"{c}"' for c in columns)
        target = f'"{table.schema}"."{table.name}"' if table.schema else f'"{table.name}"'
        with cursor, cursor.copy(f"COPY {target} ({names}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row([v.name if isinstance(v, enum.Enum) else v for v in (row[c] for c in columns)])

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

    def write(self, trials: Sequence[FrozenTrial]) -> None:
        """Add `trials` (finished: COMPLETE, PRUNED or FAIL) to the study, numbered in order after
        its existing trials, in one transaction: either all of them are written or none."""
        if not trials:
            return
        prepared = [self._prepare(trial) for trial in trials]
        with self._engine.begin() as conn:
            self._lock_study(conn)
            self._check_distributions(conn, prepared)
            first_number = conn.execute(
                sa.select(sa.func.count(self._trials.c.trial_id))
                .where(self._trials.c.study_id == self._study_id)
            ).scalar_one()
            rows = [dict(p.row, number=first_number + i) for i, p in enumerate(prepared)]
            trial_ids = self._insert_trials(conn, rows, first_number)
            children: dict[sa.Table, list[dict[str, Any]]] = {
                self._values: [], self._params: [], self._user_attrs: [], self._system_attrs: [],
                self._intermediate: [],
            }
            for trial_id, p in zip(trial_ids, prepared):
                for table, entries in ((self._values, p.values), (self._params, p.params),
                                       (self._user_attrs, p.user_attrs), (self._system_attrs, p.system_attrs),
                                       (self._intermediate, p.intermediate)):
                    children[table].extend(dict(entry, trial_id=trial_id) for entry in entries)
            for table, entries in children.items():
                self._insert_many(conn, table, entries)
        for p in prepared:  # committed: these are now the study's distributions too
            for name, distribution in p.distributions.items():
                self._known_distributions.setdefault(name, distribution)
