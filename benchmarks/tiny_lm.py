"""M2N2 on the tiny-LM skills: the experts, the static merges and the evolved merge, per skill.

Each model is scored by greedy exact match on each skill's held-out set (add_test, rev_test) on
its own: the two experts and their base; the static merges made with `evomerge merge` from
mergekit-style YAMLs (linear 0.5/0.5, slerp t=0.5, task arithmetic against the base with weights
1.0 and with 0.5, ties against the base at density 0.5); and M2N2's best-by-train member after N
evaluations of populations/tiny-lm-skills.yaml, run in-process. That population lets DAM guide
M2N2 (DAM's merge joins the archive as a third basis element); the ablation row is the same
search with the guide removed.

Targets (from the issue): the merged model keeps at least 90% of each expert's own held-out
accuracy on both skills, and its mean beats every static baseline's mean.

Needs the models: `evomerge fixtures tiny-lm models/tiny-lm`. The M2N2 search and the static
merges run side by side (two processes), one BLAS thread each. Exit code 0 unless a job crashed;
a missed target is a FAIL line, not an error.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import (REPO_ROOT, Job, fmt_seconds, load_population, pin_blas_threads, print_section, run_jobs,
                     timer, write_json)

from evomerge.report import format_table

POPULATION = "tiny-lm-skills"
SKILLS = ("add", "rev")
EXPERTS = {"add": "expert_add", "rev": "expert_rev"}
RATIO = 0.9  # the merged model keeps at least this share of each expert's own held-out accuracy


def _models_dir(config) -> Path:
    """models/tiny-lm/: the folder of the population's base model (base, expert_add, expert_rev)."""
    from fitness.lm_data import resolve

    return resolve(config.fitness.options["model"], kind="dir").parent


def static_configs(models: Path) -> dict[str, dict[str, Any]]:
    """The static baselines as mergekit-style configs (absolute paths, so the YAML can live anywhere)."""
    base, add, rev = (str(models / n) for n in ("base", "expert_add", "expert_rev"))
    both = lambda **p: [{"model": add, "parameters": dict(p)}, {"model": rev, "parameters": dict(p)}]  # noqa: E731
    return {
        "linear 0.5/0.5": {"merge_method": "linear", "models": both(weight=0.5)},
        "slerp t=0.5": {"merge_method": "slerp", "base_model": add,
                        "models": [{"model": add}, {"model": rev}], "parameters": {"t": 0.5}},
        "task arithmetic w=1.0": {"merge_method": "task_arithmetic", "base_model": base, "models": both(weight=1.0)},
        "task arithmetic w=0.5": {"merge_method": "task_arithmetic", "base_model": base, "models": both(weight=0.5)},
        "ties d=0.5": {"merge_method": "ties", "base_model": base, "models": both(weight=1.0, density=0.5)},
    }


class SkillScorer:
    """One exact-match task per skill (the population's fitness options, that skill's files only)."""

    def __init__(self, config) -> None:
        from fitness.lm_tasks import LMExactMatchTask

        opts = dict(config.fitness.options)
        self.tasks = {}
        for skill in SKILLS:
            train = [f for f in opts["data"] if Path(f).name.startswith(f"{skill}_")]
            test = [f for f in opts["test_data"] if Path(f).name.startswith(f"{skill}_")]
            if len(train) != 1 or len(test) != 1:
                raise ValueError(f"expected one {skill}_ train and test file in the population, got {train}, {test}")
            self.tasks[skill] = LMExactMatchTask({**opts, "data": train, "test_data": test}, seed=config.seed)
        self.layout = self.tasks[SKILLS[0]].layout

    def flat_of(self, folder: Path):
        """A checkpoint folder as a flat vector in the task's layout (by tensor name, not file order)."""
        from evomerge.models import open_checkpoint, read_flat

        with open_checkpoint(folder) as ckpt:
            return read_flat(ckpt, self.layout).numpy()

    def score(self, params) -> dict[str, float]:
        out = {skill: float(task.test_score(params)) for skill, task in self.tasks.items()}
        out["train"] = {skill: float(task.evaluate(params).mean()) for skill, task in self.tasks.items()}
        return out


