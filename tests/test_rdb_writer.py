"""RDBBulkWriter: batches of finished trials in one transaction, read back exactly as
`study.add_trials` would have written them.

Runs on SQLite (a temporary file) always and on PostgreSQL when EVOMERGE_TEST_POSTGRES_URL is set
(`.ci/run --postgres-only` sets one up); without it the PostgreSQL cases skip, except under CI=true,
where they fail, as in tests/test_postgres.py.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import random
import threading
import time
import uuid

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution, distribution_to_json
from optuna.storages import RDBStorage
from optuna.trial import TrialState, create_trial

from evomerge.engine.population import EvalRecord
from evomerge.tracking import copy_text, rdb_schema, rdb_writer
from evomerge.tracking.rdb_writer import RDBBulkWriter, bulk_writer_for, supports_bulk
from evomerge.tracking.recorder import record_to_trial

URL_ENV = "EVOMERGE_TEST_POSTGRES_URL"
N_TRIALS = 200

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _postgres_url() -> str:
    url = os.environ.get(URL_ENV)
    if not url:
        message = (f"{URL_ENV} is not set; give a PostgreSQL URL, e.g. "
                   "postgresql://evomerge:evomerge@127.0.0.1:5432/evomerge "
                   "(`.ci/run --postgres-only` sets one up)")
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {message}")
        pytest.skip(message)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """(url, new_study_name): a database, and unique study names that are deleted afterwards."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}" if request.param == "sqlite" else _postgres_url()
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
            generation=number // 20, seconds=rng.random(), started=1_700_000_000.125 + 2 * number,
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
    return trials[:12] + _awkward_trials() + trials[12:]  # where the tests write in bulk


# Everything PostgreSQL's COPY text format treats specially: tab, newline, CR, backslash, "\N".
AWKWARD = 'tab\there, newline\nthere, cr\r, back\\slash, \\N, quote" , é ☃'


def _awkward_trials() -> list[optuna.trial.FrozenTrial]:
    """Trials whose rows are hard to write as text: escapes, unicode, NULL look-alikes, empty
    strings, extreme floats, big ints, datetimes to the microsecond and in another time zone."""
    dists = {AWKWARD: CategoricalDistribution(["a", AWKWARD, "\\N", None, 2.5]),
             "\\N": FloatDistribution(0.0, 1.0), "": IntDistribution(-5, 5, step=2),
             "log": FloatDistribution(1e-300, 1e300, log=True)}
    first = create_trial(
        value=5e-324, params={AWKWARD: AWKWARD, "\\N": 1e-300, "": -3, "log": 1.0000000000000002},
        distributions=dists,
        user_attrs={AWKWARD: AWKWARD, "\\N": None, "": "", "list": [1, "x\\y", None, 2.5], "ints": [-1, 2**40],
                    "bools": [True, False, 1], "big": 2**70, "float": -0.0, "tiny": 5e-324, "nested": {"\t": [[]]}},
        system_attrs={"\\": {"k\n": "v\t"}, "n": None},
        intermediate_values={-3: 5e-324, 7: -1e308, 2**31 - 1: 0.1},
    )
    first.datetime_start = datetime.datetime(2023, 3, 26, 1, 59, 59, 999999)
    first.datetime_complete = datetime.datetime(2023, 3, 26, 3, 0, 0, 1)
    second = create_trial(value=-1e308, params={AWKWARD: None, "": 5},
                          distributions={AWKWARD: dists[AWKWARD], "": dists[""]},
                          user_attrs={"when": "aware datetimes"})
    tz = datetime.timezone(datetime.timedelta(hours=5, minutes=30))
    second.datetime_start = datetime.datetime(2024, 2, 29, 23, 59, 59, 5, tzinfo=tz)
    second.datetime_complete = datetime.datetime(2024, 3, 1, 0, 0, 0, 0, tzinfo=datetime.timezone.utc)
    return [first, second]


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
    if datetimes_from is not None:  # datetimes as given, to the microsecond (Optuna reads back local time)
        for g, original in zip(got, datetimes_from):
            assert (g.datetime_start, g.datetime_complete) == (_local(original.datetime_start),
                                                               _local(original.datetime_complete))


def _local(value: datetime.datetime | None) -> datetime.datetime | None:
    return value.astimezone().replace(tzinfo=None) if value is not None and value.tzinfo else value


