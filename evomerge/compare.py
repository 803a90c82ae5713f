"""`evomerge compare`: several strategies on one task and budget, side by side.

Each (strategy, seed) is a normal search (its own run folder, its own study in one shared
Optuna storage), so every comparison run can be inspected, resumed or exported like any other.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import optuna

from evomerge.config import SearchConfig, load_config
from evomerge.engine import raysession
from evomerge.engine.search import SearchOptions, run_search
from evomerge.errors import EvomergeError
from evomerge.report import format_table
from evomerge.strategies import STRATEGIES
from evomerge.tracking.late_tests import study_trials
from evomerge.tracking.plots import progress_series
from evomerge.tracking.storage import open_storage
from evomerge.tracking.trial_record import train_score_of


def run_compare(config_path: Path, strategies: Sequence[str], budget: int | None, seeds: int, out_dir: Path,
                address: str | None = None, progress: bool = True,
                budget_datapoints: int | None = None) -> list[dict[str, Any]]:
    """`budget_datapoints`: every run gets `budget.datapoints` (and `budget` evaluations only if
    given), and the plot's x axis is datapoint-evaluations: the cost on an LLM, where a
    subsampled strategy scores many more children for the same cost. A strategy that does not
    judge subsets runs without the config's `fitness.subsample`."""
    if budget is None and budget_datapoints is None:
        raise EvomergeError("give --budget (evaluations) or --budget-datapoints (or both)")
    base = load_config(config_path)
    for name in strategies:
        if name not in STRATEGIES:
            raise EvomergeError(f"--strategies: unknown strategy {name!r}; registered: {', '.join(STRATEGIES.names())}")
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = str(out_dir / "optuna.journal")
    started = raysession.connect(base, address)
    rows: list[dict[str, Any]] = []
    try:
        for name in strategies:
            for seed in range(seeds):
                row = _one_run(config_path, base, name, seed, budget, out_dir, storage, address, progress,
                               budget_datapoints)
                rows.append({k: v for k, v in row.items() if k != "baselines"})
                for b in row.get("baselines", []):  # each static merge is a baseline row of its own
                    rows.append({"strategy": f"static: {b['label']}", "seed": seed, "evaluations": 1, "failed": 0,
                                 "test_score": b["test_score"], "train_score": b["train_score"],
                                 "wall_seconds": 0.0, "study": row["study"]})
    finally:
        if started:
            import ray

            ray.shutdown()
    write_outputs(rows, out_dir, budget, budget_datapoints)
    return rows


def _one_run(config_path: Path, base: SearchConfig, name: str, seed: int, budget: int | None, out_dir: Path,
             storage: str, address: str | None, progress: bool,
             budget_datapoints: int | None = None) -> dict[str, Any]:
    strategy = STRATEGIES.get(name)
    from_scratch = not base.seeds
    if (from_scratch and not strategy.supports_scratch) or (not from_scratch and not strategy.supports_seeds):
        need = "seeds" if from_scratch else "a from-scratch problem"
        return {"strategy": name, "seed": seed, "skipped": f"needs {need}"}
    study = f"{base.name}-{name}-seed{seed}"
    overrides: dict[str, Any] = {"strategy.name": name, "seed": seed, "budget.evaluations": budget,
                                 "optuna.storage": storage, "optuna.study_name": study}
    if budget_datapoints is not None:
        overrides["budget.datapoints"] = budget_datapoints
    if name != base.strategy.name:
        overrides["strategy.options"] = {}
        seed_with = base.strategy.options.get("seed_with") or []
        if name == "static" and seed_with:  # the merges M2N2 starts from are the baselines it must beat
            overrides["strategy.options"] = {"merges": seed_with}
    if name == "static":
        overrides["fitness.test_every"] = "all"  # every baseline gets its own held-out score
    if base.fitness.subsample is not None and not getattr(strategy, "supports_subsample", False):
        overrides["fitness.subsample"] = None
    config = load_config(config_path, overrides)
    if progress:
        # One-shot strategies (static, dam) end when they have nothing new to offer.
        limit = f"{budget} evaluations" if budget_datapoints is None else f"{budget_datapoints} datapoint-evaluations"
        print(f"== {name}, seed {seed}: up to {limit}", file=sys.stderr)
    start = time.perf_counter()
    # one folder of data-based merges for every run: a fisher spec in M2N2's seed_with and the
    # static baselines (the same spec) is merged once, not once per strategy and seed
    summary = run_search(config, SearchOptions(out_dir=out_dir / "runs" / f"{name}-seed{seed}", address=address,
                                               progress=progress, overwrite=True, merges_dir=out_dir / "merges"))
    wall = time.perf_counter() - start  # the whole run, set-up included: what the user waits for
    best = summary.get("best") or {}
    trials = study_trials(optuna.load_study(study_name=study, storage=open_storage(storage)))  # late tests merged
    series = progress_series(trials)
    row = {"strategy": name, "seed": seed, "evaluations": summary["evaluations"], "failed": summary["failed"],
           "test_score": best.get("test_score"), "train_score": best.get("train_score"),
           "wall_seconds": round(wall, 3), "curve": series["best_test"].tolist(), "study": study,
           "datapoints": summary.get("datapoints"), "curve_datapoints": series["datapoints"].tolist(),
           # a task with groups: the best member's train and test score per group (skill)
           **({"train_scores": best["train_scores"], "test_scores": best.get("test_scores")}
              if best.get("train_scores") is not None else {})}
    if name != "static":
        return row
    return {**row, "baselines": static_baselines(trials, config.strategy.options)}


