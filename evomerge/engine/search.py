"""The driver: starts Ray and the actors, shows progress, records trials, snapshots, finishes.

The driver owns the run folder (study, snapshots, best member, summary, plots); actors only
compute, so a search on a cluster still leaves its files where the user launched it.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from pydantic import BaseModel
from tqdm import tqdm

from evomerge import snapshots
from evomerge.config import MISSING, SearchConfig, config_from_dict, field_default_json, submodel
from evomerge.engine import memory_plan, raysession
from evomerge.engine.actors import RemotePopulation, start_workers
from evomerge.engine.basis_spec import preflight_task
from evomerge.engine.data_merges import data_specs, prepare_data_merges
from evomerge.engine.seed_cache import prepare_seeds, will_check_seeds
from evomerge.engine.late_tests import TestRecord
from evomerge.engine.population import EvalRecord
from evomerge.engine.replay import entries_from_trials, max_member_id, warning_text
from evomerge.engine.interrupts import Interrupted, InterruptGuard
from evomerge.engine.results import finish_run
from evomerge.errors import EvomergeError
from evomerge.tracking.late_tests import measured_tests
from evomerge.tracking.recorder import TrialRecorder, refuse_existing_study
from evomerge.tracking.storage import JOURNAL_NAME, open_storage, repair_journal_tail, storage_url

RUN_FILES = ("summary.json", "best.json", "best.safetensors", "config.json", JOURNAL_NAME)
RUN_DIRS = ("snapshots", "plots", "artifacts", "best")


@dataclass
class SearchOptions:
    out_dir: Path
    address: str | None = None
    progress: bool = True
    overwrite: bool = False
    # One stretch of the search per driver round trip. The driver keeps one more queued, so
    # Ctrl-C waits for at most two: 0.25 s keeps that within the old single 0.5 s stretch.
    advance_seconds: float = 0.25
    handle_signals: bool = False  # the CLI turns this on; library callers keep their own handlers
    # Where fisher/regmean merges are written (default OUT_DIR/merges); `evomerge compare` shares one.
    merges_dir: Path | None = None


@dataclass
class _Restore:
    meta: dict[str, Any]
    arrays: dict[str, Any]
    snapshot: Path


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
    return _execute(config, options, restore=None)


def resume_search(run_dir: Path, options: SearchOptions, budget: int | None = None,
                  force: bool = False, budget_datapoints: int | None = None) -> dict[str, Any]:
    """Continue from the newest snapshot that verifies, with the run folder's config.json."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise EvomergeError(f"{run_dir} is not a run folder (no config.json); give the folder a search wrote")
    config = config_from_dict(json.loads(config_path.read_text()), source=str(config_path))
    path, meta, arrays = snapshots.load_latest_snapshot(
        run_dir, warn=lambda msg: print(f"warning: {msg}", file=sys.stderr))
    changed = config_differences(meta["config"], config.model_dump(mode="json"))
    if changed and not force:
        raise EvomergeError(
            f"{config_path} changed since snapshot {path.name}: {', '.join(changed)}; "
            "undo the change, or pass --force to resume with the new values")
    if budget is not None:
        config.budget.evaluations = budget
    if budget_datapoints is not None:
        spent = int(meta["population"].get("datapoints", (0, 0))[0])
        if budget_datapoints < spent:
            raise EvomergeError(f"--budget-datapoints {budget_datapoints} is below the {spent} datapoints already spent")
        config.budget.datapoints = budget_datapoints
    told = int(meta["population"]["told"])
    if config.budget.max_evaluations < told:
        raise EvomergeError(f"--budget {config.budget.evaluations} is below the {told} evaluations already done")
    (run_dir / "summary.json").unlink(missing_ok=True)
    dropped = repair_journal_tail(storage_url(config.optuna.storage, run_dir))
    if dropped:
        print(f"warning: the study's journal ended in an unfinished line ({dropped} bytes, cut by the crash); "
              "removed it", file=sys.stderr)
    options = SearchOptions(**{**options.__dict__, "out_dir": run_dir})
    return _execute(config, options, restore=_Restore(meta, arrays, path))


# Fields that change nothing about the search: a resume may flip them.
RESUME_FREE = ("workers.memory_check",)


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "",
                       model: type[BaseModel] | None = SearchConfig) -> list[str]:
    """Dotted names of fields that differ (the budget may change freely on resume). A field that
    one side lacks and `model` defines counts as its default: a run folder written before the
    field existed (e.g. `fitness.test_every`) resumes without --force."""
    fields = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        if name in ("budget", "budget.evaluations", "budget.datapoints") or name in RESUME_FREE:
            continue
        a, b = old.get(key, MISSING), new.get(key, MISSING)
        if a is MISSING or b is MISSING:
            default = field_default_json(model, key)
            a, b = (default if v is MISSING else v for v in (a, b))
        a, b = (None if v is MISSING else v for v in (a, b))
        if isinstance(a, dict) and isinstance(b, dict):
            sub = submodel(model, key) or _plugin_options_model(name, new)
            fields.extend(config_differences(a, b, prefix=f"{name}.", model=sub))
        elif a != b:
            fields.append(f"{name} ({a!r} -> {b!r})")
    return fields


