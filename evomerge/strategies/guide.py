"""Hybrid guidance: a baseline strategy (CMA-ES or DAM) runs inside M2N2 on a share of the
evaluations, and every `every` evaluations its best member joins the M2N2 archive, where it
competes under the replacement rule like any other member.

Over checkpoint seeds, a guide's best that is not a recipe (a DAM column genome, a TIES layer-wise
genome) joins as a new basis element (see RecipeSpace.add_element), at most `max_elements` times.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from evomerge.genomes.recipe import Recipe
from evomerge.strategies.base import Candidate, Evaluation, Problem

GUIDE_FLAG = "guide"  # a param on every candidate the guide issued, so tells route back after a resume


class GuideOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    source: Literal["cmaes", "dam"] = Field(alias="from", description="the baseline that guides M2N2")
    every: int = Field(500, ge=1, description="evaluations between insertions of the guide's best")
    share: float = Field(0.25, gt=0.0, lt=1.0, description="fraction of evaluations the guide spends")
    options: dict[str, Any] = Field(default_factory=dict, description="the guide strategy's own options")
    max_elements: int = Field(4, ge=0, description="over checkpoint seeds: how many of the guide's merges "
                              "may join the basis as new elements (each costs one model-sized buffer per process)")


class Guide:
    def __init__(self, options: GuideOptions, problem: Problem, seed: int) -> None:
        from evomerge.strategies import build_strategy

        self.options = options
        self.period = max(2, round(1.0 / options.share))
        # The guide gets its own copy of the problem: DAM may swap in its own genome space.
        self.strategy = build_strategy(options.source, options.options, dataclasses.replace(problem), seed + 7919)
        self.space = problem.space
        # The guide's own space packs its genomes (DAM swaps in a column space, CMA-ES a layer-wise one).
        self.own_space = self.strategy.problem.space
        self.asks = 0
        self.told = 0
        self.best: dict[str, Any] | None = None  # member_id, train, genome, scores, generation
        self.inserted: set[int] = set()

    def wants_turn(self) -> bool:
        if self.strategy.exhausted:  # e.g. DAM has offered its trained merge: the rest goes to M2N2
            return False
        self.asks += 1
        return self.asks % self.period == 0

    def ask(self) -> Candidate | None:
        candidate = self.strategy.ask()
        if candidate is not None:
            candidate.params = {**candidate.params, GUIDE_FLAG: 1}
        return candidate

    @staticmethod
    def owns(candidate: Candidate) -> bool:
        return Guide.owns_params(candidate.params)

    @staticmethod
    def owns_params(params: dict[str, Any]) -> bool:
        return bool(params.get(GUIDE_FLAG))

    def tell(self, candidate: Candidate, evaluation: Evaluation) -> None:
        self.told += 1
        inner = dataclasses.replace(candidate, params={k: v for k, v in candidate.params.items() if k != GUIDE_FLAG})
        self.strategy.tell(inner, evaluation)
        train = evaluation.train_score
        if train is not None and self._insertable(candidate.genome) and (self.best is None or train > self.best["train"]):
            self.best = {"member_id": candidate.member_id, "train": train, "genome": candidate.genome,
                         "scores": np.asarray(evaluation.scores, dtype=np.float64), "generation": candidate.generation}

    def _insertable(self, genome: Any) -> bool:
        """Dense vectors join a dense archive; over seeds, recipes join as they are and other merges
        (anything that materialises from the seeds) as new basis elements."""
        if self.space.kind != "recipe":
            return isinstance(genome, np.ndarray)
        return isinstance(genome, Recipe) or hasattr(genome, "materialise")

    def needs_element(self, genome: Any) -> bool:
        return self.space.kind == "recipe" and not isinstance(genome, Recipe)

    def due(self, total_told: int) -> dict[str, Any] | None:
        """The guide's best, when an insertion is due and it has not joined the archive yet."""
        if total_told % self.options.every or self.best is None or self.best["member_id"] in self.inserted:
            return None
        if self.needs_element(self.best["genome"]) and len(self.space.extensions) >= self.options.max_elements:
            return None
        self.inserted.add(self.best["member_id"])
        return self.best

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta, arrays = self.strategy.state_dict()
        out = {f"inner/{k}": v for k, v in arrays.items()}
        best_meta = None
        if self.best is not None:
            best_meta = {k: self.best[k] for k in ("member_id", "train", "generation")}
            out.update(self.own_space.pack([self.best["genome"]], "best"))
            out["best/scores"] = self.best["scores"]
        return {"inner": meta, "asks": self.asks, "told": self.told, "best": best_meta,
                "inserted": sorted(self.inserted)}, out

    def load_state_dict(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.strategy.load_state_dict(meta["inner"], {k[6:]: v for k, v in arrays.items() if k.startswith("inner/")})
        self.asks, self.told = int(meta["asks"]), int(meta["told"])
        self.inserted = {int(i) for i in meta["inserted"]}
        self.best = None
        if meta["best"] is not None:
            self.best = {**meta["best"], "genome": self.own_space.unpack(arrays, "best")[0],
                         "scores": np.asarray(arrays["best/scores"], dtype=np.float64)}
