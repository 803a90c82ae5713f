"""The driver: starts Ray and the actors, shows progress, records trials, writes the results.

The driver owns the run folder (study, best member, summary); actors only compute, so a run on
a cluster still leaves its files where the user launched it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
from safetensors.numpy import save_file
from tqdm import tqdm

from evomerge.config import SearchConfig
from evomerge.engine import raysession
from evomerge.engine.actors import RemotePopulation, start_workers
from evomerge.errors import EvomergeError
from evomerge.tracking.recorder import TrialRecorder
from evomerge.tracking.storage import JOURNAL_NAME, open_storage, storage_url

RUN_FILES = ("summary.json", "best.json", "best.safetensors", "config.json", JOURNAL_NAME)
RUN_DIRS = ("snapshots", "plots")


@dataclass
class SearchOptions:
    out_dir: Path
    address: str | None = None
    progress: bool = True
    overwrite: bool = False
    advance_seconds: float = 0.5


def prepare_run_dir(out_dir: Path, overwrite: bool) -> None:
    existing = [name for name in RUN_FILES + RUN_DIRS if (out_dir / name).exists()]
    if existing and not overwrite:
        raise EvomergeError(
            f"run folder {out_dir} already holds a search ({', '.join(existing)}); "
            f"continue it with `evomerge resume {out_dir}`, or pass --overwrite (or --out) for a fresh one"
        )
    for name in existing:
        path = out_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def run_search(config: SearchConfig, options: SearchOptions) -> dict[str, Any]:
    out_dir = Path(options.out_dir)
    prepare_run_dir(out_dir, options.overwrite)
    (out_dir / "config.json").write_text(json.dumps(config.model_dump(mode="json"), indent=2))
    started_ray = raysession.connect(config, options.address)
    url = storage_url(config.optuna.storage, out_dir)
    study_name = config.optuna.study_name or config.name
    recorder = TrialRecorder(open_storage(url), study_name,
                             study_attrs={"config_hash": config.hash(), "strategy": config.strategy.name,
                                          "fitness": config.fitness.task})
    workers = start_workers(config)
    population = RemotePopulation.remote(config.model_dump(mode="json"), workers)
    start = time.perf_counter()
    try:
        evaluations, failed = _drive(population, recorder, config, options)
        recorder.flush()
        best = ray.get(population.best.remote())
    finally:
        recorder.close()
        for actor in [population, *workers]:
            ray.kill(actor)
        if started_ray:
            ray.shutdown()
    wall = time.perf_counter() - start
    summary = {
        "name": config.name, "strategy": config.strategy.name, "fitness": config.fitness.task,
        "evaluations": evaluations, "failed": failed, "budget": config.budget.evaluations,
        "best": None if best is None else {k: best[k] for k in ("member_id", "train_score", "test_score",
                                                               "generation", "parents")},
        "wall_seconds": round(wall, 3), "evals_per_second": round(evaluations / wall, 2) if wall else None,
        "storage": url, "study_name": study_name, "seed": config.seed, "sync": config.sync,
    }
    if best is not None:
        write_best(out_dir, best, config)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _drive(population: Any, recorder: TrialRecorder, config: SearchConfig,
           options: SearchOptions) -> tuple[int, int]:
    evaluations = failed = 0
    bar = tqdm(total=config.budget.evaluations, unit="eval", disable=not options.progress,
               dynamic_ncols=True, desc=config.name)
    try:
        while evaluations < config.budget.evaluations:
            records = ray.get(population.advance.remote(options.advance_seconds))
            if not records:
                continue
            recorder.put(records)
            evaluations += len(records)
            failed += sum(r.failed for r in records)
            last = records[-1]
            bar.update(len(records))
            bar.set_postfix(best_train=_fmt(last.best_train), best_test=_fmt(last.best_test),
                            failed=failed, refresh=False)
    finally:
        bar.close()
    return evaluations, failed


def write_best(out_dir: Path, best: dict[str, Any], config: SearchConfig) -> None:
    genome = np.ascontiguousarray(best["genome"], dtype=np.float32)
    save_file({"params": genome}, str(out_dir / "best.safetensors"),
              metadata={"format": "evomerge-dense", "fitness": config.fitness.task})
    meta = {k: best[k] for k in ("member_id", "train_score", "test_score", "generation", "parents")}
    meta.update({"genome": "dense", "dimension": int(genome.size), "fitness": config.fitness.task,
                 "fitness_options": config.fitness.options})
    (out_dir / "best.json").write_text(json.dumps(meta, indent=2))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
