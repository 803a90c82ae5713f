"""Engine throughput on this machine, as ratios measured in one run.

1. digits-scratch: evaluations/s with 1 worker and with 2 (target ratio >= 1.6 on 2 cores);
2. the engine with 1 worker against a plain in-process loop of the same strategy (target >= 0.8);
3. a synthetic fitness that sleeps 50 ms: the engine's overhead per evaluation (target <= 5%).

Rates are steady-state (first result to last), so Ray's actor start-up is not counted; the whole
wall time is printed too. Optuna recording (journal file) is on, as in a real search.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import load_population, pin_blas_threads, print_section, start_ray, write_json

from evomerge.report import format_table


def in_process_rate(overrides: dict) -> dict:
    from evomerge.engine.local import run_local

    marks: list[tuple[float, int]] = []
    config = load_population("digits-scratch", overrides)
    start = time.perf_counter()
    run_local(config, on_record=lambda r: marks.append((time.perf_counter(), r.number + 1)))
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return {"mode": "in-process loop", "workers": 1, "rate": (n1 - n0) / (t1 - t0),
            "wall": time.perf_counter() - start, "evaluations": n1}


def engine_rate(population: str, overrides: dict, workers: int, out: Path) -> dict:
    import optuna

    from evomerge.engine.search import SearchOptions, run_search

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = load_population(population, {**overrides, "workers.count": workers})
    summary = run_search(config, SearchOptions(out_dir=out, progress=False, overwrite=True))
    return {"mode": f"ray engine ({population})", "workers": workers,
            "rate": summary["steady_evals_per_second"], "wall": summary["wall_seconds"],
            "evaluations": summary["evaluations"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evals", type=int, default=6000, help="evaluations per digits run")
    parser.add_argument("--sleep-evals", type=int, default=200, help="evaluations of the 50 ms task")
    parser.add_argument("--out", help="write the numbers as JSON")
    args = parser.parse_args(argv)
    pin_blas_threads(1)
    start_ray(num_cpus=2)
    digits = {"budget.evaluations": args.evals, "seed": 0}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        engine_rate("digits-scratch", {**digits, "budget.evaluations": 500}, 2, Path(tmp) / "warmup")
        local = in_process_rate(digits)
        one = engine_rate("digits-scratch", digits, 1, Path(tmp) / "w1")
        two = engine_rate("digits-scratch", digits, 2, Path(tmp) / "w2")
        rows += [local, one, two]
        sleep_cfg = Path(tmp) / "sleep.yaml"
        seconds = 0.05
        sleep_cfg.write_text(
            "name: sleep\nfitness: {task: synthetic_sleep, options: {seconds: %g}}\n"
            "budget: {evaluations: %d}\nworkers: {count: 2}\n" % (seconds, args.sleep_evals))
        sleep = engine_rate(str(sleep_cfg), {}, 2, Path(tmp) / "sleep")
        sleep_one = engine_rate(str(sleep_cfg), {}, 1, Path(tmp) / "sleep1")
        rows += [sleep_one, sleep]
    print_section("Throughput (steady state, evaluations per second)")
    print(format_table(("mode", "workers", "evaluations", "evals/s", "wall s"),
                       [(r["mode"], r["workers"], r["evaluations"], round(r["rate"], 1), round(r["wall"], 1))
                        for r in rows]))
    scaling = two["rate"] / one["rate"]
    vs_local = one["rate"] / local["rate"]
    ideal = 2 / seconds
    overhead = ideal / sleep["rate"] - 1
    sleep_scaling = sleep["rate"] / sleep_one["rate"]
    print()
    checks = [
        ("2 workers / 1 worker", scaling, scaling >= 1.6, ">= 1.6"),
        ("engine (1 worker) / in-process loop", vs_local, vs_local >= 0.8, ">= 0.8"),
        ("overhead per evaluation with a 50 ms fitness", overhead, overhead <= 0.05, "<= 5%"),
        ("2 workers / 1 worker with a 50 ms fitness", sleep_scaling, sleep_scaling >= 1.6, ">= 1.6"),
    ]
    for name, value, ok, target in checks:
        shown = f"{value:.1%}" if "overhead" in name else f"{value:.2f}x"
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {shown} (target {target})")
    if args.out:
        write_json(args.out, {"rows": rows, "scaling": scaling, "engine_vs_local": vs_local,
                              "sleep_overhead": overhead, "sleep_scaling": sleep_scaling})
    return 0


if __name__ == "__main__":
    sys.exit(main())