def _plugin_options_model(name: str, section: dict[str, Any]) -> type[BaseModel] | None:
    """`strategy.options` / `fitness.options`: the plugin's Options model, so an option added after
    a run folder was written (e.g. `seed_with`) counts as its default there too."""
    if name == "strategy.options":
        from evomerge.strategies import STRATEGIES as registry
        plugin = section.get("name")
    elif name == "fitness.options":
        from evomerge.tasks import TASKS as registry
        plugin = section.get("task")
    else:
        return None
    try:
        return getattr(registry.get(plugin), "Options", None) if isinstance(plugin, str) else None
    except KeyError:
        return None


def _execute(config: SearchConfig, options: SearchOptions, restore: _Restore | None) -> dict[str, Any]:
    out_dir = Path(options.out_dir)
    started_ray = raysession.connect(config, options.address)
    url = storage_url(config.optuna.storage, out_dir)
    study_name = config.optuna.study_name or config.name
    workers: list[Any] = []
    try:  # before any worker starts: a search that cannot fit stops here, naming the option
        memory_plan.check_before_start(config, local=_single_node())
        preflight_task(config)  # a model whose names or shapes differ from the seeds' stops here
        storage = open_storage(url)
        if restore is None:
            refuse_existing_study(storage, study_name)  # before any actor starts
        if not data_specs(config):
            # The workers start (a process, imports, the skeleton; on a GPU, the seeds to the device)
            # while the driver checks the seeds: they are told the check is done, and nothing reaches
            # them before it is (no population yet); a failed check kills them below.
            workers = start_workers(config, seeds_checked=will_check_seeds(config))
        # One pass over the seeds (finite check, prefix Gram), or none when the run folder has it.
        gram, checked = prepare_seeds(config, out_dir)
        # fisher/regmean specs merged once into the run folder; the actors' config names the folders
        actors_config = prepare_data_merges(config, out_dir, options.merges_dir)
        if not workers:
            workers = start_workers(actors_config, seeds_checked=checked)
    except BaseException:
        for actor in workers:
            ray.kill(actor)
        if started_ray:
            ray.shutdown()
        raise
    population = RemotePopulation.remote(actors_config.model_dump(mode="json"), workers, gram, checked)
    try:
        # The study has one objective per group of the task's datapoints (None: one objective).
        groups = ray.get(population.groups.remote())
        if restore is None:
            recorder = TrialRecorder(storage, study_name, groups=groups, study_attrs={
                "config_hash": config.hash(), "strategy": config.strategy.name, "fitness": config.fitness.task})
        else:
            recorder = TrialRecorder(storage, study_name, create=False, groups=groups)
    except BaseException:
        for actor in [population, *workers]:
            ray.kill(actor)
        if started_ray:
            ray.shutdown()
        raise
    previous_seconds = 0.0
    if restore is not None:
        # The trials recorded after the snapshot are told back, not evaluated again.
        trials = recorder.study.get_trials(deepcopy=False)
        entries = entries_from_trials(trials, int(restore.meta["population"]["told"]))
        # Late tests (test_every: archive) the study holds are not asked again; the rest go out.
        report = ray.get(population.load_state_dict.remote(
            restore.meta["population"], restore.arrays, entries, max_member_id(trials),
            measured_tests(recorder.study)))
        warning = warning_text(report)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        if options.progress or warning:
            print(f"resumed from {restore.snapshot.name}: {report['replayed']} evaluation(s) replayed from the "
                  f"study, {report['resent']} child(ren) sent out again, {report['redone']} to be redone"
                  + (f", {report['tests_resent']} held-out test(s) sent again" if report.get("tests_resent") else ""),
                  file=sys.stderr)
        previous_seconds = float(restore.meta.get("elapsed_seconds", 0.0))
    run = _Driver(config, options, population, recorder, previous_seconds)
    try:
        with InterruptGuard(enabled=options.handle_signals) as guard:
            run.loop(guard)
        state = run.snapshot(resume=False)
        best = ray.get(population.best.remote())
    finally:
        recorder.close()
        for actor in [population, *workers]:
            ray.kill(actor)
        if started_ray:
            ray.shutdown()
    summary = finish_run(config, out_dir, recorder.study, state, best, url, study_name,
                         evaluations=run.told, failed=run.failed, wall_seconds=run.elapsed(),
                         steady_rate=run.steady_rate())
    return summary


def _single_node() -> bool:
    try:
        return len([n for n in ray.nodes() if n.get("Alive")]) <= 1
    except Exception:
        return True