def static_baselines(trials: Sequence[Any], options: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per `merges` entry the static strategy scored: its label, train and test score."""
    from evomerge.strategies.merge_specs import MergeSpec

    merges = [MergeSpec.model_validate(m).label() for m in options.get("merges") or []]
    out = []
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.state != optuna.trial.TrialState.COMPLETE:
            continue
        p = trial.params
        if "merge" not in p or int(p["merge"]) >= len(merges):
            continue  # the seeds, SLERP and the soup: the static row's best already covers them
        label = merges[int(p["merge"])]
        train = train_score_of(trial)  # the mean over all datapoints, also where the values are groups
        out.append({"label": label, "train_score": train, "test_score": trial.user_attrs.get("test_score")})
    return out


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    for name in dict.fromkeys(r["strategy"] for r in rows):
        mine = [r for r in rows if r["strategy"] == name]
        done = [r for r in mine if "skipped" not in r]
        if not done:
            table.append({"strategy": name, "runs": 0, "note": mine[0]["skipped"]})
            continue
        tests = [r["test_score"] for r in done if r["test_score"] is not None]
        table.append({
            "strategy": name, "runs": len(done),
            "test_mean": statistics.fmean(tests) if tests else None,
            "test_std": statistics.pstdev(tests) if len(tests) > 1 else 0.0 if tests else None,
            "train_mean": statistics.fmean(r["train_score"] for r in done if r["train_score"] is not None)
            if any(r["train_score"] is not None for r in done) else None,
            "evaluations": statistics.fmean(r["evaluations"] for r in done),
            "datapoints": statistics.fmean(r.get("datapoints") or 0 for r in done),
            "wall_seconds": statistics.fmean(r["wall_seconds"] for r in done), "note": "",
            **_group_means(done),
        })
    return table


def _group_means(done: list[dict[str, Any]]) -> dict[str, Any]:
    """Per group (a task with groups): the mean over seeds of the best member's train and test
    scores, as {"train_groups": {name: mean}, "test_groups": {...}}; nothing without groups."""
    out: dict[str, Any] = {}
    for key, name in (("train_scores", "train_groups"), ("test_scores", "test_groups")):
        by_group: dict[str, list[float]] = {}
        for r in done:
            for group, score in (r.get(key) or {}).items():
                by_group.setdefault(group, []).append(score)
        if by_group:
            out[name] = {group: statistics.fmean(scores) for group, scores in by_group.items()}
    return out


def _groups_cell(table_row: dict[str, Any]) -> str:
    train, test = table_row.get("train_groups") or {}, table_row.get("test_groups") or {}
    return ", ".join(f"{g} {train[g]:.4f} / " + ("-" if test.get(g) is None else f"{test[g]:.4f}") for g in train)


def write_outputs(rows: list[dict[str, Any]], out_dir: Path, budget: int | None,
                  budget_datapoints: int | None = None) -> None:
    table = aggregate(rows)
    grouped = any(t.get("train_groups") for t in table)
    headers = ("strategy", "runs", "test score (mean ± std)", "train score",
               *(("per group: train / test (means)",) if grouped else ()), "evaluations", "datapoints",
               "wall s", "note")
    body = [(t["strategy"], t["runs"],
             "-" if t.get("test_mean") is None else f"{t['test_mean']:.4f} ± {t['test_std']:.4f}",
             t.get("train_mean"), *((_groups_cell(t) or None,) if grouped else ()),
             None if "evaluations" not in t else round(t["evaluations"]),
             None if "datapoints" not in t else round(t["datapoints"]),
             None if "wall_seconds" not in t else round(t["wall_seconds"], 1), t.get("note", "")) for t in table]
    text = format_table(headers, body)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join("-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)) for v in row) + " |"
              for row in body]
    (out_dir / "compare.md").write_text("# evomerge compare\n\n" + "\n".join(lines) + "\n")
    with open(out_dir / "compare.csv", "w", newline="") as f:
        writer = csv.writer(f)
        groups = list(dict.fromkeys(g for r in rows for g in (r.get("train_scores") or {})))
        writer.writerow(["strategy", "seed", "evaluations", "datapoints", "failed", "test_score", "train_score",
                         "wall_seconds", "study", "skipped",
                         *(f"{kind}_score/{g}" for g in groups for kind in ("train", "test"))])
        for r in rows:
            per_group = [(r.get(f"{kind}_scores") or {}).get(g) for g in groups for kind in ("train", "test")]
            writer.writerow([r["strategy"], r["seed"], r.get("evaluations"), r.get("datapoints"), r.get("failed"),
                             r.get("test_score"), r.get("train_score"), r.get("wall_seconds"), r.get("study"),
                             r.get("skipped", ""), *per_group])
    (out_dir / "compare.json").write_text(json.dumps({"table": table, "runs": rows}, indent=1))
    if budget_datapoints is not None:
        plot_compare_datapoints(rows, out_dir / "compare.png", budget_datapoints)
    else:
        assert budget is not None
        plot_compare(rows, out_dir / "compare.png", budget)
    print(text)


def plot_compare_datapoints(rows: list[dict[str, Any]], path: Path, budget: int, points: int = 400) -> Path:
    """Test score of the best-so-far member against datapoint-evaluations spent, mean ± std over
    seeds: each run's step curve read at the same datapoint counts (a run that ended early keeps
    its last value)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    grid_x = np.linspace(0, budget, points)
    for name in dict.fromkeys(r["strategy"] for r in rows):
        runs = [r for r in rows if r["strategy"] == name and r.get("curve_datapoints")]
        if not runs:
            continue
        grid = np.full((len(runs), points), np.nan)
        for i, r in enumerate(runs):
            spent, curve = np.asarray(r["curve_datapoints"], float), np.asarray(r["curve"], float)
            at = np.searchsorted(spent, grid_x, side="right") - 1  # the last trial within each count
            grid[i, at >= 0] = curve[at[at >= 0]]
        mean, std = _mean_std(grid)
        line = ax.plot(grid_x, mean, label=f"{name} ({len(runs)} seeds)", drawstyle="steps-post")[0]
        ax.fill_between(grid_x, mean - std, mean + std, alpha=0.2, color=line.get_color(), step="post")
    return _finish(fig, ax, "datapoint-evaluations", f"{budget:,} datapoint-evaluations", path)


