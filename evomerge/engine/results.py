"""What a finished search leaves behind: best member, summary.json, plots attached to the study."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from safetensors.numpy import save_file

from evomerge.config import SearchConfig
from evomerge.engine.population import mean_staleness, recovery
from evomerge.genomes.columns import ColumnGenome, pack_columns
from evomerge.genomes.elements import pack_elements
from evomerge.genomes.layerwise import LayerwiseGenome, pack_layerwise
from evomerge.genomes.merged_folder import MergedFolder
from evomerge.genomes.recipe import Recipe, pack_recipes
from evomerge.tracking.late_tests import held_out_counts, study_trials
from evomerge.tracking.plots import ARTIFACT_DIR_NAME, attach_plots, plot_coverage, plot_progress

BEST_KEYS = ("member_id", "train_score", "test_score", "generation", "parents")
GROUP_KEYS = ("train_scores", "test_scores")  # per group, only for a task with groups


def best_meta(best: dict[str, Any]) -> dict[str, Any]:
    """The best member as summary.json and best.json give it: the per-group scores only where
    the task has groups, so a search without them writes what it always wrote."""
    meta = {k: best[k] for k in BEST_KEYS}
    if best.get("train_scores") is not None:
        meta.update({k: best.get(k) for k in GROUP_KEYS})
    return meta


def finish_run(config: SearchConfig, out_dir: Path, study: optuna.Study, state: tuple[dict, dict],
               best: dict[str, Any] | None, storage: str, study_name: str, *, evaluations: int,
               failed: int, wall_seconds: float, steady_rate: float | None = None) -> dict[str, Any]:
    summary = {
        "name": config.name, "strategy": config.strategy.name, "fitness": config.fitness.task,
        "evaluations": evaluations, "failed": failed, "budget": config.budget.evaluations,
        "datapoints": int(state[0].get("datapoints", (0, 0))[1]), "datapoint_budget": config.budget.datapoints,
        # The strategy ran out of new candidates (DAM trained, static merges scored) before the budget.
        "finished_early": evaluations < config.budget.max_evaluations and config.budget.datapoints is None,
        "best": None if best is None else best_meta(best),
        "wall_seconds": round(wall_seconds, 3),
        "evals_per_second": round(evaluations / wall_seconds, 2) if wall_seconds > 0 else None,
        "steady_evals_per_second": None if steady_rate is None else round(steady_rate, 2),
        "storage": storage, "study_name": study_name, "seed": config.seed, "sync": config.sync,
        "mean_staleness": _rounded(mean_staleness(state[0]), 2),
        # What resumes saved: evaluations told back from the study, children re-sent, redone.
        "recovery": recovery(state[0]),
    }
    try:  # which held-out scores were measured (test_every), over the study with its late tests
        summary["held_out"] = {"test_every": config.fitness.test_every, **held_out_counts(study_trials(study))}
    except Exception as exc:
        print(f"warning: could not count the held-out tests: {exc}", file=sys.stderr)
    try:  # the study says what the search cost, in candidates and in datapoint-evaluations
        study.set_user_attr("evaluations", evaluations)
        study.set_user_attr("datapoints", summary["datapoints"])
    except Exception as exc:  # recording a total must never cost the user the search's results
        print(f"warning: could not record the totals in the study: {exc}", file=sys.stderr)
    if best is not None:
        best = as_element_recipe(best, config)
        write_best(out_dir, best, config)
        if isinstance(best["genome"], (Recipe, ColumnGenome, LayerwiseGenome)):  # merged checkpoints: leave a loadable model
            from evomerge.export import export_best

            export_best(out_dir, out_dir / "best")
            summary["exported"] = str(out_dir / "best")
    try:
        summary["plots"] = [str(p) for p in write_plots(out_dir, study, state, config.name)]
    except Exception as exc:  # a plot must never cost the user the search's results
        print(f"warning: could not draw plots: {exc}", file=sys.stderr)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def as_element_recipe(best: dict[str, Any], config: SearchConfig) -> dict[str, Any]:
    """A best member that is a merged folder (a static fisher/regmean baseline) as the recipe
    "all of one more basis element", that folder: best.safetensors and export already carry
    basis elements, so nothing new is stored."""
    genome = best["genome"]
    if not isinstance(genome, MergedFolder):
        return best
    from evomerge.engine.basis_spec import seeds_layout

    assert isinstance(config.seeds, list)  # merged folders exist over checkpoint seeds only
    elements = list(best.get("elements") or [])
    index = len(config.seeds) + len(elements)
    size = int(seeds_layout(list(config.seeds), config.allow_pickle).size)
    return {**best, "genome": Recipe.seed(index, index + 1, size), "elements": elements + [genome]}


def write_best(out_dir: Path, best: dict[str, Any], config: SearchConfig) -> None:
    """Dense members are saved as their parameters; recipes as the recipe (a few KB), which
    `evomerge export` materialises against the seeds."""
    meta = best_meta(best)
    genome = best["genome"]
    if isinstance(genome, Recipe):
        elements = list(best.get("elements") or [])
        arrays = pack_recipes([genome], "recipe")
        if elements:  # merged models the recipe may use besides the seeds (hybrid guidance)
            arrays.update(pack_elements(elements, "elements"))
        save_file(arrays, str(out_dir / "best.safetensors"),
                  metadata={"format": "evomerge-recipe", "fitness": config.fitness.task})
        meta.update({"genome": "recipe", "dimension": int(genome.breaks[-1]), "segments": genome.num_segments,
                     "seeds": config.seeds, "basis_elements": len(elements)})
    elif isinstance(genome, LayerwiseGenome):
        save_file(pack_layerwise([genome], "layerwise"), str(out_dir / "best.safetensors"),
                  metadata={"format": "evomerge-layerwise", "fitness": config.fitness.task})
        meta.update({"genome": "layerwise", "method": genome.method, "dimension": genome.size,
                     "groups": genome.num_groups, "seeds": config.seeds})
    elif isinstance(genome, ColumnGenome):
        save_file(pack_columns([genome], "columns"), str(out_dir / "best.safetensors"),
                  metadata={"format": "evomerge-columns", "fitness": config.fitness.task})
        meta.update({"genome": "columns", "dimension": genome.layout.size, "seeds": config.seeds})
    else:
        params = np.ascontiguousarray(genome, dtype=np.float32)
        save_file({"params": params}, str(out_dir / "best.safetensors"),
                  metadata={"format": "evomerge-dense", "fitness": config.fitness.task})
        meta.update({"genome": "dense", "dimension": int(params.size)})
    meta.update({"fitness": config.fitness.task, "fitness_options": config.fitness.options})
    (out_dir / "best.json").write_text(json.dumps(meta, indent=2))


def write_plots(out_dir: Path, study: optuna.Study, state: tuple[dict, dict], title: str) -> list[Path]:
    plots = out_dir / "plots"
    paths = [plot_progress(study_trials(study), plots / "progress.png", title=title)]  # late tests merged
    _, arrays = state
    if "strategy/scores" in arrays and "strategy/ids" in arrays:
        paths.append(plot_coverage(arrays["strategy/scores"], arrays["strategy/ids"].tolist(),
                                   plots / "coverage.png", title=title))
    attach_plots(study, paths, out_dir / ARTIFACT_DIR_NAME)
    return paths
