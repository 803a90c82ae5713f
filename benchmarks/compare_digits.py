"""M2N2 against CMA-ES, GA, DAM and static merges on digits, the published comparison.

From scratch (default 50,000 evaluations x 3 seeds): M2N2, CMA-ES (separable, pycma), GA.
The paper's figure shows M2N2 ~0.87 against CMA-ES ~0.86 and GA ~0.68.
From the two pretrained seeds (default 10,000 evaluations x 3 seeds): M2N2, CMA-ES (layer-wise
seed weights), DAM, M2N2 guided by DAM (hybrid), and the static merges (whole-model SLERP with t picked on training accuracy,
and the uniform soup).

Every job is the in-process search loop (the same strategies the engine runs), two at a time.
"""

from __future__ import annotations

import argparse
import sys

from _common import (Job, checkpoint_list, fmt_mean_std, print_section, run_jobs, run_local_checkpoints,
                     slerp_sweep, write_json)

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
    args = parser.parse_args(argv)
    if args.quick:
        args.evals, args.seeds = 3000, 1
    pre_evals = max(100, args.evals // 5)
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
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