def static_job(population: str, threads: int = 1) -> dict[str, Any]:
    """Base, experts and the static merges (written with `evomerge merge` to a temp dir), per skill."""
    pin_blas_threads(threads)
    import yaml

    from evomerge.merging import run_merge

    config = load_population(population)
    models = _models_dir(config)
    with timer() as t:
        scorer = SkillScorer(config)
        rows: dict[str, Any] = {}
        for name in ("base", "expert_add", "expert_rev"):
            rows[name] = scorer.score(scorer.flat_of(models / name))
        errors: dict[str, str] = {}
        with tempfile.TemporaryDirectory(prefix="tiny-lm-static-") as tmp:
            for i, (name, cfg) in enumerate(static_configs(models).items()):
                path = Path(tmp) / f"merge{i}.yml"
                path.write_text(yaml.safe_dump(cfg, sort_keys=False))
                try:
                    out = run_merge(path, Path(tmp) / f"merge{i}")
                    rows[name] = scorer.score(scorer.flat_of(out))
                except Exception as exc:  # one broken method should not hide the others
                    errors[name] = f"{type(exc).__name__}: {exc}"
    return {"rows": rows, "errors": errors, "configs": static_configs(models), "wall_seconds": t["seconds"]}


def m2n2_job(population: str, evals: int, seed: int, threads: int = 1, plain: bool = False) -> dict[str, Any]:
    """run_local for `evals` evaluations, then the best-by-train member scored per skill.

    `plain`: the population's M2N2 with its guide removed (the ablation)."""
    pin_blas_threads(threads)
    from evomerge.engine.basis_spec import checkpoint_basis
    from evomerge.engine.local import run_local
    from evomerge.genomes.recipe import Recipe

    overrides: dict[str, Any] = {"budget.evaluations": evals, "seed": seed}
    if plain:
        overrides["strategy.options.guide"] = None
    config = load_population(population, overrides)
    failed = 0

    def on_record(record) -> None:
        nonlocal failed
        failed += int(record.failed)

    with timer() as t:
        pop = run_local(config, on_record)
    search_seconds = t["seconds"]
    if pop.best is None:
        raise RuntimeError(f"no successful evaluation in {pop.told} ({failed} failed)")
    genome = pop.best.genome
    if not isinstance(genome, Recipe):
        raise TypeError(f"expected the M2N2 best to be a Recipe, got {type(genome).__name__}")
    scorer = SkillScorer(config)
    basis = checkpoint_basis([str(s) for s in config.seeds], allow_pickle=config.allow_pickle)
    for element in pop.basis_elements:  # merged models the guide added to the basis
        basis.add_element(element.materialise(basis))
    params = basis.materialise(genome).numpy()
    scores = scorer.score(params)
    return {"scores": scores, "evaluations": pop.told, "failed": failed, "search_seconds": search_seconds,
            "evals_per_second": pop.told / search_seconds if search_seconds else None,
            "best": {"member_id": pop.best.member_id, "train_score": pop.best.train_score,
                     "test_score": pop.best.test_score, "generation": pop.best.generation},
            "recipe": {"breaks": genome.breaks.tolist(), "coeffs": genome.coeffs.tolist()},
            "basis_elements": len(pop.basis_elements), "seed": seed}


def _mean(scores: dict[str, Any]) -> float:
    return sum(scores[s] for s in SKILLS) / len(SKILLS)


