"""CPU per recorded trial: the journal file against PostgreSQL (and SQLite), as the search records.

The search is CPU-bound, so what recording costs it is CPU, not wall time (which another job on
the machine makes noisy anyway): this process's CPU (the batch writer the recorder picks, given
the search's records as the recorder gives them) and, for PostgreSQL, the CPU of the server
backends serving this process's connections, read from /proc/<pid>/stat (so the server must run
on this machine). The
"all postgres" column adds the server's background processes (WAL writer, checkpointer,
autovacuum, ...) and whatever other clients make the server do meanwhile, so it is an upper bound.

PostgreSQL runs when EVOMERGE_TEST_POSTGRES_URL (or --postgres) is set; the study goes into a
schema of its own, dropped at the end.

    .venv/bin/python benchmarks/recorder.py [--trials 5000] [--existing 200] [--repeats 3] [--postgres URL]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import optuna
import sqlalchemy as sa
from _common import print_section

from evomerge.engine.population import EvalRecord
from evomerge.report import format_table
from evomerge.tracking.rdb_writer import bulk_writer_for
from evomerge.tracking.recorder import JournalBulkWriter
from evomerge.tracking.storage import open_storage

TICKS = os.sysconf("SC_CLK_TCK")


def search_records(n: int, seed: int = 0) -> list[EvalRecord]:
    """What an M2N2 search records: two parent ids, a mix ratio and a split; 1% failures."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randrange(max(i, 1)), rng.randrange(max(i, 1))
        failed = rng.random() < 0.01
        out.append(EvalRecord(
            number=i, member_id=i, train_score=None if failed else rng.random(),
            test_score=None if failed else rng.random(),
            params={"parent_a": a, "parent_b": b, "mix_ratio": rng.random(),
                    "split_fraction": rng.randrange(1, 64) / 64},
            parents=[a, b], generation=i // 50, seconds=rng.uniform(0.01, 0.05),
            error="RuntimeError: fitness raised\nTraceback ..." if failed else None))
    return out


def batches(records: list[EvalRecord], seed: int = 1) -> list[list[EvalRecord]]:
    """Batches of 10-100, as the recorder thread drains its queue."""
    rng, out, i = random.Random(seed), [], 0
    while i < len(records):
        size = rng.randint(10, 100)
        out.append(records[i:i + size])
        i += size
    return out


def proc_cpu(pids: list[int]) -> float:
    """CPU seconds of the processes (utime + stime) and of the children they have reaped
    (cutime + cstime: the postmaster's short-lived autovacuum workers)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # gone meanwhile
            continue
        total += sum(int(f) for f in fields[11:15])
    return total / TICKS


def postgres_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and (p / "comm").exists() and (p / "comm").read_text().strip() == "postgres"]


def measure(study: optuna.Study, records: list[EvalRecord], backends: Callable[[], list[int]] | None,
            warm: int) -> dict[str, Any]:
    """Write `records` in batches as the recorder does, the first `warm` untimed (connections,
    caches, distribution look-ups; or a study that already has many trials); CPU ms per trial."""
    writer: Any = bulk_writer_for(study) or JournalBulkWriter(study)
    warm_records, timed = records[:warm], records[warm:]
    for batch in batches(warm_records):
        writer.write_records(batch)
    pids = backends() if backends else []
    if backends and not all(Path(f"/proc/{pid}").exists() for pid in pids):
        raise RuntimeError("the PostgreSQL server does not run on this machine, so its CPU cannot be read")
    everything = postgres_pids() if backends else []
    server0, all0, driver0 = proc_cpu(pids), proc_cpu(everything), time.process_time()
    for batch in batches(timed):
        writer.write_records(batch)
    driver = time.process_time() - driver0
    server, all_pg = proc_cpu(pids) - server0, proc_cpu(everything) - all0
    if backends and set(backends()) != set(pids):
        raise RuntimeError("the writer opened another connection while measuring; its CPU was missed")
    assert len(study.get_trials(deepcopy=False)) == len(records)
    n = len(timed)
    return {"writer": type(writer).__name__, "driver": 1e3 * driver / n, "server": 1e3 * server / n,
            "all_pg": 1e3 * all_pg / n if backends else None}


def run_journal(folder: Path, records: list[EvalRecord], warm: int) -> dict[str, Any]:
    path = folder / f"{uuid.uuid4().hex}.journal"
    study = optuna.create_study(storage=open_storage(str(path)), study_name="bench", direction="maximize")
    return measure(study, records, None, warm)


def run_sqlite(folder: Path, records: list[EvalRecord], warm: int) -> dict[str, Any]:
    url = f"sqlite:///{folder / uuid.uuid4().hex}.db"
    study = optuna.create_study(storage=open_storage(url), study_name="bench", direction="maximize")
    return measure(study, records, None, warm)


def run_postgres(url: str, records: list[EvalRecord], warm: int) -> dict[str, Any]:
    tag, schema = f"bench-{uuid.uuid4().hex[:8]}", f"bench_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(url)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in url else "?"
    options = quote(f"-c search_path={schema}")
    try:
        storage = open_storage(f"{url}{sep}application_name={tag}&options={options}")
        study = optuna.create_study(storage=storage, study_name="bench", direction="maximize")

        def backends() -> list[int]:
            with admin.connect() as conn:
                return [pid for (pid,) in conn.execute(
                    sa.text("SELECT pid FROM pg_stat_activity WHERE application_name = :t"), {"t": tag})]

        result = measure(study, records, backends, warm)
        storage.engine.dispose()
        return result
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3, help="runs per storage; the least CPU is printed")
    parser.add_argument("--existing", type=int, default=200,
                        help="trials written (untimed) before the measured ones; a long search's study is large")
    parser.add_argument("--postgres", default=os.environ.get("EVOMERGE_TEST_POSTGRES_URL"))
    parser.add_argument("--no-sqlite", action="store_true")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    records, warm = search_records(args.existing + args.trials), args.existing

    with tempfile.TemporaryDirectory() as tmp:
        runs: dict[str, Callable[[], dict[str, Any]]] = {"journal": lambda: run_journal(Path(tmp), records, warm)}
        if not args.no_sqlite:
            runs["sqlite"] = lambda: run_sqlite(Path(tmp), records, warm)
        if args.postgres:
            runs["postgresql"] = lambda: run_postgres(args.postgres, records, warm)
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
        for _ in range(args.repeats):  # interleaved, so a busy spell of the machine hits all alike
            for name, run in runs.items():
                results[name].append(run())

    print_section(f"CPU ms per recorded trial ({args.trials} trials in batches of 10-100 into a study "
                  f"of {args.existing}; best of {args.repeats})")
    # The run with the least CPU: other processes on the machine only ever add to CPU time
    # (cache misses, migrations), so the minimum is the least disturbed reading.
    best = {name: min(rs, key=lambda r: r["driver"] + r["server"]) for name, rs in results.items()}
    journal = best["journal"]["driver"]
    rows = []
    for name, r in best.items():
        total = r["driver"] + r["server"]
        rows.append((name, r["writer"], f"{r['driver']:.3f}", f"{r['server']:.3f}", f"{total:.3f}",
                     f"{r['all_pg']:.3f}" if r["all_pg"] is not None else None, f"{total / journal:.2f}x"))
    print(format_table(["storage", "writer", "driver", "server backend", "total", "all postgres", "total / journal"],
                       rows))
    if not args.postgres:
        print("(PostgreSQL skipped: set EVOMERGE_TEST_POSTGRES_URL or pass --postgres)")


if __name__ == "__main__":
    main()
