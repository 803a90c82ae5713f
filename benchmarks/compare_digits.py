"""M2N2 against CMA-ES, GA, DAM and static merges on digits, the published comparison.

From scratch (default 50,000 evaluations x 3 seeds): M2N2, CMA-ES (separable, pycma), GA.
The paper's figure shows M2N2 ~0.87 against CMA-ES ~0.86 and GA ~0.68.
From the two pretrained seeds (default 10,000 evaluations x 3 seeds): M2N2, CMA-ES (layer-wise
seed weights), DAM, M2N2 guided by DAM (hybrid), and the static merges (whole-model SLERP with t picked on training accuracy,
and the uniform soup).

Merge methods (`--merges`, on by default; `--merges-only` runs just this part): every static merge
method at mergekit's defaults and the best of a small grid (picked by train accuracy), against
M2N2 with and without `seed_with` (the 3 best static merges join its archive at the start), on
the pretrained seeds (seed 0 is the base of the methods that take one: the digits seeds share no
pretrained base, so their "task vectors" are seed 1 − seed 0).

Every job is the in-process search loop (the same strategies the engine runs), two at a time.
"""

from __future__ import annotations

import argparse
import sys

from _common import (Job, checkpoint_list, fmt_mean_std, print_section, run_jobs, run_local_checkpoints,
                     slerp_sweep, write_json)
from _static_grid import grid_specs, run_static_grid, summarise, top_specs

from evomerge.report import format_table

SCRATCH = {"m2n2": {}, "cmaes": {"strategy.name": "cmaes", "strategy.options": {}},
           "ga": {"strategy.name": "ga", "strategy.options": {"alpha": 0.0, "attraction": False}}}
PRETRAINED = {"m2n2": {}, "cmaes": {"strategy.name": "cmaes", "strategy.options": {}},
              "dam": {"strategy.name": "dam", "strategy.options": {"steps": 300, "eval_every": 10}},
              # hybrid: DAM guides M2N2 on 5% of the evaluations, its best joins the archive
              "m2n2+dam": {"strategy.options": {"mutation_sigma": 0.0, "guide": {
                  "from": "dam", "every": 500, "share": 0.05, "options": {"steps": 300, "eval_every": 10}}}}}
