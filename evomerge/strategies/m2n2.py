"""M2N2 (Model Merging of Natural Niches): competition, attraction, split-point SLERP.

`ga` is the same machinery with competition (alpha = 0) and attraction switched off, which is
how the paper's GA baseline is defined; the ablation flags reproduce its ablation figure.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from evomerge.errors import FitnessError
from evomerge.genomes.elements import pack_elements, unpack_elements
from evomerge.genomes.offspring import Lineage, draw_noise_seed
from evomerge.strategies import STRATEGIES
from evomerge.strategies.base import Candidate, Evaluation, Problem, Strategy, StrategyOptions
from evomerge.strategies.guide import Guide, GuideOptions
from evomerge.strategies.merge_specs import MergeSpec, spec_genome, spec_member
from evomerge.strategies.niches import Niches, replacement_slot


class M2N2Options(StrategyOptions):
    archive_size: int = Field(20, ge=2)
    alpha: float = Field(1.0, ge=0.0, description="competition strength; 0 = plain GA")
    mutation_sigma: float | None = Field(None, ge=0.0, description="None: 0.01 from scratch, 0 with seeds")
    init_sigma: float = Field(0.01, gt=0.0, description="std of the from-scratch initial members")
    init_members: int = Field(2, ge=1, description="random initial members when starting from scratch")
    crossover: bool = True
    split_point: bool = True
    attraction: bool = True
    guide: GuideOptions | None = Field(None, description="hybrid: {from: cmaes|dam, every: N, share, options}")
    seed_with: list[MergeSpec] = Field(default_factory=list, description="static merges evaluated with the seeds "
                                       "at the start, e.g. [{method: ties, parameters: {density: 0.5}}]")


class GAOptions(M2N2Options):
    alpha: float = Field(0.0, ge=0.0)
    attraction: bool = False


@STRATEGIES.register("m2n2")
class M2N2(Strategy):
    Options = M2N2Options

    def __init__(self, options: dict[str, Any] | M2N2Options, problem: Problem, seed: int) -> None:
        super().__init__(options, problem, seed)
        opts = self.options
        self.space = problem.space
        if self.space.num_seeds > opts.archive_size:
            raise ValueError(
                f"strategy.options.archive_size={opts.archive_size} is smaller than the "
                f"{self.space.num_seeds} seeds; raise it"
            )
        self.sigma = opts.mutation_sigma if opts.mutation_sigma is not None else (0.01 if problem.from_scratch else 0.0)
        if self.sigma > 0 and self.space.kind == "recipe":
            raise ValueError("strategy.options.mutation_sigma must be 0 when merging checkpoints "
                             "(recipe genomes); set it to 0")
        size = opts.archive_size
        self.genomes: list[Any] = [None] * size
        # float64 so that a tie in continuous scores stays a tie after storage
        self.scores = np.zeros((size, problem.num_datapoints), dtype=np.float64)
        self.ids = np.full(size, -1, dtype=np.int64)
        self.generations = np.zeros(size, dtype=np.int64)
        self._niches = Niches(opts.alpha)  # F and f of `scores`, kept until the archive changes
        self.init_issued = 0
        self.init_told = 0
        if opts.seed_with and not self.space.num_seeds:
            raise ValueError("strategy.options.seed_with merges the seeds; give `seeds:` or drop seed_with")
        for j, spec in enumerate(opts.seed_with):  # fail at start, not when the merge is first issued
            try:
                spec_genome(spec, self.space.num_seeds, self.space.size)
            except ValueError as exc:
                raise ValueError(f"strategy.options.seed_with.{j}: {exc}") from None
        self.init_target = (self.space.num_seeds + len(opts.seed_with)) or self.options.init_members
        self.told = 0
        self.guide = Guide(opts.guide, problem, seed) if opts.guide is not None else None

    # -- ask ---------------------------------------------------------------------------------
    def _initial_genome(self, index: int) -> Any:
        k = self.space.num_seeds
        if k and index >= k:
            return self._seed_merge(index - k)
        if k:
            return self.space.seed_genome(index)
        return self.space.random_genome(self.rng, self.options.init_sigma)

    def _seed_merge(self, j: int) -> Any:
        """`seed_with[j]` as an archive member. Over checkpoints a non-linear merge joins the basis
        as a new element (one model-sized buffer per process) and the member is the recipe "all of
        that element", so crossover mixes it with the seeds like any recipe; a linear one is its
        recipe; in-memory seeds get the merged vector."""
        member = spec_member(self.options.seed_with[j], self.space, getattr(self.problem.task, "layout", None))
        if self.space.kind == "recipe" and hasattr(member, "materialise"):
            member = self.space.add_element(member)
        return member

    def ask(self) -> Candidate | None:
        filled = self.ids >= 0
        if self.init_told >= self.init_target and not filled.any() and self.problem.from_scratch:
            self.init_target += 1  # every random start failed: draw another instead of giving up
        if self.init_issued < self.init_target:
            genome = self._initial_genome(self.init_issued)
            k = self.space.num_seeds
            params = {"seed_with": self.init_issued - k} if k and self.init_issued >= k else {}
            self.init_issued += 1
            return Candidate(genome=genome, params=params, parents=(), generation=0)
        if self.init_told < self.init_target:
            return None  # children need an archive: wait for the initial members' scores
        if not filled.any():
            raise FitnessError("every pretrained seed failed to evaluate, so there is nothing to merge; "
                               "see the FAIL trials for the fitness task's errors")
        if self.guide is not None and self.guide.wants_turn():
            guided = self.guide.ask()
            if guided is not None:
                return guided
        opts = self.options
        a, b = self._niches.choose_parents(self.scores, filled, opts.attraction, self.rng)
        params: dict[str, float | int] = {"parent_a": int(self.ids[a]), "parent_b": int(self.ids[b])}
        size = self.space.size
        slots = (a, b) if opts.crossover else (a,)
        split, ratio = size, 0.0
        if opts.crossover:
            ratio = float(self.rng.uniform())
            split = self.space.draw_split(self.rng) if opts.split_point else size
            params["mix_ratio"] = ratio
            params["split_fraction"] = split / size
        parents = tuple(int(self.ids[k]) for k in slots)
        lineage = Lineage(parent_ids=parents, slots=tuple(int(k) for k in slots), split=int(split), ratio=ratio,
                          sigma=self.sigma, noise_seed=draw_noise_seed(self.rng) if self.sigma > 0 else None)
        child = self.space.breed([self.genomes[k] for k in slots], lineage)
        generation = int(max(self.generations[a], self.generations[b] if opts.crossover else 0)) + 1
        return Candidate(genome=child, params=params, parents=parents, generation=generation)

    # -- tell --------------------------------------------------------------------------------
    def tell(self, candidate: Candidate, evaluation: Evaluation) -> None:
        self.told += 1
        if self.guide is not None and Guide.owns(candidate):
            self.guide.tell(candidate, evaluation)
        else:
            if not candidate.parents:
                self.init_told += 1
            if not evaluation.failed:
                self._insert(candidate.genome, evaluation.scores, candidate.member_id, candidate.generation)
        if self.guide is not None:
            best = self.guide.due(self.told)
            if best is not None:  # the baseline's best competes for a slot like any member
                self._insert_guided(best)

    def _insert_guided(self, best: dict[str, Any]) -> None:
        assert self.guide is not None
        genome = best["genome"]
        if self.guide.needs_element(genome):
            # Grow the basis only for a merge that wins a slot: each element costs a model-sized buffer.
            if replacement_slot(self.scores, best["scores"], self.options.alpha, filled=self.ids >= 0) is None:
                return
            genome = self.space.add_element(genome)
        self._insert(genome, best["scores"], best["member_id"], best["generation"])

    def _insert(self, genome: Any, scores: np.ndarray, member_id: int, generation: int) -> None:
        slot = self._niches.replacement_slot(self.scores, scores, filled=self.ids >= 0)
        if slot is None:
            return
        self._niches.changed()
        self.genomes[slot] = self.space.copy(genome)
        self.scores[slot] = scores
        self.ids[slot] = member_id
        self.generations[slot] = generation

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta = {"rng": self._rng_state(), "init_issued": self.init_issued, "init_told": self.init_told,
                "init_target": self.init_target, "sigma": self.sigma, "told": self.told}
        arrays = {"scores": self.scores, "ids": self.ids, "generations": self.generations,
                  **self.space.pack(self.genomes, "genomes")}
        extensions = getattr(self.space, "extensions", [])
        if extensions:
            arrays.update(pack_elements(extensions, "elements"))
        if self.guide is not None:
            guide_meta, guide_arrays = self.guide.state_dict()
            meta["guide"] = guide_meta
            arrays.update({f"guide/{k}": v for k, v in guide_arrays.items()})
        return meta, arrays

    def load_state_dict(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        if hasattr(self.space, "reset_extensions"):  # merged models that joined the basis, in order
            self.space.reset_extensions(unpack_elements(arrays, "elements"))
        genomes = self.space.unpack(arrays, "genomes")
        if len(genomes) != len(self.genomes):
            raise ValueError(f"snapshot archive has {len(genomes)} slots, expected {len(self.genomes)}")
        self.genomes = genomes
        for name in ("scores", "ids", "generations"):
            current = getattr(self, name)
            if arrays[name].shape != current.shape:
                raise ValueError(f"snapshot array {name!r} has shape {arrays[name].shape}, expected {current.shape}")
            setattr(self, name, np.array(arrays[name], dtype=current.dtype))
        self._niches.changed()
        self._set_rng_state(meta["rng"])
        self.init_issued = int(meta["init_issued"])
        self.init_told = int(meta["init_told"])
        self.init_target = int(meta["init_target"])
        self.told = int(meta.get("told", 0))
        if self.guide is not None:
            self.guide.load_state_dict(meta["guide"], {k[6:]: v for k, v in arrays.items() if k.startswith("guide/")})
        self.sigma = float(meta["sigma"])

    def archive_summary(self) -> dict[str, Any]:
        filled = self.ids >= 0
        means = self.scores[filled].mean(axis=1) if filled.any() else np.zeros(0)
        return {
            "size": int(filled.sum()),
            "best_train": float(means.max()) if means.size else None,
            "mean_train": float(means.mean()) if means.size else None,
            "coverage": float((self.scores[filled].max(axis=0) > 0).mean()) if filled.any() else 0.0,
        }


@STRATEGIES.register("ga")
class GA(M2N2):
    Options = GAOptions