def _stored_rows(url: str, study_name: str) -> dict[str, list[tuple]]:
    """The study's rows in every trial table as stored (raw JSON text, raw datetimes, enum names),
    keyed by trial number instead of surrogate ids, in insertion order."""
    import sqlalchemy as sa
    from optuna.storages._rdb import models

    trials = models.TrialModel.__table__
    study_id = sa.select(models.StudyModel.study_id).where(models.StudyModel.study_name == study_name)
    out = {}
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        out["trials"] = [tuple(r) for r in conn.execute(
            sa.select(trials.c.number, trials.c.state, trials.c.datetime_start, trials.c.datetime_complete)
            .where(trials.c.study_id == study_id.scalar_subquery()).order_by(trials.c.number))]
        for model in (models.TrialValueModel, models.TrialParamModel, models.TrialUserAttributeModel,
                      models.TrialSystemAttributeModel, models.TrialIntermediateValueModel):
            table = model.__table__
            columns = [c for c in table.columns if c.name != "trial_id" and not c.primary_key]
            out[table.name] = [tuple(r) for r in conn.execute(
                sa.select(trials.c.number, *columns).join(trials, trials.c.trial_id == table.c.trial_id)
                .where(trials.c.study_id == study_id.scalar_subquery())
                .order_by(trials.c.number, *table.primary_key.columns))]
    engine.dispose()
    return out


def _bulk_in_batches(storage, study, trials, *, fast: bool = True) -> float:
    """The first 10 by Optuna, then bulk in uneven batches, then 5 more by Optuna again; the
    bulk rate in trials/s."""
    study.add_trials(trials[:10])
    writer = RDBBulkWriter(storage, study)
    if not fast:
        writer._copy = False  # PostgreSQL: the SQLAlchemy Core path other drivers get
    bulk = trials[10:-5]
    start = time.perf_counter()
    offset = 0
    for size in [1, 7, 50, 50, 33] + [len(bulk)]:
        batch = bulk[offset:offset + size]
        writer.write(batch)
        offset += len(batch)
        # numbers continue across batches, seen through the writer's own (cached) study object
        assert [t.number for t in study.get_trials(deepcopy=False)] == list(range(10 + offset))
    rate = len(bulk) / (time.perf_counter() - start)
    assert offset == len(bulk)
    study.add_trials(trials[-5:])  # Optuna numbers on after bulk-written trials
    return rate


def test_bulk_writes_what_add_trials_writes(db):
    url, new_name = db
    trials = _trials()
    storage = _storage(url)
    assert supports_bulk(storage)
    postgres = url.startswith("postgresql")
    # PostgreSQL through psycopg 3 (what a bare postgresql:// URL gets) writes by COPY
    assert RDBBulkWriter(storage, optuna.create_study(storage=storage, study_name=new_name("probe")))._copy == postgres

    # (a) Optuna's way
    study_a = optuna.create_study(storage=storage, study_name=new_name("add-trials"), direction="maximize")
    start = time.perf_counter()
    study_a.add_trials(trials)
    add_rate = len(trials) / (time.perf_counter() - start)

    # (b) bulk, by COPY on PostgreSQL; (c) on PostgreSQL also the SQLAlchemy Core path
    studies = {"bulk": optuna.create_study(storage=storage, study_name=new_name("bulk"), direction="maximize")}
    if postgres:
        studies["core"] = optuna.create_study(storage=storage, study_name=new_name("core"), direction="maximize")
    for label, study in studies.items():
        bulk_rate = _bulk_in_batches(storage, study, trials, fast=label == "bulk")
        print(f"\n{url.split(':')[0]} ({label}): add_trials {add_rate:.0f} trials/s, "
              f"RDBBulkWriter {bulk_rate:.0f} trials/s ({bulk_rate / add_rate:.0f}x)")

    # read back through fresh storages: nothing in this process's caches
    fresh = _storage(url)
    got_a = optuna.load_study(study_name=study_a.study_name, storage=fresh).get_trials()
    _assert_same_trials(got_a, trials, datetimes_from=trials, numbers=False)  # create_trial: number -1
    stored_a = _stored_rows(url, study_a.study_name)
    assert len(stored_a["trial_user_attributes"]) > len(trials)  # (the comparison below compares something)
    for study in studies.values():
        got_b = optuna.load_study(study_name=study.study_name, storage=fresh).get_trials()
        assert [t.number for t in got_b] == list(range(len(trials)))
        _assert_same_trials(got_b, got_a, datetimes_from=trials)
        # ... and through the study object used for writing (Optuna's in-process cache)
        _assert_same_trials(study.get_trials(), got_a, datetimes_from=trials)
        assert study.best_trial.number == study_a.best_trial.number == 7  # the inf value
        assert sum(t.state == TrialState.FAIL for t in got_b) == sum(t.state == TrialState.FAIL for t in trials) > 0
        # the stored rows themselves: JSON texts, datetimes, enum names, floats to the bit
        assert _stored_rows(url, study.study_name) == stored_a
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
    # compatible (another range) and incompatible (log) int distributions of x: the writer
    # remembers the compatible one, which must not make it wave the other through
    wider = create_trial(value=3.0, params={"x": 7}, distributions={"x": IntDistribution(0, 9)})
    log = create_trial(value=3.0, params={"x": 7}, distributions={"x": IntDistribution(1, 9, log=True)})
    with pytest.raises(ValueError, match="log"):
        writer.write([wider, log])
    with pytest.raises(ValueError, match="log"):
        writer.write([log])
    if writer._copy:  # PostgreSQL text cannot hold NUL; add_trials fails on it too
        with pytest.raises(ValueError, match="NUL"):
            writer.write([ok, create_trial(value=1.0, user_attrs={"k\x00": 1})])
    assert [t.number for t in optuna.load_study(study_name=study.study_name, storage=_storage(url)).get_trials()] == [0]
    writer.write([])
    writer.write([ok])
    assert len(study.get_trials()) == 2


