"""M2N2 against CMA-ES, DAM and the static merges on the tiny-LM skills (add + reverse experts).

Every method merges the two experts of populations/tiny-lm-skills.yaml with the same budget
(default 500 evaluations x 2 seeds), each job the in-process search loop (`run_local`), two at a
time: plain M2N2 (the population's options without its guide), CMA-ES (default options: a layerwise genome over the
seeds), DAM (default options; its distillation data are the two training files, one per seed),
the static strategy (both seeds, whole-model SLERP t=0.5 and the uniform soup), and M2N2 guided
by DAM (DAM's merge joins the archive as a new basis element).

Reported: the held-out score (exact match over both skills' test prompts, the task's test_score)
of the best-by-train member at each checkpoint, mean ± std over seeds. The static strategy has
only its plan to offer (4 evaluations) and DAM its training trajectory; their searches end there
(instead of re-scoring the same merges) and their last value is carried forward. A method that raises, or whose every
evaluation fails, shows ERROR in the table and the error is printed below it.

Merge methods (`--merges`, on by default; `--merges-only` runs just this part): every static merge
method at mergekit's defaults and the best of a small grid (by train score), against M2N2 with and
without `seed_with` (the 3 best static merges join its archive at the start). Here the seeds are
[base, expert_add, expert_rev] (base = seed 0), so the task-vector methods have their real base.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from _common import (REPO_ROOT, Job, checkpoint_list, fmt_mean_std, fmt_seconds, load_population,
                     pin_blas_threads, print_section, run_jobs, timer, write_json)

from evomerge.report import format_table

POPULATION = "tiny-lm-skills"
METHODS = {
    "m2n2": {"strategy.options.guide": None},  # plain M2N2: the population without its DAM guide
    "cmaes": {"strategy.name": "cmaes", "strategy.options": {}},
    "dam": {"strategy.name": "dam", "strategy.options": {}},
    "static": {"strategy.name": "static", "strategy.options": {}},
    # hybrid: DAM trains on a quarter of the evaluations until its merge is offered; that merge
    # joins the recipe archive as a third basis element, and M2N2 crosses it with the experts
    "m2n2+dam": {},  # the population as written: guide {from: dam, every: 50, share: 0.25}
}
LABELS = {"m2n2": "M2N2", "cmaes": "CMA-ES (layerwise)", "dam": "DAM", "static": "static (seeds, SLERP 0.5, soup)",
          "m2n2+dam": "M2N2 guided by DAM"}


def run_method(population: str, overrides: dict[str, Any], threads: int = 1) -> dict[str, Any]:
    """run_local with the best-by-train (train, test) after every evaluation and the errors seen.

    The static strategy and DAM end when they have nothing new to offer, before the budget.
    """
    pin_blas_threads(threads)
    from evomerge.engine.local import run_local

    config = load_population(population, overrides)
    info: dict[str, Any] = {}
    history: list[tuple[float | None, float | None]] = []
    errors: list[str] = []
    members: list[dict[str, Any]] = []

    def on_record(record) -> None:
        history.append((record.best_train, record.best_test))
        if record.failed:
            errors.append(record.error)
        if config.strategy.name == "static":
            members.append({"params": record.params, "train": record.train_score, "test": record.test_score})

    with timer() as t:
        pop = run_local(config, on_record)
    strategy = pop.strategy
    if hasattr(strategy, "training_curve"):
        curve = strategy.training_curve()
        info["dam_loss_first_last"] = [curve[0], curve[-1]] if curve else None
        info["dam_steps"] = len(curve)
    return {"population": population, "overrides": dict(overrides), "seed": config.seed,
            "strategy": config.strategy.name, "strategy_options": dict(config.strategy.options),
            "budget": config.budget.evaluations, "evaluations": pop.told, "failed": len(errors),
            "first_errors": sorted(set(errors))[:3], "wall_seconds": t["seconds"],
            "evals_per_second": pop.told / t["seconds"] if t["seconds"] else None,
            "history": history, "members": members, **info,
            "best": None if pop.best is None else {"member_id": pop.best.member_id, "train": pop.best.train_score,
                                                   "test": pop.best.test_score, "generation": pop.best.generation}}


def at_checkpoint(result: dict[str, Any], point: int) -> float | None:
    """best_test after `point` evaluations; a run that stopped earlier (static) carries its last value."""
    history = result["history"]
    if not history:
        return None
    return history[min(point, len(history)) - 1][1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evals", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--population", default=POPULATION)
    parser.add_argument("--quick", action="store_true", help="100 evaluations, 1 seed")
    parser.add_argument("--out", help="write the numbers as JSON")
    parser.add_argument("--merges", action=argparse.BooleanOptionalAction, default=True,
                        help="static merge methods vs M2N2 with/without seed_with")
    parser.add_argument("--merges-only", action="store_true", help="run only the merge-method comparison")
    parser.add_argument("--quick-grid", action="store_true", help="fewer methods and grid points")
    args = parser.parse_args(argv)
    if args.quick:
        args.evals, args.seeds = 100, 1
    if args.out:
        args.out = str(Path(args.out).resolve())
    os.chdir(REPO_ROOT)  # the population's seed paths are relative to the repo root
    if args.merges_only:
        return merge_comparison(args)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    points = checkpoint_list(args.evals, [25, 50, 100, 200, 300, 500, 1000])

    jobs = [Job((name, seed), f"{name} seed={seed}", run_method,
                {"population": args.population,
                 "overrides": {**METHODS[name], "seed": seed, "budget.evaluations": args.evals}})
            for name in methods for seed in range(args.seeds)]
    jobs.sort(key=lambda j: j.key[0] == "static")  # the long ones first

    def describe(job: Job, result: dict) -> str:
        best = result["best"]
        test = "no successful evaluation" if best is None else f"test {best['test']:.4f}"
        return (f"{test}, {result['evaluations']} evals ({result['failed']} failed), "
                f"{result['evals_per_second']:.2f} evals/s")

    with timer() as total:
        results, errors = run_jobs(jobs, args.jobs, describe)

    rows, failures = [], []
    for name in methods:
        runs = [results.get((name, s)) for s in range(args.seeds)]
        crashed = [s for s in range(args.seeds) if (name, s) in errors]
        ok = [r for r in runs if r and r["best"] is not None]
        for s in crashed:
            last = errors[(name, s)].strip().splitlines()[-1]
            failures.append(f"{name} seed={s}: the job raised: {last}")
        for r in runs:
            if r and r["failed"]:
                failures.append(f"{name} seed={r['seed']}: {r['failed']} of {r['evaluations']} evaluations failed: "
                                + " | ".join(r["first_errors"]))
        if not ok:
            reason = "job raised" if crashed else "every evaluation failed"
            rows.append((LABELS[name], *(["ERROR"] * len(points)), "-", "-", f"ERROR: {reason}"))
            continue
        cells = [fmt_mean_std([at_checkpoint(r, p) for r in ok]) for p in points]
        walls = fmt_mean_std([r["wall_seconds"] for r in ok], digits=0) + " s"
        evals = "/".join(str(r["evaluations"]) for r in ok)
        note = f"{len(crashed)} seed(s) crashed" if crashed else ""
        failed = sum(r["failed"] for r in ok)
        if failed:
            note = (note + "; " if note else "") + f"{failed} failed evals"
        if any(r["evaluations"] < r["budget"] for r in ok):
            note = (note + "; " if note else "") + "ended early (nothing new to offer), carried forward"
        rows.append((LABELS[name], *cells, evals, walls, note))

    print_section(f"held-out exact match (add + rev) of the best-by-train member, mean ± std over "
                  f"{args.seeds} seed(s)")
    print(format_table(("method", *[str(p) for p in points], "evals", "wall", "notes"), rows))

    statics = [results[("static", s)] for s in range(args.seeds) if ("static", s) in results]
    if statics:
        print_section("static plan, per member (seed 0 run)")
        print(format_table(("member", "train", "test"),
                           [(", ".join(f"{k}={v}" for k, v in m["params"].items()),
                             "-" if m["train"] is None else f"{m['train']:.4f}",
                             "-" if m["test"] is None else f"{m['test']:.4f}") for m in statics[0]["members"]]))
    dams = [results[("dam", s)] for s in range(args.seeds) if ("dam", s) in results]
    for r in dams:
        if r.get("dam_loss_first_last"):
            first, last = r["dam_loss_first_last"]
            print(f"DAM seed={r['seed']}: {r['dam_steps']} Adam steps, loss {first:.4f} -> {last:.4f}")

    print(f"\nwall time {fmt_seconds(total['seconds'])} ({args.jobs} job(s) at a time)")
    if failures:
        print_section("failures")
        for line in failures:
            print(line)
        for key, tb in errors.items():
            print(f"\n--- {'/'.join(map(str, key))} traceback ---\n{tb}")
    if args.out:
        write_json(args.out, {"evals": args.evals, "seeds": args.seeds, "checkpoints": points,
                              "results": {"/".join(map(str, k)): v for k, v in results.items()},
                              "errors": {"/".join(map(str, k)): v for k, v in errors.items()},
                              "table": rows, "wall_seconds": total["seconds"]})
    code = 1 if errors else 0
    if args.merges:
        code = max(code, merge_comparison(args))
    return code


def merge_comparison(args: argparse.Namespace) -> int:
    """compare_digits' merge-method comparison on the tiny experts, with their base as seed 0."""
    from compare_digits import merge_methods

    seeds = ["models/tiny-lm/base", "models/tiny-lm/expert_add", "models/tiny-lm/expert_rev"]
    out = args.out and args.out.replace(".json", "-merges.json")
    return merge_methods(args.evals, args.seeds, args.jobs, out, population=args.population,
                         base_overrides={"seeds": seeds, "strategy.options.guide": None},
                         quick=args.quick_grid, num_seeds=3)


if __name__ == "__main__":
    sys.exit(main())
