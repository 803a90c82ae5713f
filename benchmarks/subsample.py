"""Subsampled M2N2 against full M2N2 at equal datapoint budgets (in-process; digits or the tiny LM).

On an LLM an evaluation costs about the number of prompts answered, so the fair budget is
datapoint-evaluations. Every search here gets `budget.datapoints` = F x 1,437 (the cost of F full
evaluations) and reports, at each F, the held-out accuracy of the member with the best training
accuracy:
- full M2N2 and top-up searches (`topup: archive`): the population's best, which is always a
  fully scored member (the search's own number);
- `topup: none`: the archive member with the highest *estimated* training mean; its test score
  is computed here, outside the budget (members are never fully scored in that mode).

One search per (variant, seed) runs to the largest F; the smaller F are read off on the way
(the search does not depend on where its budget ends). The serial in-process loop is used:
the engine's timing would blur the comparison (see staleness.py).

    python benchmarks/subsample.py                   # budgets 3k,10k,30k, 12 seeds, the full grid
    python benchmarks/subsample.py --seeds 3 --budgets 3000,10000 --variants full,f0.1,f0.1-none

The tiny-LM skills (populations/tiny-lm-skills.yaml without its DAM guide: plain M2N2 over the
two experts, 400 training prompts = one full evaluation; make the experts first with
`evomerge fixtures tiny-lm models/tiny-lm/`). Its target: subsampled M2N2 at a third of the
datapoint-evaluations reaches the held-out score full M2N2 has at the whole budget, so read
`test @ B/3` of a subsampled row against `test @ B` of `full`:

    python benchmarks/subsample.py --population tiny-lm-skills --budgets 100,300 --seeds 3 \
        --variants full,f0.1,f0.25,f0.1-whole
"""

from __future__ import annotations

import argparse
import os
import sys

from _common import REPO_ROOT, Job, fmt_mean_std, load_population, mean_std, pin_blas_threads, print_section, run_jobs, write_json

from evomerge.report import format_table

POPULATIONS = {  # name -> overrides that make the comparison plain M2N2
    "digits-scratch": {},
    "tiny-lm-skills": {"strategy.options.guide": None},
}
# name -> fitness.subsample (None: full M2N2); -whole: the rest in one top-up; -none: no top-up
VARIANTS = {
    "full": None,
    "f0.025": {"fraction": 0.025, "topup": "archive", "staged": True},
    "f0.05": {"fraction": 0.05, "topup": "archive", "staged": True},
    "f0.1": {"fraction": 0.1, "topup": "archive", "staged": True},
    "f0.25": {"fraction": 0.25, "topup": "archive", "staged": True},
    "f0.05-whole": {"fraction": 0.05, "topup": "archive", "staged": False},
    "f0.1-whole": {"fraction": 0.1, "topup": "archive", "staged": False},
    "f0.1-none": {"fraction": 0.1, "topup": "none"},
    "f0.25-none": {"fraction": 0.25, "topup": "none"},
}


def search(variant: str, seed: int, budgets: list[int], population_name: str = "digits-scratch") -> dict[str, object]:
    """Best-by-train test score at each budget (in full-evaluation equivalents)."""
    pin_blas_threads(1)
    import numpy as np

    from evomerge.engine.actors import build_population
    from evomerge.engine.worker import FitnessWorker

    subsample = VARIANTS[variant]
    n = datapoints_of(population_name)
    overrides: dict[str, object] = {**POPULATIONS[population_name], "seed": seed, "budget.evaluations": None,
                                    "budget.datapoints": max(budgets) * n}
    if subsample is not None:
        overrides["fitness.subsample"] = subsample
    config = load_population(population_name, overrides)
    population = build_population(config)
    worker = FitnessWorker(config.model_dump(mode="json"), 0)
    strategy = population.strategy
    marks = sorted(budgets)
    out: dict[str, object] = {"test": {}, "train": {}, "children": {}}  # children: evaluations (top-ups count)

    def note(mark: int) -> None:
        if subsample is not None and subsample["topup"] == "none":
            filled = strategy.ids >= 0
            means = np.where(filled, strategy.matrix.mean(axis=1), -np.inf)
            slot = int(np.argmax(means))
            params = worker.materialise(strategy.space.realise(strategy.genomes[slot]))
            test, train = worker.task.test_score(params), float(worker.task.evaluate(params).mean())
        else:
            best = population.best
            test, train = best.test_score, best.train_score
        out["test"][mark] = test
        out["train"][mark] = train
        out["children"][mark] = population.told

    while not population.done:  # run_local's serial loop, with the checkpoints read on the way
        child = population.ask()
        if child is None:
            break
        population.tell(worker.evaluate_one(child.member_id, child.genome, test_above=population.test_threshold(),
                                            job=population.job(child)))
        while marks and population.told_datapoints >= marks[0] * n:
            note(marks.pop(0))
    for mark in marks:  # the budget ended with less than a whole child left
        note(mark)
    out["topups"] = dict(getattr(strategy, "topup_counts", {}))
    return out


def datapoints_of(population_name: str) -> int:
    """One full evaluation's datapoints, from the population's data files (no model is built)."""
    from evomerge.engine.actors import build_population

    return int(build_population(load_population(population_name, {**POPULATIONS[population_name], "seed": 0}))
               .strategy.problem.num_datapoints)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", default="digits-scratch", choices=sorted(POPULATIONS))
    parser.add_argument("--budgets", default="3000,10000,30000", help="in full evaluations (digits: 1,437 datapoints)")
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", help="write the numbers as JSON")
    args = parser.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if args.population != "digits-scratch":
        os.chdir(REPO_ROOT)  # its seed and data paths are relative to the repo root
    n = datapoints_of(args.population)
    jobs = [Job((v, seed), f"{v} seed={seed}", search,
                {"variant": v, "seed": seed, "budgets": budgets, "population_name": args.population})
            for seed in range(args.seeds) for v in variants]
    results, errors = run_jobs(jobs, args.processes,
                               describe=lambda job, r: " ".join(f"{b}:{r['test'][b]:.3f}" for b in budgets))
    rows = []
    summary: dict[str, object] = {}
    for v in variants:
        runs = [results[(v, s)] for s in range(args.seeds) if (v, s) in results]
        row = [v, len(runs)]
        for b in budgets:
            row.append(fmt_mean_std([r["test"][b] for r in runs]))
        children = mean_std([r["children"][max(budgets)] for r in runs])[0]
        row.append("-" if children is None else f"{children:,.0f}")
        tops = [r["topups"] for r in runs if r["topups"]]
        kept = sum(t.get("kept", 0) for t in tops)
        asked = sum(t.get("asked", 0) for t in tops)
        row.append(f"{kept}/{asked}" if asked else "-")
        rows.append(tuple(row))
        summary[v] = {"runs": runs, "mean_test": {b: mean_std([r["test"][b] for r in runs])[0] for b in budgets}}
    print_section(f"Subsampled against full M2N2 on {args.population} at equal datapoint budgets "
                  f"(budgets in full evaluations of {n:,} datapoints; {args.seeds} seeds)")
    print(format_table(("variant", "seeds", *[f"test @ {label(b)}" for b in budgets],
                        f"evaluations @ {label(max(budgets))}", "top-ups kept/asked"), rows))
    if args.out:
        write_json(args.out, {"population": args.population, "budgets": budgets, "variants": summary})
    return 1 if errors else 0


def label(budget: int) -> str:
    return f"{budget // 1000}k" if budget % 1000 == 0 else str(budget)


if __name__ == "__main__":
    sys.exit(main())
