"""DAM guiding M2N2 on the tiny-LM skills: DAM's training on a thread against inside ask().

The population actor is single-threaded. When DAM trains inside ask() (`background: false`), no
child goes out until the chunk is done, and the workers drain their queues. A chunk of 10 Adam
steps takes about 2 s on the tiny Llama. On a thread (the default in async mode) the actor goes on
dispatching.

Inline, the workers idle for most of each chunk: their queues hold about 1 s of work. How much a
thread gives back depends on the cores that are free for the training:
- Target: a thread gives >= 1.2x the inline rate with 1 worker. On this 2-core machine the actor
  then has a core of its own, as on a cluster, where the population actor runs beside the
  workers and not on their cores.
- 2 workers are also run and printed. There the thread competes with the workers for the 2 cores.

Each pair alternates inline and thread runs of `populations/tiny-lm-skills.yaml` (its guide made
to train `--steps` steps, in the population actor: `train_on: population`, since on a worker a
chunk always runs inline), and the ratio is taken of the summed steady rates. Needs the models:
`evomerge fixtures tiny-lm models/tiny-lm`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _common import load_population, pin_blas_threads, print_section, start_ray, write_json

from evomerge.report import format_table

TARGET = 1.2


def guided(background: bool, workers: int, budget: int, steps: int):
    guide = {"from": "dam", "every": 50, "share": 0.25,
             "options": {"steps": steps, "eval_every": 10, "background": background,
                         "train_on": "population"}}  # the thread is the population actor's (on a worker: inline)
    return load_population("tiny-lm-skills", {
        "budget.evaluations": budget, "workers.count": workers, "snapshots.every": 100_000,
        "strategy.options": {"archive_size": 20, "mutation_sigma": 0.0, "guide": guide}})


def run(config) -> float:
    from evomerge.engine.search import SearchOptions, run_search

    with tempfile.TemporaryDirectory() as tmp:
        summary = run_search(config, SearchOptions(out_dir=Path(tmp) / "run", progress=False))
    return float(summary["steady_evals_per_second"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=100, help="evaluations per run")
    parser.add_argument("--steps", type=int, default=200, help="DAM's Adam steps (10 per offered merge)")
    parser.add_argument("--repeats", type=int, default=1, help="inline/thread pairs per worker count")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON")
    args = parser.parse_args()
    pin_blas_threads(1)
    start_ray(num_cpus=2)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows, results = [], {}
    for workers in (1, 2):
        sums = {False: 0.0, True: 0.0}
        for _ in range(args.repeats):
            for background in (False, True):
                rate = run(guided(background, workers, args.budget, args.steps))
                sums[background] += rate
                rows.append((workers, "thread" if background else "inline", args.budget, round(rate, 3)))
        results[workers] = sums[True] / sums[False]
    print_section("DAM-guided tiny-LM search (steady state, evaluations per second)")
    print(format_table(("workers", "DAM trains", "evaluations", "evals/s"), rows))
    print()
    print(f"thread / inline, 2 workers (the training shares their 2 cores): {results[2]:.2f}x")
    verdict = "PASS" if results[1] >= TARGET else "FAIL"
    print(f"{verdict}  thread / inline, 1 worker: {results[1]:.2f}x (target >= {TARGET})")
    if args.out:
        write_json(args.out, {"rows": rows, "ratio_1_worker": results[1], "ratio_2_workers": results[2]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
