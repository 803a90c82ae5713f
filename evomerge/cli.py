"""`evomerge` command line: search, resume, status, export, merge, compare, dashboard."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

from evomerge.errors import EvomergeError


def _search(args: argparse.Namespace) -> int:
    from evomerge.config import load_config
    from evomerge.engine.search import SearchOptions, run_search

    overrides: dict[str, Any] = {}
    if args.budget is not None:
        overrides["budget.evaluations"] = args.budget
    if getattr(args, "budget_datapoints", None) is not None:
        overrides["budget.datapoints"] = args.budget_datapoints
    if args.workers is not None:
        overrides["workers.count"] = args.workers
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.sync:
        overrides["sync"] = True
    if args.storage is not None:
        overrides["optuna.storage"] = args.storage
    config = load_config(args.config, overrides)
    out_dir = Path(args.out) if args.out else Path("runs") / config.name
    summary = run_search(config, SearchOptions(out_dir=out_dir, address=args.address, progress=not args.quiet,
                                               overwrite=args.overwrite, handle_signals=True))
    _print_outcome(summary, out_dir)
    return 0


def _resume(args: argparse.Namespace) -> int:
    from evomerge.engine.search import SearchOptions, resume_search

    out_dir = Path(args.run)
    summary = resume_search(out_dir, SearchOptions(out_dir=out_dir, address=args.address, progress=not args.quiet,
                                                   handle_signals=True),
                            budget=args.budget, force=args.force, budget_datapoints=args.budget_datapoints)
    _print_outcome(summary, out_dir)
    return 0


def _status(args: argparse.Namespace) -> int:
    from evomerge.status import run_status, status_table

    print(status_table(run_status(Path(args.run))))
    return 0


def _print_outcome(summary: dict[str, Any], out_dir: Path) -> None:
    from evomerge.report import summary_table

    print(summary_table(summary))
    best = summary.get("best") or {}
    if best.get("test_score") is not None:
        print(f"\nbest test accuracy: {best['test_score']:.4f} (member {best['member_id']})")
    if best.get("train_scores"):
        print("one Optuna objective per group (the dashboard shows their Pareto front)")
    print(f"results: {out_dir}/summary.json, best member: {out_dir}/best.safetensors")
    print(f"dashboard: evomerge dashboard {shlex.quote(str(out_dir))}")


def _export(args: argparse.Namespace) -> int:
    from evomerge.export import export_best

    for path in export_best(Path(args.run), Path(args.out), dtype=args.dtype, progress=sys.stderr.isatty()):
        print(f"wrote {path}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from evomerge.merging import run_merge

    out = run_merge(Path(args.config), Path(args.out), allow_pickle=args.allow_pickle)
    print(f"wrote {out} (load it with transformers' from_pretrained)")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from evomerge.compare import run_compare

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    out = Path(args.out) if args.out else Path("runs") / f"compare-{Path(args.config).stem}"
    run_compare(Path(args.config), strategies, args.budget, args.seeds, out, address=args.address,
                progress=not args.quiet, budget_datapoints=args.budget_datapoints)
    print(f"wrote {out}/compare.md, compare.csv, compare.png")
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    from evomerge.tracking.dashboard import serve

    serve(Path(args.run), host=args.host, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description="Evolutionary model-merge search.")
    sub = parser.add_subparsers(dest="command", required=True)

    search = sub.add_parser("search", help="run a search from a YAML definition")
    search.add_argument("config", help="populations/NAME.yaml")
    search.add_argument("--budget", type=int, help="total evaluations (overrides budget.evaluations)")
    search.add_argument("--budget-datapoints", type=int, help="total datapoint-evaluations (budget.datapoints)")
    search.add_argument("--workers", type=int, help="fitness workers (overrides workers.count)")
    search.add_argument("--seed", type=int, help="random seed (overrides seed)")
    search.add_argument("--sync", action="store_true", help="fixed evaluation order: reproducible search")
    search.add_argument("--out", help="run folder (default runs/NAME)")
    search.add_argument("--address", help="join a running Ray cluster ('auto' or host:port)")
    search.add_argument("--storage", help="Optuna storage URL (default: journal file in the run folder)")
    search.add_argument("--overwrite", action="store_true", help="replace an earlier search in the run folder")
    search.add_argument("--quiet", action="store_true", help="no progress bar")
    search.set_defaults(func=_search)

    resume = sub.add_parser("resume", help="continue a search from its newest valid snapshot")
    resume.add_argument("run", help="run folder, e.g. runs/digits-scratch")
    resume.add_argument("--budget", type=int, help="new total evaluation budget")
    resume.add_argument("--budget-datapoints", type=int, help="new total datapoint budget (budget.datapoints)")
    resume.add_argument("--force", action="store_true", help="resume even if config.json changed")
    resume.add_argument("--address", help="join a running Ray cluster ('auto' or host:port)")
    resume.add_argument("--quiet", action="store_true", help="no progress bar")
    resume.set_defaults(func=_resume)

    status = sub.add_parser("status", help="table of a run's progress (running, interrupted or finished)")
    status.add_argument("run", help="run folder")
    status.set_defaults(func=_status)

    export = sub.add_parser("export", help="write a run's best member in its loadable form")
    export.add_argument("run", help="run folder")
    export.add_argument("out", help="output folder")
    export.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="dtype of the written weights; auto (default): as the seeds are")
    export.set_defaults(func=_export)

    merge = sub.add_parser("merge", help="one-shot static merge from a mergekit-style YAML")
    merge.add_argument("config", help="merge config: merge_method, base_model, models, parameters, dtype")
    merge.add_argument("out", help="output Hugging Face folder")
    merge.add_argument("--allow-pickle", action="store_true",
                       help="accept .bin checkpoints (loaded with weights_only=True)")
    merge.set_defaults(func=_merge)

    compare = sub.add_parser("compare", help="run several strategies on one task and budget, side by side")
    compare.add_argument("config", help="a search definition (task, seeds)")
    compare.add_argument("--strategies", default="m2n2,ga", help="comma-separated, e.g. m2n2,ga,cmaes,dam,static")
    compare.add_argument("--budget", type=int, help="evaluations per run")
    compare.add_argument("--budget-datapoints", type=int,
                         help="datapoint-evaluations per run; the plot's x axis becomes datapoint-evaluations")
    compare.add_argument("--seeds", type=int, default=3, help="runs per strategy (seeds 0..S-1)")
    compare.add_argument("--out", help="output folder (default runs/compare-CONFIG)")
    compare.add_argument("--address", help="join a running Ray cluster")
    compare.add_argument("--quiet", action="store_true")
    compare.set_defaults(func=_compare)

    from evomerge.fixtures import synthetic_llama, tiny_lm

    fixtures = sub.add_parser("fixtures", help="make small local artefacts (tiny models and their task data)")
    fixture_sub = fixtures.add_subparsers(dest="fixture", required=True)
    tiny = fixture_sub.add_parser("tiny-lm", help="train a tiny Llama base + add/rev experts on the CPU (~1.5-3 min)")
    tiny_lm.add_arguments(tiny).set_defaults(func=tiny_lm.run)
    synth = fixture_sub.add_parser("synthetic-llama",
                                   help="write a large synthetic Llama base + experts (sharded, bf16), no download")
    synthetic_llama.add_arguments(synth).set_defaults(func=synthetic_llama.run)

    dash = sub.add_parser("dashboard", help="serve optuna-dashboard for a run")
    dash.add_argument("run", help="run folder, e.g. runs/digits-scratch")
    dash.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    dash.add_argument("--port", type=int, default=8080)
    dash.set_defaults(func=_dashboard)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import optuna

    from evomerge.engine.interrupts import EXIT_INTERRUPTED, Interrupted

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own progress bar and tables say it
    try:
        return args.func(args)
    except EvomergeError as exc:
        print(f"evomerge: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted:
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # before the search loop took over Ctrl-C: nothing to snapshot yet
        print("\nevomerge: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
