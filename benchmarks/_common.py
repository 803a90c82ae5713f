"""Helpers shared by the benchmark scripts: timing, mean ± std, configured runs, throughput.

Benchmarks compare numbers measured in one run, so everything here returns raw measurements
(seconds, counts, accuracies) and leaves the comparing and printing to the script.

Functions that run as jobs in a process pool are top-level and take only plain arguments, so
they pickle under the "spawn" start method (which avoids forking a process that holds Ray or
BLAS threads).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
POPULATIONS = REPO_ROOT / "populations"

if str(REPO_ROOT) not in sys.path:  # run as `python benchmarks/x.py` without an installed package
    sys.path.insert(0, str(REPO_ROOT))


# -- threads and timing ------------------------------------------------------------------------
def pin_blas_threads(n: int = 1) -> None:
    """One BLAS thread per process: jobs run side by side on few cores, and Ray's fitness workers
    get OMP_NUM_THREADS=num_cpus, so the in-process reference must match to be comparable."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(n))
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - env vars still cover freshly started processes
        return
    threadpool_limits(limits=n)


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    """`with timer() as t: ...` then `t["seconds"]`."""
    out: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - start


def fmt_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s"


# -- statistics --------------------------------------------------------------------------------
def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample std (ddof = 1) of the values that exist; std is None for fewer than two."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None, 0
    mean = statistics.fmean(vals)
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return mean, std, len(vals)


def fmt_mean_std(values: Sequence[float | None], digits: int = 3) -> str:
    mean, std, n = mean_std(values)
    if mean is None:
        return "-"
    if std is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def fmt_ratio(num: float | None, den: float | None, digits: int = 2) -> str:
    if num is None or not den:
        return "-"
    return f"{num / den:.{digits}f}×"