def _numbers_by_trial_id(url: str, name: str) -> list[int]:
    trials = optuna.load_study(study_name=name, storage=_storage(url)).get_trials(deepcopy=False)
    return [t.number for t in sorted(trials, key=lambda t: t._trial_id)]


def test_count_carries_on_past_other_writers(db, monkeypatch):
    """After its first batch a writer adds the study's newer trials to its own count, looking at
    no more than _NEWER_SCAN of the table's newest trials; past that it counts the whole study.
    Numbers must follow Optuna's rule throughout: number = the study's trials before it."""
    monkeypatch.setattr(rdb_writer, "_NEWER_SCAN", 4)
    url, new_name = db
    storage = _storage(url)
    name, other = new_name("carry"), new_name("other")
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    writer = RDBBulkWriter(storage, study)
    other_writer = RDBBulkWriter(storage, optuna.create_study(storage=storage, study_name=other))
    plain = optuna.load_study(study_name=name, storage=_storage(url))  # Optuna's own add_trial

    def trials(n: int) -> list[optuna.trial.FrozenTrial]:
        return [create_trial(value=float(i)) for i in range(n)]

    writer.write(trials(3))
    plain.add_trials(trials(2))        # 2 newer trials, all of this study: within the scan
    writer.write(trials(3))
    other_writer.write(trials(10))     # 10 newer trials of another study: past the scan
    plain.add_trials(trials(1))
    writer.write(trials(3))
    other_writer.write(trials(2))
    plain.add_trials(trials(1))        # 3 newer, 1 of them this study's: within the scan
    writer.write(trials(3))
    plain.add_trials(trials(3))
    other_writer.write(trials(1))      # 4 newer, 3 of them this study's: the scan is full
    writer.write(trials(3))
    writer.write(trials(2))            # none newer
    assert writer._counted is not None and writer._counted[0] == 3 + 2 + 3 + 1 + 3 + 1 + 3 + 3 + 3 + 2
    assert _numbers_by_trial_id(url, name) == list(range(24))
    assert _numbers_by_trial_id(url, other) == list(range(13))


def test_failed_batch_leaves_the_count_alone(db, monkeypatch):
    """A batch that fails inside the transaction (here after its trial rows went in) leaves
    nothing behind, and the writer's next batch takes the numbers the failed one would have."""
    url, new_name = db
    storage = _storage(url)
    study = optuna.create_study(storage=storage, study_name=new_name("rollback"), direction="maximize")
    writer = RDBBulkWriter(storage, study)
    trials = _trials(20)
    writer.write(trials[:5])

    def boom(*args, **kwargs):
        raise RuntimeError("connection lost")

    if writer._copy:
        copy_lines = writer._copy_lines
        monkeypatch.setattr(writer, "_copy_lines", lambda cursor, table, lines: (
            copy_lines(cursor, table, lines) if table is writer._trials else boom()))
    else:
        monkeypatch.setattr(writer, "_insert_many", boom)
    with pytest.raises(RuntimeError, match="connection lost"):
        writer.write(trials[5:10])
    monkeypatch.undo()
    assert _numbers_by_trial_id(url, study.study_name) == list(range(5))
    writer.write(trials[5:10])
    writer.write(trials[10:])
    got = optuna.load_study(study_name=study.study_name, storage=_storage(url)).get_trials()
    assert [t.number for t in got] == list(range(len(trials)))
    _assert_same_trials(got, trials, numbers=False)


