"""What staleness costs a search: M2N2 on digits with K children in flight, in one process.

In an async search a child is bred from the archive as it stood at its ask and competes when its
score comes back; meanwhile the other children in flight are told. With K in flight, K - 1
evaluations are told in between (the staleness `evomerge status` shows). Its size follows from
`workers.count` x `workers.pipeline` x `workers.batch`, and bigger calls cost the population
actor less CPU per evaluation, so this is the price on the other side of that trade.

The engine's timing would blur the comparison, so the search runs here in one process
(`run_local(..., in_flight=K)`): ask until K children are queued, score the oldest, tell it,
repeat. K = 1 is the serial search. Searches on digits from scratch sometimes stall far below the
rest, so every K runs the same seeds and the per-seed results are printed sorted, beside the mean.

    python benchmarks/staleness.py                    # 10k evaluations, 12 seeds, K = 1, 48, 200
    python benchmarks/staleness.py --quick            # 3k evaluations, 4 seeds
    python benchmarks/staleness.py --llm              # LLM budgets: 1k and 3k evaluations, K = 1, 8, 16, 32

At LLM budgets (an evaluation takes seconds, so a search gets a few thousand) the question is
what a few workers' children in flight cost; `workers.pipeline: auto` keeps one call per worker
there (a child is asked when a worker frees up), so K is about the number of workers.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from _common import Job, fmt_mean_std, load_population, pin_blas_threads, print_section, run_jobs, write_json

from evomerge.report import format_table


def search_with_in_flight(in_flight: int, seed: int, evaluations: int,
                          checkpoints: list[int] | None = None) -> dict[str, object]:
    """Best member (by train score) of a digits-scratch search with `in_flight` children out, at
    the end and at each checkpoint on the way (the search does not depend on where it ends)."""
    pin_blas_threads(1)
    from evomerge.engine.local import run_local

    marks = set(checkpoints or [])
    at: dict[int, dict[str, float]] = {}

    def note(record) -> None:
        if record.number + 1 in marks:
            at[record.number + 1] = {"train": record.best_train, "test": record.best_test}

    config = load_population("digits-scratch", {"budget.evaluations": evaluations, "seed": seed})
    population = run_local(config, in_flight=in_flight, on_record=note)
    best = population.best
    assert best is not None
    mean_staleness = population.staleness_total / max(1, population.staleness_count)
    return {"train": best.train_score, "test": best.test_score, "staleness": mean_staleness, "at": at}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evals", help="evaluations per search, comma-separated for several budgets "
                                        "(default 10000; --quick: 3000; --llm: 1000,3000)")
    parser.add_argument("--seeds", type=int, help="seeds per K (default 12; --quick: 4)")
    parser.add_argument("--in-flight", default="1,48,200",
                        help="comma-separated K; 48 is about what 2 workers with `auto` batches keep out")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3k evaluations, 4 seeds")
    parser.add_argument("--llm", action="store_true", help="LLM budgets: 1k and 3k evaluations, K = 1, 8, 16, 32")
    parser.add_argument("--out", help="write the numbers as JSON")
    args = parser.parse_args(argv)
    if args.llm and args.in_flight == "1,48,200":
        args.in_flight = "1,8,16,32"
    budgets = sorted(int(b) for b in (args.evals or ("1000,3000" if args.llm else "3000" if args.quick
                                                     else "10000")).split(","))
    args.evals = budgets[-1]
    args.seeds = args.seeds or (4 if args.quick else 12)
    levels = [int(k) for k in args.in_flight.split(",")]
    if any(k < 1 for k in levels):
        parser.error("--in-flight: every K must be >= 1 (1 is the serial search)")
    jobs = [Job((k, seed), f"K={k} seed={seed}", search_with_in_flight,
                {"in_flight": k, "seed": seed, "evaluations": args.evals, "checkpoints": budgets})
            for seed in range(args.seeds) for k in levels]
    results, errors = run_jobs(jobs, args.processes,
                               describe=lambda job, r: f"best train {r['train']:.3f} test {r['test']:.3f}")
    rows, summary = [], {}
    for k in levels:
        runs = [results[(k, seed)] for seed in range(args.seeds) if (k, seed) in results]
        trains = sorted(r["train"] for r in runs)
        summary[k] = {"runs": runs, "mean_test": statistics.fmean(r["test"] for r in runs) if runs else None}
        rows.append((k, f"{statistics.fmean(r['staleness'] for r in runs):.1f}" if runs else "-", len(runs),
                     fmt_mean_std([r["test"] for r in runs]), fmt_mean_std([r["train"] for r in runs]),
                     " ".join(f"{t:.2f}" for t in trains)))
    print_section(f"Staleness against search quality (digits from scratch, {args.evals} evaluations)")
    print(format_table(("in flight", "staleness", "seeds", "best test", "best train", "best train per seed, sorted"),
                       rows))
    if len(budgets) > 1:
        rows = []
        for k in levels:
            runs = [results[(k, seed)] for seed in range(args.seeds) if (k, seed) in results]
            rows.append((k, *[fmt_mean_std([r["at"][b]["test"] for r in runs]) for b in budgets]))
        print_section("Best test accuracy at each budget")
        print(format_table(("in flight", *[f"test @ {b}" for b in budgets]), rows))
        base = {b: [results[(1, s)]["at"][b]["test"] for s in range(args.seeds) if (1, s) in results] for b in budgets}
        for k in levels:
            if k == 1:
                continue
            runs = [results[(k, s)] for s in range(args.seeds) if (k, s) in results]
            cost = [f"{statistics.fmean(r['at'][b]['test'] for r in runs) - statistics.fmean(base[b]):+.3f} @ {b}"
                    for b in budgets if runs and base[b]]
            print(f"K={k}: mean best test against the serial search: {', '.join(cost)}")
    serial = summary.get(1, {}).get("mean_test")
    if serial:
        print()
        for k in levels:
            if k != 1 and summary[k]["mean_test"] is not None:
                print(f"K={k}: mean best test {summary[k]['mean_test'] - serial:+.3f} against the serial search")
    if args.out:
        write_json(args.out, {"evaluations": args.evals, "levels": summary})
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
