"""Time per candidate of the `lm_eval` fitness task against the native LM tasks, same prompts and model.

Pairs (same JSONL prompts, same bound model, same batch size, one torch thread):
  generative:  lm_exact_match (max_new_tokens 8)            vs lm_eval tiny_skills_gen (generate_until, 8 tokens)
  likelihood:  lm_answer_likelihood (include_eos: false)    vs lm_eval tiny_skills_ll (loglikelihood, acc)
Each task scores the same candidate (expert_add's weights) `--reps` times after one warm-up; the
median is the time per candidate. Target (issue 15): lm_eval at most 1.5x the native task.
Then one lm_eval evaluation per pair runs under cProfile to show where its time goes: the model
(HFLM's generate / forward calls), building the requests, filters and metrics, and the rest.

Models: models/tiny-lm (`evomerge fixtures tiny-lm models/tiny-lm`) when present, else the
fixture's small "test" scale made in a temporary folder (`--scale test` forces that).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO_ROOT, pin_blas_threads

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TASKS_DIR = REPO_ROOT / "fitness" / "lm_eval_tasks"

# profile buckets: (label, function-name suffixes matched against "file:function")
BUCKETS = [
    ("model: generate", ("huggingface.py:_model_generate",)),
    ("model: forward (loglikelihood)", ("huggingface.py:_model_call",)),
    ("building requests", ("task.py:build_all_requests",)),
    ("filters", ("task.py:apply_filters",)),
    ("metrics (process_results)", ("task.py:process_results",)),
    ("tokenising (tok_encode/tok_batch_encode)", ("huggingface.py:tok_encode", "huggingface.py:tok_batch_encode")),
]


def median_seconds(fns, reps: int) -> list[float]:
    """Median seconds per call of each function, calls interleaved so drifting load hits all alike."""
    for fn in fns:
        fn()  # warm-up: the model is built, HFLM wrapped, requests and token ids memoised
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def profile_buckets(fn) -> tuple[float, list[tuple[str, float]]]:
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.runcall(fn)
    total = time.perf_counter() - start
    stats = pstats.Stats(prof).stats  # {(file, line, func): (cc, nc, tt, ct, callers)}
    out = []
    for label, names in BUCKETS:
        cum = 0.0
        for (file, _, func), (_, _, _, ct, _) in stats.items():
            key = f"{Path(file).name}:{func}"
            if key in names:
                cum += ct
        out.append((label, cum))
    return total, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=100, help="prompts per skill (add, rev)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--scale", choices=["auto", "test"], default="auto")
    parser.add_argument("--models", type=Path, default=REPO_ROOT / "models" / "tiny-lm",
                        help="folder with base, expert_add (from `evomerge fixtures tiny-lm`)")
    args = parser.parse_args()
    pin_blas_threads(1)
    import torch

    torch.set_num_threads(1)
    from evomerge.fixtures.tiny_lm import make_tiny_lm
    from evomerge.tasks import build_task
    from fitness.lm_tasks import flat_params_of

    shipped = args.models
    tmp = None
    if args.scale == "auto" and (shipped / "expert_add").is_dir():
        models, data, scale = shipped, REPO_ROOT / "fitness" / "data", str(shipped)
    else:
        tmp = tempfile.TemporaryDirectory()
        root = Path(tmp.name)
        make_tiny_lm(root / "models", scale="test", seed=0, data_dir=root / "data")
        models, data, scale = root / "models", root / "data", "fixture scale 'test' (hidden 32, 2 layers)"
    params = flat_params_of(models / "expert_add")
    files = [str(data / "add_train.jsonl"), str(data / "rev_train.jsonl")]
    common = {"model": str(models / "base"), "batch_size": args.batch_size, "threads": 1}
    lm_eval_common = {**common, "include_path": str(TASKS_DIR), "metadata": {"data_dir": str(data)},
                      "limit": args.limit}
    pairs = [
        ("generative", build_task("lm_exact_match", {**common, "data": files, "limit": args.limit,
                                                     "max_new_tokens": 8}),
         build_task("lm_eval", {**lm_eval_common, "tasks": ["tiny_skills_gen"]})),
        ("likelihood", build_task("lm_answer_likelihood", {**common, "data": files, "limit": args.limit,
                                                           "include_eos": False}),
         build_task("lm_eval", {**lm_eval_common, "tasks": ["tiny_skills_ll"]})),
    ]
    print(f"models: {scale}; {2 * args.limit} prompts per candidate; batch {args.batch_size}; 1 thread; "
          f"median of {args.reps}")
    worst = 0.0
    for label, native, ours in pairs:
        assert native.num_datapoints == ours.num_datapoints
        t_native, t_ours = median_seconds([lambda: native.evaluate(params), lambda: ours.evaluate(params)],
                                          args.reps)
        ratio = t_ours / t_native
        worst = max(worst, ratio)
        mean_native = float(native.evaluate(params).mean())
        mean_ours = float(ours.evaluate(params).mean())
        print(f"\n{label}: native {t_native * 1e3:.1f} ms/candidate (mean score {mean_native:.3f}), "
              f"lm_eval {t_ours * 1e3:.1f} ms/candidate (mean score {mean_ours:.3f}); ratio {ratio:.2f}x "
              f"({'within' if ratio <= 1.5 else 'ABOVE'} the 1.5x target)")
        total, buckets = profile_buckets(lambda: ours.evaluate(params))
        print(f"  where lm_eval's time goes (one profiled evaluation, {total * 1e3:.1f} ms under cProfile):")
        for name, seconds in buckets + [("rest (lm-eval's Python, logging samples)", total - sum(b for _, b in buckets))]:
            if seconds > 0:
                print(f"    {name:<42} {seconds * 1e3:8.1f} ms  {100 * seconds / total:5.1f}%")
    print(f"\nworst ratio: {worst:.2f}x (target <= 1.5x)")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