# -- configured runs ---------------------------------------------------------------------------
def population_path(name: str | Path) -> Path:
    """`digits-scratch`, `digits-scratch.yaml` or a path to a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = POPULATIONS / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if not candidate.exists():
        raise FileNotFoundError(f"no population {name!r}: looked for {path} and {candidate}")
    return candidate


def load_population(name: str | Path, overrides: dict[str, Any] | None = None):
    """A validated `SearchConfig` from a population YAML plus dotted overrides (`budget.evaluations`)."""
    from evomerge.config import load_config

    return load_config(population_path(name), dict(overrides or {}))


def checkpoint_list(budget: int, wanted: Sequence[int]) -> list[int]:
    """The wanted checkpoints that fit in the budget, plus the budget itself."""
    points = sorted({int(c) for c in wanted if 0 < c <= budget} | {int(budget)})
    return points


def run_local_checkpoints(population: str, overrides: dict[str, Any], checkpoints: Sequence[int],
                          threads: int = 1) -> dict[str, Any]:
    """Run the in-process search loop and note best-by-train (train, test) at each checkpoint.

    A record's `best_test` is the held-out score of the best-ever-by-training-score member at that
    moment, which is how the paper's reference code reports test accuracy. A search that ends
    before a checkpoint (DAM once its trained merge is back) carries its last value there.
    """
    pin_blas_threads(threads)
    from evomerge.engine.local import run_local

    config = load_population(population, overrides)
    wanted = set(int(c) for c in checkpoints)
    table: dict[int, dict[str, float | None]] = {}
    failed = 0
    last: dict[str, float | None] | None = None

    def on_record(record) -> None:
        nonlocal failed, last
        failed += record.failed
        done = record.number + 1
        last = {"best_train": record.best_train, "best_test": record.best_test}
        if done in wanted:
            table[done] = last

    with timer() as t:
        pop = run_local(config, on_record)
    for point in wanted:
        if point > pop.told:
            table[point] = last
    return {
        "population": population, "overrides": dict(overrides), "seed": config.seed,
        "strategy": config.strategy.name, "strategy_options": dict(config.strategy.options),
        "evaluations": pop.told, "failed": failed, "wall_seconds": t["seconds"],
        "evals_per_second": pop.told / t["seconds"] if t["seconds"] else None,
        "checkpoints": {str(k): table.get(k) for k in sorted(wanted)},
    }


def slerp_sweep(population: str, overrides: dict[str, Any], points: int = 101,
                threads: int = 1) -> dict[str, Any]:
    """Whole-model SLERP brute force between the two task-made seeds: pick t by TRAIN accuracy.

    Uses the engine's own angle-based slerp (`split_slerp` with the split at the end), and the
    same seeds `build_problem` hands to the strategy, so it is the baseline M2N2 has to beat.
    """
    pin_blas_threads(threads)
    import numpy as np

    from evomerge.engine.actors import build_problem
    from evomerge.genomes.dense import split_slerp
    from evomerge.tasks import build_task

    config = load_population(population, overrides)
    with timer() as t:
        seeds = build_problem(config).initial
        if len(seeds) != 2:
            raise ValueError(f"SLERP brute force needs exactly two seeds, the population has {len(seeds)}")
        a, b = seeds
        task = build_task(config.fitness.task, config.fitness.options, seed=config.seed)
        grid = np.linspace(0.0, 1.0, points)
        train, test = [], []
        for ratio in grid:
            merged = split_slerp(a, b, split=a.size, ratio=float(ratio))
            train.append(float(np.mean(task.evaluate(merged))))
            test.append(task.test_score(merged))
        best = int(np.argmax(train))  # first maximum: ties go to the smaller t
        seed_scores = [{"train": float(np.mean(task.evaluate(s))), "test": task.test_score(s)} for s in (a, b)]
    return {
        "population": population, "overrides": dict(overrides), "seed": config.seed, "points": points,
        "best_t": float(grid[best]), "best_train": train[best], "best_test": test[best],
        "oracle_test": float(max(test)),  # best t chosen on the test set: an upper bound, for context only
        "seeds": seed_scores, "grid": [float(g) for g in grid], "train": train, "test": test,
        "wall_seconds": t["seconds"],
    }


# -- a process pool of independent jobs --------------------------------------------------------
@dataclass
class Job:
    key: tuple[Any, ...]
    label: str
    fn: Callable[..., dict[str, Any]]
    kwargs: dict[str, Any] = field(default_factory=dict)


def _call(fn: Callable[..., dict[str, Any]], kwargs: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None, float]:
    start = time.perf_counter()
    try:
        return fn(**kwargs), None, time.perf_counter() - start
    except Exception:  # reported by the parent, which decides what a failed job means
        return None, traceback.format_exc(), time.perf_counter() - start


def run_jobs(jobs: Sequence[Job], max_workers: int,
             describe: Callable[[Job, dict[str, Any]], str] | None = None,
             stream=sys.stdout) -> tuple[dict[tuple[Any, ...], dict[str, Any]], dict[tuple[Any, ...], str]]:
    """Run jobs (submitted in the given order: put the long ones first) in a spawn pool.

    Prints one line per finished job with its own elapsed time and the total so far; returns the
    results by key and the tracebacks of the jobs that raised.
    """
    results: dict[tuple[Any, ...], dict[str, Any]] = {}
    errors: dict[tuple[Any, ...], str] = {}
    start = time.perf_counter()
    width = len(str(len(jobs)))
    with ProcessPoolExecutor(max_workers=max_workers, mp_context=get_context("spawn")) as pool:
        pending = {pool.submit(_call, job.fn, job.kwargs): job for job in jobs}
        done_count = 0
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                job = pending.pop(future)
                done_count += 1
                try:
                    result, error, seconds = future.result()
                except Exception:  # the worker process itself died
                    result, error, seconds = None, traceback.format_exc(), float("nan")
                head = f"[{done_count:>{width}}/{len(jobs)}] {job.label}"
                tail = f"in {fmt_seconds(seconds)} (total {fmt_seconds(time.perf_counter() - start)})"
                if error is not None:
                    errors[job.key] = error
                    print(f"{head}: FAILED {tail}\n{error}", file=stream, flush=True)
                    continue
                results[job.key] = result
                extra = describe(job, result) if describe else ""
                print(f"{head}: {extra + ' ' if extra else ''}{tail}", file=stream, flush=True)
    return results, errors


# -- throughput --------------------------------------------------------------------------------
def start_ray(num_cpus: int = 2, object_store_mb: int = 200) -> bool:
    """Start Ray once so every `run_search` reuses it (it only shuts down a Ray it started)."""
    import logging

    import ray

    from evomerge.engine.raysession import quiet_token_auth_notice

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    quiet_token_auth_notice()
    if ray.is_initialized():
        return False
    ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=object_store_mb * 1024**2,
             logging_level=logging.WARNING)
    return True


def local_throughput(population: str, overrides: dict[str, Any], threads: int = 1) -> dict[str, Any]:
    """Evaluations per second of the in-process loop, set-up (task load, seeds) included."""
    pin_blas_threads(threads)
    from evomerge.engine.local import run_local

    config = load_population(population, overrides)
    with timer() as t:
        pop = run_local(config)
    return {"mode": "in-process", "workers": 0, "evaluations": pop.told, "wall_seconds": t["seconds"],
            "evals_per_second": pop.told / t["seconds"],
            "best_train": pop.best.train_score if pop.best else None,
            "best_test": pop.best.test_score if pop.best else None}


def engine_throughput(population: str, overrides: dict[str, Any], workers: int, run_dir: Path) -> dict[str, Any]:
    """Evaluations per second of the real Ray engine (`run_search`), recording to Optuna included.

    Call `start_ray` first: a Ray that run_search starts itself is shut down after each run.
    """
    import optuna

    from evomerge.engine.search import SearchOptions, run_search

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one "study created" line per run is noise here
    config = load_population(population, {**overrides, "workers.count": workers})
    summary = run_search(config, SearchOptions(out_dir=Path(run_dir), progress=False, overwrite=True))
    best = summary.get("best") or {}
    return {"mode": "ray engine", "workers": workers, "sync": config.sync, "batch": config.workers.batch,
            "evaluations": summary["evaluations"], "failed": summary["failed"],
            "wall_seconds": summary["wall_seconds"], "evals_per_second": summary["evals_per_second"],
            "best_train": best.get("train_score"), "best_test": best.get("test_score")}


# -- output ------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, str) else k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2))
    tmp.replace(path)


def print_section(title: str, stream=sys.stdout) -> None:
    print(f"\n== {title} " + "=" * max(0, 72 - len(title)), file=stream, flush=True)
