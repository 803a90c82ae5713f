"""Whether the RDB bulk writer may write into a storage: Optuna's schema as it was tested.

`supports_bulk(storage)` is deliberately conservative: an RDBStorage on SQLite or PostgreSQL at
their default isolation level (SERIALIZABLE / READ COMMITTED; not AUTOCOMMIT, not REPEATABLE
READ, under which a writer that waited for the lock would count a stale snapshot), whose
installed Optuna's alembic head is one this module was tested against and whose database is at
that head, and whose ORM models have exactly the tables and columns `rdb_writer` writes. Anything else
should use `study.add_trials`.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.storages._rdb import models

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



def unwrap_storage(storage: Any) -> Any:
    """The RDBStorage behind Optuna's `_CachedStorage` wrapper (what `Study._storage` holds)."""
    if isinstance(storage, optuna.storages._CachedStorage):
        return storage._backend
    return storage


def schema_problem(storage: Any) -> str | None:
    """Why the bulk writer must not be used with `storage`, or None if it may."""
    storage = unwrap_storage(storage)
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
        return schema_problem(storage) is None
    except Exception:  # noqa: BLE001 - any doubt means "no"
        return False
