"""Every static merge method at its mergekit defaults and over a small grid, then M2N2 with and
without `seed_with` (the best static merges joining its archive at the start).

Shared by compare_digits.py and compare_tiny_lm.py. The static merges run as the `static`
strategy's plan (`merges:`), in-process, each scored once on train and test; the best of a
method's grid is picked by TRAIN score (test reported). M2N2 runs twice on the same seeds and
budget: plain, and with `seed_with` = the `top` best static merges by train score. The target
the issue sets: M2N2 with seed_with matches the best static merge within 100 evaluations and
beats it by the end of the budget.
"""

from __future__ import annotations

from typing import Any

from _common import load_population, pin_blas_threads, timer

# method -> grid of `parameters` ({} first: mergekit's defaults); methods taking a base use seed `base`
DENSITIES = [{"density": d} for d in (0.3, 0.5, 0.7)]
GRID: dict[str, list[dict[str, Any]]] = {
    "linear": [{}],
    "slerp": [{"t": 0.5}, {"t": 0.3}, {"t": 0.7}],
    "nuslerp": [{}],
    "multislerp": [{}],
    "karcher": [{}],
    "model_stock": [{}],
    "task_arithmetic": [{}, {"lambda": 0.5}, {"lambda": 0.75}],
    "ties": [{}, *DENSITIES],
    "dare_linear": [{}, *DENSITIES],
    "dare_ties": [{}, *DENSITIES],
    "breadcrumbs": [{}, *[{**d, "gamma": 0.01} for d in DENSITIES]],
    "breadcrumbs_ties": [{}, *[{**d, "gamma": 0.01} for d in DENSITIES]],
    "della": [{}, *[{**d, "epsilon": 0.1} for d in DENSITIES]],
    "della_linear": [{}, *[{**d, "epsilon": 0.1} for d in DENSITIES]],
    "sce": [{}, {"select_topk": 0.5}],
    "pcb": [{}, *DENSITIES],
    "star": [{}, {"eta": 80}],
    "tsv": [{}, {"lambda": 0.5}],
}
QUICK = {"linear", "slerp", "task_arithmetic", "ties", "breadcrumbs", "della", "sce", "multislerp", "karcher",
         "pcb", "star", "tsv", "model_stock"}


def grid_specs(num_seeds: int, base: int = 0, quick: bool = False) -> list[dict[str, Any]]:
    """The merges to score: every method that can merge `num_seeds` seeds, defaults then grid."""
    from evomerge.merging import MERGE_METHODS

    specs = []
    for method, grid in GRID.items():
        if quick and method not in QUICK:
            continue
        op = MERGE_METHODS.get(method)
        others = num_seeds - 1 if (op.needs_base or op.pairwise) else num_seeds
        if others < op.min_tensors or (op.max_tensors is not None and others > op.max_tensors) \
                or (op.pairwise and num_seeds != 2):
            continue  # e.g. model_stock needs two models besides the base
        for params in (grid if not quick else grid[:2]):
            spec = {"method": method, "parameters": dict(params)}
            if op.needs_base or op.pairwise:
                spec["base"] = base  # nuslerp / multislerp / karcher merge the seeds themselves
            specs.append(spec)
    return specs


def run_static_grid(population: str, overrides: dict[str, Any], specs: list[dict[str, Any]],
                    threads: int = 1) -> dict[str, Any]:
    """Score every spec once (train and test) with the static strategy, in-process."""
    pin_blas_threads(threads)
    from evomerge.engine.local import run_local
    from evomerge.strategies.merge_specs import MergeSpec

    config = load_population(population, {**overrides, "strategy.name": "static", "fitness.test_every": "all",
                                           "strategy.options": {"merges": specs, "slerp_points": [], "linear": False},
                                           "budget.evaluations": len(specs) + 16})
    members: list[dict[str, Any]] = []

    def on_record(record) -> None:
        if "merge" in record.params:
            spec = MergeSpec.model_validate(specs[int(record.params["merge"])])
            members.append({"index": int(record.params["merge"]), "method": spec.method, "label": spec.label(),
                            "train": record.train_score, "test": record.test_score, "error": record.error})
        elif "seed" in record.params:
            members.append({"index": -1, "method": f"seed {int(record.params['seed'])}", "label": "seed",
                            "train": record.train_score, "test": record.test_score, "error": record.error})

    with timer() as t:
        run_local(config, on_record)
    return {"members": members, "wall_seconds": t["seconds"]}


def summarise(grid: dict[str, Any]) -> list[dict[str, Any]]:
    """Per method: its defaults' (first spec's) scores and its best-by-train grid point."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for m in sorted(grid["members"], key=lambda m: m["index"]):
        by_method.setdefault(m["method"], []).append(m)
    rows = []
    for method, ms in by_method.items():
        ok = [m for m in ms if m["train"] is not None]
        best = max(ok, key=lambda m: m["train"]) if ok else None
        rows.append({"method": method, "default": ms[0], "best": best, "failed": len(ms) - len(ok)})
    return rows


def top_specs(grid: dict[str, Any], specs: list[dict[str, Any]], top: int) -> list[dict[str, Any]]:
    """The `top` best static merges by train score, at most one per method (variety for M2N2)."""
    chosen, seen = [], set()
    for m in sorted((m for m in grid["members"] if m["index"] >= 0 and m["train"] is not None),
                    key=lambda m: -m["train"]):
        if m["method"] in seen:
            continue
        seen.add(m["method"])
        chosen.append(specs[m["index"]])
        if len(chosen) == top:
            break
    return chosen