def _mean_std(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column over the runs, ignoring NaN (a column no run reached stays NaN, silently)."""
    import warnings

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(grid, axis=0), np.nanstd(grid, axis=0)


def _finish(fig: Any, ax: Any, xlabel: str, budget_text: str, path: Path) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test score of the best-so-far member")
    ax.set_title(f"evomerge compare ({budget_text}, mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_compare(rows: list[dict[str, Any]], path: Path, budget: int) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name in dict.fromkeys(r["strategy"] for r in rows):
        curves = [np.asarray(r["curve"], dtype=float) for r in rows if r["strategy"] == name and "curve" in r]
        if not curves:
            continue
        length = max(budget, max(c.size for c in curves))  # one-shot baselines extend as a level line
        one_shot = max(c.size for c in curves) < budget
        grid = np.full((len(curves), length), np.nan)
        for i, c in enumerate(curves):  # a run that stopped early keeps its last value
            grid[i, :c.size] = c
            grid[i, c.size:] = c[-1] if c.size else np.nan
        x = np.arange(1, length + 1)
        mean, std = _mean_std(grid)
        label = f"{name} ({len(curves)} seeds)" + (" - one-shot, level after its last evaluation" if one_shot else "")
        line = ax.plot(x, mean, label=label, drawstyle="steps-post", linestyle="--" if one_shot else "-")[0]
        ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=line.get_color(), step="post")
    return _finish(fig, ax, "evaluations", f"{budget} evaluations", path)