REFERENCE = {"m2n2": 0.87, "cmaes": 0.86, "ga": 0.68}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evals", type=int, default=50_000, help="from-scratch budget (pretrained: evals / 5)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--scratch", default=",".join(SCRATCH), help="from-scratch methods to run")
    parser.add_argument("--pretrained", default=",".join(PRETRAINED), help="pretrained methods to run")
    parser.add_argument("--quick", action="store_true", help="3,000 evaluations, 1 seed")
    parser.add_argument("--out", help="write the numbers as JSON")
    parser.add_argument("--merges", action=argparse.BooleanOptionalAction, default=True,
                        help="static merge methods vs M2N2 with/without seed_with")
    parser.add_argument("--merges-only", action="store_true", help="run only the merge-method comparison")
    parser.add_argument("--merge-evals", type=int, default=None, help="M2N2 budget there (default: pretrained budget)")
    args = parser.parse_args(argv)
    if args.quick:
        args.evals, args.seeds = 3000, 1
    pre_evals = max(100, args.evals // 5)
    if args.merges_only:
        return merge_methods(args.merge_evals or pre_evals, args.seeds, args.jobs, args.out)
    scratch_points = checkpoint_list(args.evals, [1000, 3000, 5000, 10000, 20000, 50000])
    pre_points = checkpoint_list(pre_evals, [1000, 2000, 5000, 10000])
    jobs = []
    for name in [m for m in args.scratch.split(",") if m]:
        for seed in range(args.seeds):
            jobs.append(Job(("scratch", name, seed), f"scratch {name} seed={seed}", run_local_checkpoints,
                            {"population": "digits-scratch", "checkpoints": scratch_points,
                             "overrides": {**SCRATCH[name], "seed": seed, "budget.evaluations": args.evals}}))
    for name in [m for m in args.pretrained.split(",") if m]:
        for seed in range(args.seeds):
            jobs.append(Job(("pretrained", name, seed), f"pretrained {name} seed={seed}", run_local_checkpoints,
                            {"population": "digits-pretrained", "checkpoints": pre_points,
                             "overrides": {**PRETRAINED[name], "seed": seed, "budget.evaluations": pre_evals}}))
    for seed in range(args.seeds):
        jobs.append(Job(("static", "slerp", seed), f"static slerp seed={seed}", slerp_sweep,
                        {"population": "digits-pretrained", "overrides": {"seed": seed}}))

    def describe(job: Job, result: dict) -> str:
        if "checkpoints" in result:
            last = result["checkpoints"][str(max(int(k) for k in result["checkpoints"]))]
            return f"test {last['best_test']:.4f}, {result['evals_per_second']:.0f} evals/s"
        return f"SLERP t={result['best_t']:.2f} test {result['best_test']:.4f}"

    results, errors = run_jobs(jobs, args.jobs, describe)
    tables = {}
    for phase, points, names in (("scratch", scratch_points, args.scratch), ("pretrained", pre_points, args.pretrained)):
        rows = []
        for name in [m for m in names.split(",") if m]:
            runs = [results.get((phase, name, s)) for s in range(args.seeds)]
            runs = [r for r in runs if r]
            cells = [fmt_mean_std([r["checkpoints"][str(p)]["best_test"] for r in runs if r["checkpoints"][str(p)]])
                     for p in points]
            ref = REFERENCE.get(name) if phase == "scratch" else None
            rows.append((name, *cells, "-" if ref is None else f"{ref:.2f}"))
        if phase == "pretrained":
            slerps = [results.get(("static", "slerp", s)) for s in range(args.seeds)]
            slerps = [r for r in slerps if r]
            if slerps:
                rows.append(("static: SLERP (t by train)", *(["-"] * (len(points) - 1)),
                             fmt_mean_std([r["best_test"] for r in slerps]), "-"))
                avg = [r["test"][len(r["grid"]) // 2] for r in slerps]
                rows.append(("static: uniform soup (t=0.5)", *(["-"] * (len(points) - 1)), fmt_mean_std(avg), "-"))
                for i in (0, 1):
                    rows.append((f"seed {i} alone", *(["-"] * (len(points) - 1)),
                                 fmt_mean_std([r["seeds"][i]["test"] for r in slerps]), "-"))
        tables[phase] = rows
        print_section(f"{phase}: test accuracy of the best-by-train member, mean ± std over {args.seeds} seed(s)")
        print(format_table(("method", *[f"{p}" for p in points], "paper"), rows))
    if errors:
        print(f"\n{len(errors)} job(s) failed: {', '.join(map(str, errors))}")
    if args.out:
        write_json(args.out, {"results": {"/".join(map(str, k)): v for k, v in results.items()}, "tables": tables})
    code = 1 if errors else 0
    if args.merges:
        code = max(code, merge_methods(args.merge_evals or pre_evals, args.seeds, args.jobs,
                                       args.out and args.out.replace(".json", "-merges.json")))
    return code


def merge_methods(evals: int, seeds: int, jobs: int, out: str | None, population: str = "digits-pretrained",
                  base_overrides: dict | None = None, top: int = 3, quick: bool = False, num_seeds: int = 2) -> int:
    """Static methods (defaults, best of grid) against M2N2 with and without seed_with."""
    overrides = dict(base_overrides or {})
    specs = grid_specs(num_seeds, quick=quick)
    grid_results, errors = run_jobs([Job(("grid",), f"static grid ({len(specs)} merges)", run_static_grid,
                                         {"population": population, "overrides": overrides, "specs": specs})],
                                    1, lambda job, r: f"{len(r['members'])} members in {r['wall_seconds']:.0f}s")
    if errors:
        print(f"static grid failed: {errors}")
        return 1
    grid = grid_results[("grid",)]
    rows = summarise(grid)
    seeded = top_specs(grid, specs, top)
    points = checkpoint_list(evals, [50, 100, 200, 500, 1000, 2000, 5000, 10000])
    arms = {"m2n2": {}, "m2n2+seed_with": {"strategy.options.seed_with": seeded}}
    m2n2_jobs = [Job((arm, s), f"{arm} seed={s}", run_local_checkpoints,
                     {"population": population, "checkpoints": points,
                      "overrides": {**overrides, **extra, "seed": s, "budget.evaluations": evals}})
                 for arm, extra in arms.items() for s in range(seeds)]
    results, errors = run_jobs(m2n2_jobs, jobs, lambda job, r: f"{r['evaluations']} evals")
    print_section("static merge methods: test score at mergekit's defaults and at the best-by-train grid point")
    table = []
    for r in sorted(rows, key=lambda r: -(r["best"]["train"] if r["best"] else -1)):
        d, b = r["default"], r["best"]

        def cell(m, key):
            return "-" if m is None or m.get(key) is None else f"{m[key]:.4f}"
        table.append((r["method"], cell(d, "train"), cell(d, "test"), cell(b, "train"), cell(b, "test"),
                      "-" if b is None else b["label"], r["failed"] or ""))
    print(format_table(("method", "default train", "default test", "best train", "best test", "best point", "failed"),
                       table))
    statics = [m for m in grid["members"] if m["index"] >= 0 and m["train"] is not None]
    best_static = max(statics, key=lambda m: m["train"]) if statics else None
    print_section(f"M2N2 vs the best static merge ({best_static['label'] if best_static else '-'}: "
                  f"test {best_static['test']:.4f}); seed_with = {[_label(s) for s in seeded]}"
                  if best_static else "M2N2 (no static merge succeeded)")
    m_rows = []
    for arm in arms:
        runs = [results.get((arm, s)) for s in range(seeds)]
        runs = [r for r in runs if r]
        m_rows.append((arm, *[fmt_mean_std([r["checkpoints"][str(p)]["best_test"] for r in runs
                                            if r["checkpoints"][str(p)]]) for p in points]))
    if best_static:
        m_rows.append(("best static (by train)", *(["-"] * (len(points) - 1)), f"{best_static['test']:.4f}"))
    print(format_table(("method", *[str(p) for p in points]), m_rows))
    if out:
        write_json(out, {"grid": grid, "specs": specs, "seed_with": seeded,
                         "m2n2": {"/".join(map(str, k)): v for k, v in results.items()}})
    return 1 if errors else 0


def _label(spec: dict) -> str:
    from evomerge.strategies.merge_specs import MergeSpec

    return MergeSpec.model_validate(spec).label()


if __name__ == "__main__":
    sys.exit(main())