def check_targets(label: str, s: dict[str, Any], static: dict[str, Any]) -> dict[str, bool]:
    """Print PASS/FAIL for the issue's two targets for one searched merge."""
    experts = static["rows"]
    need = {skill: RATIO * experts[EXPERTS[skill]][skill] for skill in SKILLS}
    keeps = all(s[skill] >= need[skill] for skill in SKILLS)
    baselines = {n: _mean(v) for n, v in experts.items() if n not in ("base", *EXPERTS.values())}
    best_static = max(baselines.items(), key=lambda kv: kv[1]) if baselines else None
    beats = best_static is not None and _mean(s) > best_static[1] and not static["errors"]
    detail = ", ".join(f"{skill} {s[skill]:.3f} vs {need[skill]:.3f} (0.9 × {EXPERTS[skill]} "
                       f"{experts[EXPERTS[skill]][skill]:.3f})" for skill in SKILLS)
    print(f"{'PASS' if keeps else 'FAIL'}  {label} keeps >= 90% of each expert on its skill: {detail}")
    if best_static is not None:
        extra = f"; static merges that failed: {', '.join(static['errors'])}" if static["errors"] else ""
        print(f"{'PASS' if beats else 'FAIL'}  {label} mean beats every static baseline: {_mean(s):.3f} vs best "
              f"static {best_static[0]} {best_static[1]:.3f}{extra}")
    return {"keeps_90pct": keeps, "beats_static": beats}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evals", type=int, default=1000, help="M2N2 evaluations")
    parser.add_argument("--quick", action="store_true", help="150 M2N2 evaluations")
    parser.add_argument("--seed", type=int, default=0, help="search seed")
    parser.add_argument("--population", default=POPULATION)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--no-plain", action="store_true", help="skip the ablation: M2N2 without the population's guide")
    parser.add_argument("--out", help="write the numbers as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.evals = 150
    if args.out:
        args.out = str(Path(args.out).resolve())
    os.chdir(REPO_ROOT)  # the population's seed paths are relative to the repo root

    jobs = [Job(("m2n2",), f"M2N2 {args.evals} evaluations seed={args.seed}", m2n2_job,
                {"population": args.population, "evals": args.evals, "seed": args.seed}),
            Job(("static",), "experts + static merges", static_job, {"population": args.population})]
    if not args.no_plain:
        jobs.insert(1, Job(("plain",), f"plain M2N2 (no guide) {args.evals} evaluations seed={args.seed}", m2n2_job,
                           {"population": args.population, "evals": args.evals, "seed": args.seed, "plain": True}))

    def describe(job: Job, result: dict) -> str:
        if job.key in (("m2n2",), ("plain",)):
            s = result["scores"]
            return f"add {s['add']:.3f} rev {s['rev']:.3f}, {result['evals_per_second']:.2f} evals/s"
        return f"{len(result['rows'])} models"

    with timer() as total:
        results, errors = run_jobs(jobs, args.jobs, describe)

    rows, table = [], {}
    static = results.get(("static",))
    searches = {label: results[key] for key, label in ((("m2n2",), "M2N2 (population)"),
                                                       (("plain",), "plain M2N2 (no guide)")) if key in results}
    if static:
        for name, scores in static["rows"].items():
            table[name] = scores
        for name, err in static["errors"].items():
            table[name] = {"error": err}
    for label, run in searches.items():
        table[f"{label} best after {run['evaluations']}"] = run["scores"]
    for name, scores in table.items():
        if "error" in scores:
            rows.append((name, "ERROR", "", scores["error"][:80]))
        else:
            rows.append((name, f"{scores['add']:.3f}", f"{scores['rev']:.3f}", f"{_mean(scores):.3f}"))
    print_section("held-out exact match per skill (200 prompts each)")
    print(format_table(("model", "add", "rev", "mean"), rows))
    for label, run in searches.items():
        b = run["best"]
        print(f"\n{label}: {run['evaluations']} evaluations ({run['failed']} failed) in "
              f"{fmt_seconds(run['search_seconds'])}; best member {b['member_id']} (generation {b['generation']}), "
              f"train {b['train_score']:.4f}, test {b['test_score']:.4f}; recipe of "
              f"{len(run['recipe']['breaks']) - 1} segment(s) over {len(run['recipe']['coeffs'][0])} basis elements "
              f"({run['basis_elements']} added by the guide)")

    targets: dict[str, dict[str, bool]] = {}
    if searches and static:
        print_section("targets")
        for label, run in searches.items():
            targets[label] = check_targets(label, run["scores"], static)
    print(f"\nwall time {fmt_seconds(total['seconds'])}")
    if errors:
        print(f"\n{len(errors)} job(s) crashed: {', '.join('/'.join(k) for k in errors)}")
    if args.out:
        write_json(args.out, {"evals": args.evals, "seed": args.seed, "table": table, "targets": targets,
                              "m2n2": searches.get("M2N2 (population)"), "plain": searches.get("plain M2N2 (no guide)"),
                              "static": static, "wall_seconds": total["seconds"],
                              "errors": {"/".join(k): v for k, v in errors.items()}})
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
