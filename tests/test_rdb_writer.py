"""RDBBulkWriter: batches of finished trials in one transaction, read back exactly as
`study.add_trials` would have written them.

Runs on SQLite (a temporary file) always and on PostgreSQL when EVOMERGE_TEST_POSTGRES_URL is set
(`.ci/run --postgres-only` sets one up); without it the PostgreSQL cases skip, except under CI=true,
where they fail, as in tests/test_postgres.py.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
import uuid

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.storages import RDBStorage
from optuna.trial import TrialState, create_trial

from evomerge.engine.population import EvalRecord
from evomerge.tracking import rdb_writer
from evomerge.tracking.rdb_writer import RDBBulkWriter, bulk_writer_for, supports_bulk
from evomerge.tracking.recorder import record_to_trial

URL_ENV = "EVOMERGE_TEST_POSTGRES_URL"
N_TRIALS = 200

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """(url, new_study_name): a database, and unique study names that are deleted afterwards."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'optuna.db'}"
    else:
        url = os.environ.get(URL_ENV)
        if not url:
            message = (f"{URL_ENV} is not set; give a PostgreSQL URL, e.g. "
                       "postgresql://evomerge:evomerge@127.0.0.1:5432/evomerge "
                       "(`.ci/run --postgres-only` sets one up)")
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI=true but {message}")
            pytest.skip(message)
    names: list[str] = []

    def new_study_name(prefix: str) -> str:
        names.append(f"{prefix}-{uuid.uuid4().hex[:12]}")
        return names[-1]

    yield url, new_study_name
    if request.param == "sqlite" or not names:
        return
    _delete_studies(url, names)


def _delete_studies(url: str, names: list[str]) -> None:
    """Delete the studies: one statement per table (optuna.delete_study goes row by row through the
    ORM, seconds for a few hundred trials); optuna.delete_study if that fails (say, a new table)."""
    import sqlalchemy as sa
    from optuna.storages._rdb import models

    storage = RDBStorage(url)
    studies = sa.select(models.StudyModel.study_id).where(models.StudyModel.study_name.in_(names))
    trials = sa.select(models.TrialModel.trial_id).where(models.TrialModel.study_id.in_(studies))
    try:
        with storage.engine.begin() as conn:
            for model in (models.TrialParamModel, models.TrialValueModel, models.TrialUserAttributeModel,
                          models.TrialSystemAttributeModel, models.TrialIntermediateValueModel,
                          models.TrialHeartbeatModel):
                conn.execute(sa.delete(model.__table__).where(model.__table__.c.trial_id.in_(trials)))
            conn.execute(sa.delete(models.TrialModel.__table__).where(models.TrialModel.study_id.in_(studies)))
            for model in (models.StudyDirectionModel, models.StudyUserAttributeModel,
                          models.StudySystemAttributeModel):
                conn.execute(sa.delete(model.__table__).where(model.__table__.c.study_id.in_(studies)))
            conn.execute(sa.delete(models.StudyModel.__table__).where(models.StudyModel.study_name.in_(names)))
    except sa.exc.SQLAlchemyError:
        for name in names:
            try:
                optuna.delete_study(study_name=name, storage=storage)
            except KeyError:  # the test failed before creating it
                pass
    with storage.engine.connect() as conn:
        assert conn.execute(studies).first() is None
    storage.engine.dispose()


def _storage(url: str) -> RDBStorage:
    if url.startswith("sqlite"):
        return RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 30}})
    return RDBStorage(url)


def _records(n: int, seed: int = 0) -> list[EvalRecord]:
    """EvalRecords like a search produces: int and float params, failures, None test scores,
    training curves (intermediate values)."""
    rng = random.Random(seed)
    records = []
    for number in range(n):
        failed = number % 13 == 5
        params: dict[str, float | int] = {"t": rng.random(), "layers": rng.randint(0, 31),
                                          "scale": rng.uniform(-2.0, 3.0)}
        if number % 3 == 0:
            params["density"] = rng.random()
        score = None if failed else rng.random()
        if number == 7:
            score = float("inf")
        if number == 8:
            score = float("-inf")
        records.append(EvalRecord(
            number=number, member_id=number, train_score=score,
            test_score=None if failed or number % 4 == 0 else rng.random(),
            params=params, parents=[] if number < 4 else [rng.randrange(number), rng.randrange(number)],
            generation=number // 20, seconds=rng.random(),
            error=f"RuntimeError: boom {number}\nTraceback ..." if failed else None,
            # a training curve on some trials, as DAM records one
            intermediate={step: rng.random() for step in range(0, 50, 10)} if number % 10 == 2 and not failed else None,
        ))
    return records