def test_postgres_ids_a_session_may_cache_are_not_trusted():
    """A trials sequence with CACHE > 1 hands each session its own run of ids, so a trial_id
    drawn later may be smaller: no COPY path (which draws ids itself), no carried-on count."""
    import sqlalchemy as sa

    url = _postgres_url()
    schema = f"evomerge_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(url)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    try:
        scoped = f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"  # Optuna's tables in it
        storage = _storage(scoped)
        study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
        writer = RDBBulkWriter(storage, study)
        assert writer._copy and writer._incremental_count and writer._sequence == "trials_trial_id_seq"
        trials = _trials(30)
        writer.write(trials[:20])
        with admin.begin() as conn:
            conn.execute(sa.text(f"ALTER SEQUENCE {schema}.trials_trial_id_seq CACHE 10"))
        cautious = RDBBulkWriter(storage, study)
        assert not cautious._copy and not cautious._incremental_count
        cautious.write(trials[20:25])
        cautious.write(trials[25:])
        got = optuna.load_study(study_name="s", storage=_storage(scoped)).get_trials()
        assert [t.number for t in got] == list(range(len(trials)))
        _assert_same_trials(got, trials, datetimes_from=trials, numbers=False)
        storage.engine.dispose()
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.mark.parametrize("value", [
    0, -7, 2**70, True, None, 1.5, -0.0, 5e-324, 1e300, 0.1 + 0.2, float("nan"), float("inf"), float("-inf"),
    "", "x", AWKWARD, [], [1, -2, 2**70], [1, 2.5], [True, 1], [1, None], [[1]], (1, 2), {"a": [1, None], "b": "\\"},
])
def test_attribute_json_is_json_dumps(value):
    """The JSON written for attributes is byte for byte what Optuna writes (json.dumps), and as a
    COPY field it only has its backslashes doubled (the text format's one escape JSON can hold)."""
    assert copy_text.json_text(value) == json.dumps(value)
    assert copy_text.copy_json_text(value) == json.dumps(value).replace("\\", "\\\\")


def test_distribution_json_cache_keeps_lookalikes_apart(tmp_path):
    """Distributions that are equal as dict keys (1 == 1.0 == True) but serialise differently."""
    storage = _storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    writer = RDBBulkWriter(storage, optuna.create_study(storage=storage, study_name="s"))
    distributions = [FloatDistribution(0.0, 1.0), FloatDistribution(0.0, 1.0, log=0), FloatDistribution(0, 1, step=1),
                     IntDistribution(0, 1), IntDistribution(0, 1, log=0), IntDistribution(0, 2, step=2),
                     CategoricalDistribution([1, 2]), CategoricalDistribution([1.0, 2.0]),
                     CategoricalDistribution([True, 2])]
    for distribution in distributions * 2:  # the second time from the cache
        assert writer._distribution(distribution)[0] == distribution_to_json(distribution)
    assert len({writer._distribution(d)[0] for d in distributions}) == len(distributions)


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

    monkeypatch.setattr(rdb_schema, "TESTED_ALEMBIC_REVISIONS", frozenset({"v9.9.9.z"}))
    assert not supports_bulk(storage)  # an Optuna with a newer schema
    with pytest.raises(ValueError, match="schema head"):
        RDBBulkWriter(storage, study)
    monkeypatch.undo()

    expected = dict(rdb_schema._EXPECTED_COLUMNS)
    expected[rdb_schema.models.TrialModel] = expected[rdb_schema.models.TrialModel] | {"new_column"}
    monkeypatch.setattr(rdb_schema, "_EXPECTED_COLUMNS", expected)
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


def test_records_written_straight_equal_the_frozen_trial_path(db):
    """`write_records` (COPY straight from the records on PostgreSQL, FrozenTrials elsewhere)
    stores the rows `write([record_to_trial(r) ...])` stores, datetimes included."""
    url, new_name = db
    records = _records(60)
    storage = _storage(url)
    via_trials = optuna.create_study(storage=storage, study_name=new_name("via-trials"), direction="maximize")
    RDBBulkWriter(storage, via_trials).write([record_to_trial(r) for r in records])
    straight = optuna.create_study(storage=storage, study_name=new_name("straight"), direction="maximize")
    writer = RDBBulkWriter(storage, straight)
    for start, stop in ((0, 1), (1, 25), (25, 60)):
        writer.write_records(records[start:stop])
    a, b = _stored_rows(url, via_trials.study_name), _stored_rows(url, straight.study_name)
    assert [row[:2] for row in b.pop("trials")] == [row[:2] for row in a.pop("trials")]  # number, state
    assert len(b["trial_user_attributes"]) > len(records) and len(b["trial_intermediate_values"]) > 0
    assert b == a
    fresh = _storage(url)
    got = optuna.load_study(study_name=straight.study_name, storage=fresh).get_trials()
    _assert_same_trials(got, optuna.load_study(study_name=via_trials.study_name, storage=fresh).get_trials())
    # each trial's own start and end, to the microsecond: the dashboard's duration is the evaluation's
    expected = [(datetime.datetime.fromtimestamp(r.started), datetime.datetime.fromtimestamp(r.started + r.seconds))
                for r in records]
    assert [(t.datetime_start, t.datetime_complete) for t in got] == expected
    fresh.engine.dispose()
    storage.engine.dispose()