class _Driver:
    def __init__(self, config: SearchConfig, options: SearchOptions, population: Any,
                 recorder: TrialRecorder, previous_seconds: float) -> None:
        self.config, self.options, self.population, self.recorder = config, options, population, recorder
        status = ray.get(population.status.remote())
        self.told, self.failed = status["evaluations"], status["failed"]
        # Trials already in the study (recorded after the last snapshot, before a crash) were told
        # back by the replay; where it stopped early, the evaluations redone are not written twice.
        self.recorded = len(recorder.study.get_trials(deepcopy=False))
        self.previous_seconds = previous_seconds
        self.started = time.perf_counter()
        self.last_snapshot_step = self.told
        self.written_step: int | None = None  # step of the last snapshot this driver wrote
        # Steady-state rate: from the first result to the last, without actor start-up.
        self.first_result: tuple[float, int] | None = None
        self.last_result: tuple[float, int] | None = None
        self.queued: Any = None  # the advance call the actor runs next (None: nothing queued)
        # the actor said the search is done (a resume may still owe test jobs: test_every: archive)
        self.over = self.told >= config.budget.max_evaluations and not (status.get("tests") or {}).get("outstanding")
        self.datapoints = int(status.get("datapoints", 0))
        self.bar: tqdm | None = None

    def steady_rate(self) -> float | None:
        if self.first_result is None or self.last_result is None:
            return None
        (t0, n0), (t1, n1) = self.first_result, self.last_result
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    def elapsed(self) -> float:
        return self.previous_seconds + time.perf_counter() - self.started

    def loop(self, guard: InterruptGuard) -> None:
        budget, every = self.config.budget.max_evaluations, self.config.snapshots.every
        # A datapoint budget: the bar counts datapoint-evaluations (the cost), the postfix candidates.
        self.by_datapoints = self.config.budget.datapoints is not None
        total, initial = ((self.config.budget.datapoints, self.datapoints) if self.by_datapoints
                          else (budget, self.told))
        self.bar = tqdm(total=total, initial=initial, unit="dp" if self.by_datapoints else "eval",
                        disable=not self.options.progress, dynamic_ncols=True, desc=self.config.name)
        try:
            if self.told == 0 and not snapshots.list_snapshots(Path(self.options.out_dir)):
                # Step 0: a crash before the first `snapshots.every` evaluations still resumes,
                # replaying every trial instead of losing them.
                self._write(*ray.get(self.population.state_dict.remote()))
            self.queued = self._advance()
            while not self.over:
                if guard.requested:
                    self.bar.close()
                    print(f"interrupted: snapshot at {self.told} evaluations written; "
                          f"continue with `evomerge resume {self.options.out_dir}`", file=sys.stderr)
                    self.snapshot(resume=False)
                    raise Interrupted()
                ref, self.queued = self.queued, self._advance()
                self._record(*ray.get(ref))
                if self.told // every > self.last_snapshot_step // every and not self.over:
                    self.snapshot()
            if self.told < budget and not self.by_datapoints:
                self.bar.total = self.told
                self.bar.refresh()
                print(f"strategy {self.config.strategy.name} has nothing new to offer: the search ends at "
                      f"{self.told} of {budget} evaluations", file=sys.stderr)
        finally:
            self.bar.close()

    def _advance(self) -> Any:
        """The next stretch of the search, queued on the population actor before the driver
        handles the last one: the actor goes on dispatching while the driver records trials and
        writes snapshots (a snapshot took 55-70 ms on digits, longer than the workers' queues)."""
        return self.population.advance.remote(self.options.advance_seconds)

    def _record(self, records: list[EvalRecord], over: bool = False, tests: list[TestRecord] | None = None) -> None:
        self.over = self.over or over
        if records:
            self.recorder.put(r for r in records if r.number >= self.recorded)
        self.recorder.put_tests(tests or [])  # late held-out tests, after their members' trials
        if not records:
            return
        self.told += len(records)
        now = time.perf_counter()
        if self.first_result is None:
            self.first_result = (now, self.told)
        self.last_result = (now, self.told)
        self.failed += sum(r.failed for r in records)
        spent = sum(r.datapoints for r in records)
        self.datapoints += spent
        last = records[-1]
        if self.bar is not None:
            self.bar.update(spent if self.by_datapoints else len(records))
            extra = {"evals": self.told} if self.by_datapoints else {"datapoints": self.datapoints}
            self.bar.set_postfix(best_train=_fmt(last.best_train), best_test=_fmt(last.best_test),
                                 failed=self.failed, **extra, refresh=False)

    def snapshot(self, resume: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
        """Study and snapshot must agree about what is recorded. The state is taken after the
        queued stretch, so that stretch's records are recorded and flushed before the snapshot is
        written; with `resume`, the actor starts the next stretch while the driver writes."""
        state = self.population.state_dict.remote()
        pending, self.queued = self.queued, (self._advance() if resume else None)
        if pending is not None:
            self._record(*ray.get(pending))
        self.recorder.flush()
        pop_meta, arrays = ray.get(state)
        if self.written_step == self.told:  # e.g. the budget ended in the stretch a snapshot took in
            return pop_meta, arrays
        self._write(pop_meta, arrays)
        return pop_meta, arrays

    def _write(self, pop_meta: dict[str, Any], arrays: dict[str, Any]) -> None:
        meta = {"population": pop_meta, "config": self.config.model_dump(mode="json"),
                "config_hash": self.config.hash(), "elapsed_seconds": self.elapsed()}
        snapshots.write_snapshot(Path(self.options.out_dir), self.told, meta, arrays,
                                 keep=self.config.snapshots.keep)
        self.last_snapshot_step = self.written_step = self.told


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
