"""M2N2 (Model Merging of Natural Niches): competition, attraction, split-point SLERP.

`ga` is the same machinery with competition (alpha = 0) and attraction switched off, which is
how the paper's GA baseline is defined; the ablation flags reproduce its ablation figure.

Subsampled fitness (`fitness.subsample: {size: M | fraction: F, topup}`), in the rules' terms:
- Ask. A child is scored on M datapoints drawn from its own seed, stratified by the archive's
  load (strategies/subsets.py). Initial members (and guides' merges) are scored on the whole set.
  With M >= N nothing is drawn at all, so the search is bitwise the full one.
- Competition and replacement. The child is compared with the archive on its subset O only
  (`niches.screen_slot`): loads, shared scores and fitness over O, weighted by the draw.
  If the child is the least fit there, it is dropped, as in the full rule.
- `topup: archive`. A child that wins on O is not inserted yet: it is queued to be scored on the
  rest of the set (the next ask hands that out before any new child; it is one more evaluation
  of N - M datapoints). With `staged: true` the rest comes in stages that double what is
  observed (uniform over the unobserved, `subsets.widen`), and after each stage the child is
  judged again on everything observed so far, with exact inclusion weights; a child that loses
  there stops (no slot, its datapoints spent), one that wins goes on to the next stage. When the
  rest comes back, its full row goes through the full replacement rule against the archive as
  it is then. If the full rule says the child is the least fit
  (the subset flattered it, or the archive moved on), the archive is unchanged and the child is
  dropped: its datapoints are spent, nothing else happens. So every member is fully known, and
  the parent draws (fitness, attraction) are the full-set rules on full rows.
- `topup: none`. The winner on O takes the slot `screen_slot` names with its observed entries;
  the archive keeps an observed mask, and every rule (the screen, parent draws, and the full
  rule for fully scored children) reads the matrix with unobserved entries estimated by
  `niches.estimate_unobserved` (member ability + datapoint difficulty).
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
from evomerge.strategies.niches import Niches, estimate_unobserved, replacement_slot, screen_slot
from evomerge.strategies.subsets import draw_subset, subset_rng, widen
from evomerge.tracking.replay_payload import rng_to_json


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
    supports_subsample = True

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
        self.admitted: list[tuple[int, Any]] = []  # entered the archive since take_admitted (test_every: archive)
        self._expected: dict[str, Any] | None = None  # a resume's hint for the next ask (expect)
        self.guide = Guide(opts.guide, problem, seed) if opts.guide is not None else None
        spec = problem.subsample
        n = problem.num_datapoints
        self.subset_size = spec.resolve(n) if spec is not None else n
        self.subsampling = self.subset_size < n
        self.topup = spec.topup if spec is not None else "archive"
        self.strata = spec.strata if spec is not None else 1
        self.subset_seed = seed
        self.subsets_drawn = 0  # the next child's subset stream (subsets.subset_rng)
        # topup: none: which entries of each member were scored; the rest are estimated
        self.observed = np.ones((size, n), dtype=bool) if self.subsampling and self.topup == "none" else None
        self._estimated: np.ndarray | None = None
        self.topups: list[Candidate] = []  # winners on their subset, waiting for the rest of the set
        self.staged = bool(spec is not None and spec.staged)
        # asked: top-up evaluations handed out; kept / dropped: by the full rule on the full row;
        # stopped: a staged top-up that lost on the union at an intermediate stage
        self.topup_counts = {"asked": 0, "kept": 0, "dropped": 0, "stopped": 0}

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
            origin: dict[str, Any] = ({"seed": self.init_issued} if self.space.num_seeds else
                                      {"random": [self.options.init_sigma, rng_to_json(self.rng)]})
            genome = self._initial_genome(self.init_issued)
            k = self.space.num_seeds
            params = {"seed_with": self.init_issued - k} if k and self.init_issued >= k else {}
            self.init_issued += 1
            if params:  # a seed_with merge: the trial records its genome's digest instead
                origin = None
            return Candidate(genome=genome, params=params, parents=(), generation=0, origin=origin)
        if self.init_told < self.init_target:
            return None  # children need an archive: wait for the initial members' scores
        if not filled.any():
            raise FitnessError("every pretrained seed failed to evaluate, so there is nothing to merge; "
                               "see the FAIL trials for the fitness task's errors")
        if self.topups:  # a winner on its subset is scored on the rest before anything new
            self.topup_counts["asked"] += 1
            return self.topups.pop(0)
        expected, self._expected = self._expected, None
        if self.guide is not None and self.guide.wants_turn():
            # A resume re-asking a turn on which the crashed search's guide offered nothing (DAM
            # still training on its thread) skips it too: DAM then trains that chunk inline when
            # the trials say its child was asked, and the children in between are the same.
            if expected is None or Guide.owns_params(expected):
                guided = self.guide.ask()
                if guided is not None:
                    return guided
        opts = self.options
        a, b = self._niches.choose_parents(self.matrix, filled, opts.attraction, self.rng)
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
        candidate = Candidate(genome=child, params=params, parents=parents, generation=generation, origin=lineage)
        if self.subsampling:
            rng = subset_rng(self.subset_seed, self.subsets_drawn)
            self.subsets_drawn += 1
            load = self.matrix.sum(axis=0)
            subset = draw_subset(load, self.subset_size, opts.alpha, self.strata, rng)
            candidate.indices, candidate.inclusion = subset.indices, subset.inclusion
        return candidate

    @property
    def matrix(self) -> np.ndarray:
        """The score matrix every rule reads: S, or with `topup: none` S with its unobserved
        entries estimated (kept until the archive changes)."""
        if self.observed is None:
            return self.scores
        if self._estimated is None:
            self._estimated = estimate_unobserved(self.scores, self.observed, self.ids >= 0)
        return self._estimated

    def _changed(self) -> None:
        self._niches.changed()
        self._estimated = None

    # -- tell --------------------------------------------------------------------------------
    def tell(self, candidate: Candidate, evaluation: Evaluation) -> None:
        self.told += 1
        if self.guide is not None and Guide.owns(candidate):
            self.guide.tell(candidate, evaluation)
        else:
            if not candidate.parents:
                self.init_told += 1
            if evaluation.failed:
                pass
            elif candidate.topup_of is not None and len(evaluation.scores) == self.problem.num_datapoints:
                # the full row of a winner on its subset (the population merged the parts)
                entered = self._insert(candidate.genome, evaluation.scores, candidate.topup_of, candidate.generation)
                self.topup_counts["kept" if entered else "dropped"] += 1
            elif candidate.topup_of is not None:  # a stage of a staged top-up: judged again on the union
                assert candidate.observed is not None and candidate.indices is not None
                indices = np.concatenate([candidate.observed[0], candidate.indices])
                scores = np.concatenate([candidate.observed[1], np.asarray(evaluation.scores, dtype=np.float64)])
                order = np.argsort(indices, kind="stable")
                if not self._screen(candidate, indices[order], scores[order], candidate.topup_of):
                    self.topup_counts["stopped"] += 1
            elif candidate.subsampled:
                self._screen(candidate, candidate.indices, evaluation.scores, candidate.member_id)
            else:
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
            if replacement_slot(self.matrix, best["scores"], self.options.alpha, filled=self.ids >= 0) is None:
                return
            genome = self.space.add_element(genome)
        self._insert(genome, best["scores"], best["member_id"], best["generation"])

    def _screen(self, candidate: Candidate, indices: np.ndarray, observed: np.ndarray,
                member_id: int) -> bool:
        """The child against the archive on what it was scored on (see the module docstring):
        its subset, or after a stage of a staged top-up, the union so far. True if it goes on."""
        assert candidate.inclusion is not None
        weights = 1.0 / candidate.inclusion[indices]
        slot = screen_slot(self.matrix, observed, indices, weights, self.options.alpha, self.ids >= 0)
        if slot is None:
            return False
        if self.observed is None:  # topup: archive: the rest of the set decides
            n = self.problem.num_datapoints
            if self.staged:
                stage = widen(indices, candidate.inclusion, subset_rng(self.subset_seed, self.subsets_drawn))
                self.subsets_drawn += 1
                rest, inclusion = stage.indices, stage.inclusion
            else:
                rest, inclusion = np.setdiff1d(np.arange(n, dtype=np.int64), indices), np.ones(n)
            self.topups.append(Candidate(
                genome=self.space.realise(candidate.genome), params=dict(candidate.params),
                parents=candidate.parents, generation=candidate.generation, indices=rest, inclusion=inclusion,
                topup_of=member_id, observed=(np.asarray(indices), np.asarray(observed, dtype=np.float64))))
            return True
        row = np.zeros(self.problem.num_datapoints)
        row[indices] = observed
        self._place(slot, candidate.genome, row, member_id, candidate.generation)
        self.observed[slot] = False
        self.observed[slot, indices] = True
        return True

    def _insert(self, genome: Any, scores: np.ndarray, member_id: int, generation: int) -> bool:
        slot = self._niches.replacement_slot(self.matrix, scores, filled=self.ids >= 0)
        if slot is None:
            return False
        self._place(slot, genome, scores, member_id, generation)
        if self.observed is not None:
            self.observed[slot] = True
        return True

    def _place(self, slot: int, genome: Any, scores: np.ndarray, member_id: int, generation: int) -> None:
        self._changed()
        self.genomes[slot] = self.space.copy(genome)
        self.admitted.append((member_id, self.genomes[slot]))
        self.scores[slot] = scores
        self.ids[slot] = member_id
        self.generations[slot] = generation

    def take_admitted(self) -> list[tuple[int, Any]]:
        admitted, self.admitted = self.admitted, []
        return admitted

    # -- replay (evomerge/engine/replay.py) --------------------------------------------------
    def expect(self, params: dict[str, Any] | None) -> None:
        self._expected = params

    def allow_background(self, allowed: bool) -> bool:
        previous = super().allow_background(allowed)
        if self.guide is not None:  # a DAM guide trains on a thread of its own problem's
            self.guide.strategy.allow_background(allowed)
        return previous

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta = {"rng": self._rng_state(), "init_issued": self.init_issued, "init_told": self.init_told,
                "init_target": self.init_target, "sigma": self.sigma, "told": self.told}
        arrays = {"scores": self.scores, "ids": self.ids, "generations": self.generations,
                  **self.space.pack(self.genomes, "genomes")}
        if self.subsampling:
            meta["subsets_drawn"] = self.subsets_drawn
            meta["topup_counts"] = dict(self.topup_counts)
            meta["topups"] = [{"params": dict(c.params), "parents": list(c.parents), "generation": c.generation,
                               "topup_of": c.topup_of} for c in self.topups]
            for k, c in enumerate(self.topups):
                assert c.indices is not None and c.observed is not None
                arrays[f"topups/{k}/indices"] = c.indices
                arrays[f"topups/{k}/observed_indices"] = c.observed[0]
                arrays[f"topups/{k}/observed_scores"] = c.observed[1]
                arrays[f"topups/{k}/inclusion"] = c.inclusion
            if self.topups:
                arrays.update(self.space.pack([c.genome for c in self.topups], "topups/genomes"))
            if self.observed is not None:
                arrays["observed"] = self.observed
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
        self._changed()
        self.admitted = []
        if self.subsampling:
            self.subsets_drawn = int(meta["subsets_drawn"])
            self.topup_counts = {**self.topup_counts, **meta["topup_counts"]}
            items = meta["topups"]
            genomes = self.space.unpack(arrays, "topups/genomes") if items else []
            self.topups = [Candidate(genome=g, params=dict(item["params"]), parents=tuple(item["parents"]),
                                     generation=int(item["generation"]), topup_of=int(item["topup_of"]),
                                     indices=np.asarray(arrays[f"topups/{k}/indices"], dtype=np.int64),
                                     inclusion=np.asarray(arrays[f"topups/{k}/inclusion"], dtype=np.float64),
                                     observed=(np.asarray(arrays[f"topups/{k}/observed_indices"], dtype=np.int64),
                                               np.asarray(arrays[f"topups/{k}/observed_scores"], dtype=np.float64)))
                           for k, (item, g) in enumerate(zip(items, genomes))]
            if self.observed is not None:
                self.observed = np.array(arrays["observed"], dtype=bool)
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
        matrix = self.matrix
        means = matrix[filled].mean(axis=1) if filled.any() else np.zeros(0)
        summary = {
            "size": int(filled.sum()),
            "best_train": float(means.max()) if means.size else None,
            "mean_train": float(means.mean()) if means.size else None,
            "coverage": float((matrix[filled].max(axis=0) > 0).mean()) if filled.any() else 0.0,
        }
        if self.subsampling:
            summary["topups"] = dict(self.topup_counts)
        return summary


@STRATEGIES.register("ga")
class GA(M2N2):
    Options = GAOptions
