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
"""

from __future__ import annotations

import argparse
import statistics
import sys

from _common import Job, fmt_mean_std, load_population, pin_blas_threads, print_section, run_jobs, write_json

from evomerge.report import format_table


def search_with_in_flight(in_flight: int, seed: int, evaluations: int) -> dict[str, float]:
    """Best member (by train score) of a digits-scratch search with `in_flight` children out."""
    pin_blas_threads(1)
    from evomerge.engine.local import run_local

    config = load_population("digits-scratch", {"budget.evaluations": evaluations, "seed": seed})
    population = run_local(config, in_flight=in_flight)
    best = population.best
    assert best is not None
    mean_staleness = population.staleness_total / max(1, population.staleness_count)
    return {"train": best.train_score, "test": best.test_score, "staleness": mean_staleness}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evals", type=int, help="evaluations per search (default 10000; --quick: 3000)")
    parser.add_argument("--seeds", type=int, help="seeds per K (default 12; --quick: 4)")
    parser.add_argument("--in-flight", default="1,48,200",
                        help="comma-separated K; 48 is about what 2 workers with `auto` batches keep out")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3k evaluations, 4 seeds")
    parser.add_argument("--out", help="write the numbers as JSON")
    args = parser.parse_args(argv)
    args.evals = args.evals or (3000 if args.quick else 10_000)
    args.seeds = args.seeds or (4 if args.quick else 12)
    levels = [int(k) for k in args.in_flight.split(",")]
    if any(k < 1 for k in levels):
        parser.error("--in-flight: every K must be >= 1 (1 is the serial search)")
    jobs = [Job((k, seed), f"K={k} seed={seed}", search_with_in_flight,
                {"in_flight": k, "seed": seed, "evaluations": args.evals})
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
