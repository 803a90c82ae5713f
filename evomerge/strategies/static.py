"""One-shot static merges as a strategy, so they run (and are recorded) like any search.

It evaluates the seeds, then each static merge of them once: the baselines that a search has to
beat. Whole-model SLERP is split-point SLERP with the split at the end; the linear soup is the
uniform recipe. Both are exact as recipes, so this runs on checkpoints of any size.

`merges` adds any registered merge method with its parameters (mergekit's names), e.g.
`merges: [{method: ties, parameters: {density: 0.5}}, {method: della, base: 0}]`; each is one
candidate with the param `merge` = its index in that list (`MergeSpec.label` names it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from evomerge.genomes.recipe import Recipe
from evomerge.strategies import STRATEGIES
from evomerge.strategies.base import Candidate, Evaluation, Problem, Strategy, StrategyOptions
from evomerge.strategies.merge_specs import MergeSpec, spec_member


class StaticOptions(StrategyOptions):
    slerp_points: list[float] = Field(default_factory=lambda: [0.5], description="t values for 2-seed SLERP")
    linear: bool = Field(True, description="the uniform average of all seeds (model soup)")
    merges: list[MergeSpec] = Field(default_factory=list, description="static merges by method, e.g. "
                                    "[{method: ties, parameters: {density: 0.5}}]")


@STRATEGIES.register("static")
class StaticMerges(Strategy):
    Options = StaticOptions
    supports_scratch = False

    def __init__(self, options: dict[str, Any] | StaticOptions, problem: Problem, seed: int) -> None:
        super().__init__(options, problem, seed)
        self.space = problem.space
        if self.space.num_seeds == 0:
            raise ValueError("the static strategy merges seeds; give `seeds:` (it cannot start from scratch)")
        self.plan = self._plan()
        self.issued = 0
        self.best: tuple[float, int] | None = None

    def _plan(self) -> list[tuple[dict[str, float | int], Any]]:
        k, space = self.space.num_seeds, self.space
        seeds = [space.seed_genome(i) for i in range(k)]
        plan: list[tuple[dict[str, float | int], Any]] = [({"seed": i}, g) for i, g in enumerate(seeds)]
        if k == 2:
            for t in self.options.slerp_points:
                plan.append(({"slerp_t": float(t)}, space.crossover(seeds[0], seeds[1], space.size, float(t))))
        if self.options.linear and k >= 2:
            plan.append(({"linear": k}, self._uniform(k)))
        for j, spec in enumerate(self.options.merges):
            try:
                plan.append(({"merge": j}, spec_member(spec, space, getattr(self.problem.task, "layout", None))))
            except ValueError as exc:
                raise ValueError(f"strategy.options.merges.{j}: {exc}") from None
        return plan

    def _uniform(self, k: int) -> Any:
        if self.space.kind == "recipe":
            return Recipe(np.array([0, self.space.size], dtype=np.int64), np.full((1, k), 1.0 / k))
        return (np.mean(np.stack(self.space.seeds).astype(np.float64), axis=0)).astype(np.float32)

    @property
    def exhausted(self) -> bool:
        return self.issued >= len(self.plan)

    def ask(self) -> Candidate | None:
        params, genome = self.plan[self.issued % len(self.plan)]
        self.issued += 1  # a host that ignores `exhausted` gets the plan again rather than a stall
        return Candidate(genome=self.space.copy(genome), params=dict(params), parents=(), generation=0)

    def tell(self, candidate: Candidate, evaluation: Evaluation) -> None:
        if evaluation.train_score is not None and (self.best is None or evaluation.train_score > self.best[0]):
            self.best = (evaluation.train_score, candidate.member_id)

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"issued": self.issued, "best": list(self.best) if self.best else None}, {}

    def load_state_dict(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.issued = int(meta["issued"])
        self.best = tuple(meta["best"]) if meta["best"] else None  # type: ignore[assignment]