def _trials(n: int = N_TRIALS) -> list[optuna.trial.FrozenTrial]:
    trials = [record_to_trial(record) for record in _records(n)]
    # columns record_to_trial leaves empty: system attrs and intermediate values (incl. nan/inf)
    for i in (i for i in (3, 50, 120) if i < n):
        trials[i] = create_trial(
            value=0.25 * i, params={"t": 0.5, "layers": 3}, user_attrs={"nested": {"a": [1, None, "x"]}},
            distributions={"t": FloatDistribution(0.0, 1.0), "layers": IntDistribution(0, 3)},
            system_attrs={"fixed_params": {"t": 0.5}, "note": None},
            intermediate_values={0: 0.1, 1: float("nan"), 2: float("inf"), 5: float("-inf")},
        )
    trials.append(create_trial(state=TrialState.PRUNED, intermediate_values={0: 1.0}))
    return trials


def _key(value):
    """Make nan compare equal to nan."""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, dict):
        return {k: _key(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_key(v) for v in value]
    return value


def _assert_same_trials(got, expected, *, datetimes_from=None, numbers=True):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        if numbers:
            assert g.number == e.number
        assert g.state == e.state, g.number
        assert _key(g.values) == _key(e.values), g.number
        assert list(g.params.items()) == list(e.params.items()), g.number  # order too
        assert g.distributions == e.distributions, g.number
        assert _key(g.user_attrs) == _key(e.user_attrs), g.number
        assert _key(g.system_attrs) == _key(e.system_attrs), g.number
        assert _key(g.intermediate_values) == _key(e.intermediate_values), g.number
    if datetimes_from is not None:  # datetimes as given, to the microsecond
        for g, original in zip(got, datetimes_from):
            assert (g.datetime_start, g.datetime_complete) == (original.datetime_start, original.datetime_complete)


def test_bulk_writes_what_add_trials_writes(db):
    url, new_name = db
    trials = _trials()
    storage = _storage(url)
    assert supports_bulk(storage)

    # (a) Optuna's way
    study_a = optuna.create_study(storage=storage, study_name=new_name("add-trials"), direction="maximize")
    start = time.perf_counter()
    study_a.add_trials(trials)
    add_rate = len(trials) / (time.perf_counter() - start)

    # (b) the first 10 by Optuna, then bulk in uneven batches, then 5 more by Optuna again
    name_b = new_name("bulk")
    study_b = optuna.create_study(storage=storage, study_name=name_b, direction="maximize")
    study_b.add_trials(trials[:10])
    writer = RDBBulkWriter(storage, study_b)
    bulk = trials[10:-5]
    start = time.perf_counter()
    offset = 0
    for size in [1, 7, 50, 50, 33] + [len(bulk)]:
        batch = bulk[offset:offset + size]
        writer.write(batch)
        offset += len(batch)
        # numbers continue across batches, seen through the writer's own (cached) study object
        assert [t.number for t in study_b.get_trials(deepcopy=False)] == list(range(10 + offset))
    bulk_rate = len(bulk) / (time.perf_counter() - start)
    assert offset == len(bulk)
    study_b.add_trials(trials[-5:])  # Optuna numbers on after bulk-written trials
    print(f"\n{url.split(':')[0]}: add_trials {add_rate:.0f} trials/s, "
          f"RDBBulkWriter {bulk_rate:.0f} trials/s ({bulk_rate / add_rate:.0f}x)")

    # read back through fresh storages: nothing in this process's caches
    fresh = _storage(url)
    got_a = optuna.load_study(study_name=study_a.study_name, storage=fresh).get_trials()
    got_b = optuna.load_study(study_name=name_b, storage=fresh).get_trials()
    assert [t.number for t in got_b] == list(range(len(trials)))
    _assert_same_trials(got_b, got_a, datetimes_from=trials)
    _assert_same_trials(got_a, trials, datetimes_from=trials, numbers=False)  # create_trial: number -1
    # ... and through the study object used for writing (Optuna's in-process cache)
    _assert_same_trials(study_b.get_trials(), got_a, datetimes_from=trials)
    assert study_b.best_trial.number == study_a.best_trial.number == 7  # the inf value
    assert sum(t.state == TrialState.FAIL for t in got_b) == sum(t.state == TrialState.FAIL for t in trials) > 0
    fresh.engine.dispose()
    storage.engine.dispose()


def test_concurrent_writers_number_uniquely(db):
    """Two bulk writers (own storages, two threads) and plain Optuna add_trial on one study."""
    url, new_name = db
    name = new_name("concurrent")
    optuna.create_study(storage=_storage(url), study_name=name, direction="maximize")
    errors: list[BaseException] = []
    batches, batch_size, singles = 8, 20, 6
    start = threading.Barrier(3)

    def bulk(tag: int) -> None:
        try:
            storage = _storage(url)
            writer = RDBBulkWriter(storage, optuna.load_study(study_name=name, storage=storage))
            start.wait()
            for b in range(batches):
                writer.write([create_trial(value=float(i), user_attrs={"writer": tag, "seq": b * batch_size + i})
                              for i in range(batch_size)])
            storage.engine.dispose()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def plain() -> None:
        try:
            study = optuna.load_study(study_name=name, storage=_storage(url))
            start.wait()
            for i in range(singles):
                study.add_trial(create_trial(value=-1.0, user_attrs={"writer": "optuna", "seq": i}))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=bulk, args=(tag,)) for tag in (1, 2)] + [threading.Thread(target=plain)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors

    trials = optuna.load_study(study_name=name, storage=_storage(url)).get_trials()
    assert sorted(t.number for t in trials) == list(range(2 * batches * batch_size + singles))
    for tag in (1, 2, "optuna"):  # each writer's trials in its own order, batches contiguous
        mine = sorted((t for t in trials if t.user_attrs["writer"] == tag), key=lambda t: t.number)
        assert [t.user_attrs["seq"] for t in mine] == list(range(len(mine)))
        if tag != "optuna":
            for b in range(batches):
                numbers = [t.number for t in mine[b * batch_size:(b + 1) * batch_size]]
                assert numbers == list(range(numbers[0], numbers[0] + batch_size))


def test_invalid_batches_write_nothing(db):
    url, new_name = db
    storage = _storage(url)
    study = optuna.create_study(storage=storage, study_name=new_name("invalid"), direction="maximize")
    writer = RDBBulkWriter(storage, study)
    ok = create_trial(value=1.0, params={"x": 1}, distributions={"x": IntDistribution(0, 3)})
    writer.write([ok])
    incompatible = create_trial(value=2.0, params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)})
    with pytest.raises(ValueError):  # as study.add_trial would: x was an int param
        writer.write([ok, incompatible])
    with pytest.raises(ValueError):
        optuna.load_study(study_name=study.study_name, storage=_storage(url)).add_trial(incompatible)
    with pytest.raises(ValueError, match="finished"):
        writer.write([ok, create_trial(state=TrialState.RUNNING)])
    with pytest.raises(ValueError, match="values"):
        writer.write([create_trial(values=[1.0, 2.0])])
    assert [t.number for t in optuna.load_study(study_name=study.study_name, storage=_storage(url)).get_trials()] == [0]
    writer.write([])
    writer.write([ok])
    assert len(study.get_trials()) == 2


def test_supports_bulk_is_conservative(tmp_path, monkeypatch):
    storage = _storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(storage=storage, study_name="s")
    assert supports_bulk(storage)
    assert supports_bulk(study._storage)  # Optuna's cached wrapper of it
    assert isinstance(bulk_writer_for(study), RDBBulkWriter)
    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "j.log")))
    for other in (journal, optuna.storages.InMemoryStorage(), None, "sqlite:///x.db"):
        assert not supports_bulk(other)
    assert bulk_writer_for(optuna.create_study(storage=journal)) is None

    monkeypatch.setattr(rdb_writer, "TESTED_ALEMBIC_REVISIONS", frozenset({"v9.9.9.z"}))
    assert not supports_bulk(storage)  # an Optuna with a newer schema
    with pytest.raises(ValueError, match="schema head"):
        RDBBulkWriter(storage, study)
    monkeypatch.undo()

    expected = dict(rdb_writer._EXPECTED_COLUMNS)
    expected[rdb_writer.models.TrialModel] = expected[rdb_writer.models.TrialModel] | {"new_column"}
    monkeypatch.setattr(rdb_writer, "_EXPECTED_COLUMNS", expected)
    assert not supports_bulk(storage)  # ORM models not matching the columns written
    monkeypatch.undo()

    monkeypatch.setattr(RDBStorage, "get_current_version", lambda self: "v3.0.0.d")
    assert not supports_bulk(storage)  # a database not upgraded to the installed Optuna's schema
    monkeypatch.undo()

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    autocommit = RDBStorage(url, engine_kwargs={"isolation_level": "AUTOCOMMIT"})
    assert not supports_bulk(autocommit)  # a batch would not be one transaction
    assert supports_bulk(RDBStorage(url))


def test_without_returning(tmp_path):
    """The path for a SQLite without RETURNING (< 3.35): new trial_ids found by (study, number)."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = _storage(url)
    trials = _trials(30)
    study = optuna.create_study(storage=storage, study_name="bulk", direction="maximize")
    writer = RDBBulkWriter(storage, study)
    writer._returning_many = False
    study.add_trials(trials[:3])  # some trials before, so trial_ids and numbers differ
    writer.write(trials[3:20])
    writer.write(trials[20:])
    got = optuna.load_study(study_name="bulk", storage=_storage(url)).get_trials()
    assert [t.number for t in got] == list(range(len(trials)))
    _assert_same_trials(got, trials, datetimes_from=trials, numbers=False)


def test_writer_used_from_another_thread(tmp_path):
    """As in TrialRecorder: storage, study and writer made in one thread, writes from another."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=_storage(url), study_name="s", direction="maximize")
    writer = bulk_writer_for(study)
    assert writer is not None
    trials = _trials(40)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for i in range(0, 40, 10):
                writer.write(trials[i:i + 10])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert not errors, errors
    assert [t.number for t in study.get_trials()] == list(range(40))  # the main thread's study object
