"""The population: a strategy plus the bookkeeping every search needs (ids, budget, best, records).

Plain Python so the same object runs inside a Ray actor, in-process for benchmarks, or in tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evomerge.engine.late_tests import LateTests, TestJob, TestRecord
from evomerge.strategies.base import Candidate, Evaluation, Strategy
from evomerge.tracking import replay_payload
from evomerge.strategies.subsets import encode_indices


@dataclass
class EvalRecord:
    """One evaluation as the outside world sees it: one Optuna trial, one progress tick."""

    number: int  # position in tell order; trial numbers follow it
    member_id: int
    train_score: float | None
    test_score: float | None
    params: dict[str, float | int]
    parents: list[int]
    generation: int
    seconds: float
    error: str | None = None
    best_train: float | None = None
    best_test: float | None = None
    intermediate: dict[int, float] | None = None  # e.g. DAM's training curve, on one trial
    # A task with groups: the mean train score per group (the study's objectives, in group
    # order) and the held-out score per group; None otherwise and on failed evaluations.
    train_scores: dict[str, float] | None = None
    test_scores: dict[str, float] | None = None
    started: float | None = None  # wall clock when the worker began it (None: never ran)
    replay: str | None = None  # what a resume needs to tell it back, as JSON text (replay_payload.py)
    datapoints: int = 0  # datapoints this evaluation scored (the datapoint budget's unit)
    indices: str | None = None  # which, as subsets.encode_indices' bitmask text; None: all of them
    topup_of: int | None = None  # a top-up: the rest of the set for this member
    partial: bool = False  # train_score is a mean over part of the set only (never a best)

    @property
    def failed(self) -> bool:
        return self.error is not None


@dataclass
class BestMember:
    member_id: int
    train_score: float
    test_score: float | None
    genome: Any = field(repr=False)
    generation: int
    parents: list[int]
    train_scores: dict[str, float] | None = None  # per group, for a task with groups
    test_scores: dict[str, float] | None = None


def group_means(scores: np.ndarray, groups: list[tuple[str, int]],
                indices: np.ndarray | None = None) -> dict[str, float]:
    """The mean score of each group's contiguous run of datapoints, in group order.

    `indices`: `scores` are those datapoints only (a subsampled child); each group's mean is over
    its observed datapoints, and a group with none observed takes the mean of all observed ones
    (the study needs a value per objective; the trial is marked partial)."""
    means: dict[str, float] = {}
    start = 0
    if indices is None:
        for name, size in groups:
            means[name] = float(np.mean(scores[start:start + size]))
            start += size
        return means
    indices = np.asarray(indices)
    overall = float(np.mean(scores)) if len(scores) else 0.0
    for name, size in groups:
        mask = (indices >= start) & (indices < start + size)
        means[name] = float(np.mean(scores[mask])) if mask.any() else overall
        start += size
    return means


def finite_scores(scores: dict[str, Any] | None) -> dict[str, float] | None:
    """Per-group held-out scores without the ones that are missing or not finite."""
    if scores is None:
        return None
    kept = {str(k): float(v) for k, v in scores.items() if v is not None and math.isfinite(float(v))}
    return kept


def check_scores(scores: np.ndarray | None, num_datapoints: int) -> str | None:
    """Why a score vector cannot be used for selection, or None if it can."""
    if scores is None:
        return "no scores returned"
    scores = np.asarray(scores)
    if scores.shape != (num_datapoints,):
        return f"fitness returned scores of shape {scores.shape}, expected ({num_datapoints},)"
    if scores.size and 0 <= scores.min() and scores.max() <= 1:  # NaN fails both comparisons
        return None
    bad = ~np.isfinite(scores)
    if bad.any():
        return f"fitness returned NaN/inf for {int(bad.sum())} of {num_datapoints} datapoints (first at {int(np.argmax(bad))})"
    if scores.min() < 0 or scores.max() > 1:
        return f"fitness scores must lie in [0, 1]; got range [{scores.min():.4g}, {scores.max():.4g}]"
    return None


def mean_staleness(population_meta: dict[str, Any]) -> float | None:
    """Evaluations told, on average, between a child's ask and its tell, from a snapshot's
    population state (None before any child came back, or in snapshots older than the count)."""
    total, count = population_meta.get("staleness", (0, 0))
    return total / count if count else None


def recovery(population_meta: dict[str, Any]) -> dict[str, int]:
    """What resumes saved, from a snapshot's population state: evaluations replayed from the
    study, children sent out again, evaluations redone (all 0 for a search never resumed)."""
    return {"replayed": 0, "resent": 0, "redone": 0, **population_meta.get("recovery", {})}


class Population:
    def __init__(self, strategy: Strategy, budget: int, test_every: str = "best",
                 datapoint_budget: int | None = None) -> None:
        if test_every not in ("best", "archive", "all"):
            raise ValueError(f"test_every must be 'best', 'archive' or 'all', got {test_every!r}")
        self.strategy = strategy
        self.budget = budget
        # budget.datapoints: a child is issued only if its datapoints fit, so the total is never
        # exceeded; the first child that does not fit ends the search (it is kept, never sent).
        self.datapoint_budget = datapoint_budget
        self.issued_datapoints = 0
        self.told_datapoints = 0
        self._held: Candidate | None = None
        self.test_every = test_every  # fitness.test_every: which children get the held-out test
        # `archive`: tests decided after the tell, sent as test-only jobs (engine/late_tests.py);
        # `known`: members whose late test a resume found in the study.
        self.late = LateTests() if test_every == "archive" else None
        self._known_tests: dict[int, TestRecord] = {}
        self.issued = 0
        self.told = 0
        self.failed = 0
        self.inflight: dict[int, Candidate] = {}
        self.best: BestMember | None = None
        # Staleness: how many evaluations were told between a child's ask and its own tell, i.e.
        # how old the archive it was bred from is by the time it competes (0 in a serial loop).
        self._asked_at: dict[int, int] = {}
        self.staleness_total = 0
        self.staleness_count = 0
        self.groups = getattr(strategy.problem, "groups", None)  # the task's skills, or None
        # Replay payloads on trials (off only to measure what they cost, and while a resume
        # replays trials that are already in the study).
        self.record_replay = True
        # What resumes saved: evaluations told back from the study, children re-sent, redone.
        self.recovery = {"replayed": 0, "resent": 0, "redone": 0}

    @property
    def done(self) -> bool:
        return self.told >= self.budget or self.finished_early or (self.datapoints_spent and not self.inflight)

    @property
    def datapoints_spent(self) -> bool:
        """The datapoint budget allows no further child (one was held back, or it is used up)."""
        if self.datapoint_budget is None:
            return False
        if self.issued_datapoints >= self.datapoint_budget:
            return True
        return self._held is not None and self.issued_datapoints + self.cost(self._held) > self.datapoint_budget

    def cost(self, candidate: Candidate) -> int:
        """Datapoints the candidate will be scored on."""
        n = self.strategy.problem.num_datapoints
        return n if candidate.indices is None else int(len(candidate.indices))

    def job(self, candidate: Candidate) -> tuple[Any, ...] | None:
        """What a worker needs besides the genome: None (the whole set), or (indices, observed
        sum): a top-up's test threshold is on its full row's mean, so the worker is told the sum
        of the scores already observed; a plain subsampled child gets no test (None sum)."""
        if candidate.indices is None:
            return None
        observed = float(np.sum(candidate.observed[1])) if self.completes(candidate) else None
        return (candidate.indices, observed)

    def completes(self, candidate: Candidate) -> bool:
        """A top-up whose datapoints and the child's observed ones make the whole set."""
        return (candidate.observed is not None and candidate.indices is not None and
                len(candidate.observed[0]) + len(candidate.indices) == self.strategy.problem.num_datapoints)

    @property
    def finished_early(self) -> bool:
        """The strategy has nothing new to offer and every child it offered is back."""
        return self.strategy.exhausted and not self.inflight and self.told < self.budget

    def test_threshold(self) -> float | None:
        """The mean train score a child must beat for its held-out test score to be computed:
        the best member's (-inf before there is one), since only a child that beats it becomes
        the new best; None with `test_every: all` (test every child); +inf with `archive`, where
        every test is a test-only job decided after the tell. `best` only ever rises (a
        child replaces it only by beating it, a resume restores it), so a threshold read when a
        child is sent is never above the one it is judged against when it comes back."""
        if self.test_every == "all":
            return None
        if self.late is not None:
            return math.inf
        return -math.inf if self.best is None else self.best.train_score

    @property
    def unasked(self) -> int:
        """Evaluations of the budget not yet asked for. Not `budget - issued`: a child asked
        before a crash and never recorded keeps its id out of use, but not its evaluation."""
        return self.budget - self.told - len(self.inflight)

    def ask(self) -> Candidate | None:
        if self.unasked <= 0 or self.strategy.exhausted or self.datapoints_spent:
            return None
        # a child held back by the datapoint budget goes first once it fits (a resume with a larger one)
        candidate, self._held = (self._held, None) if self._held is not None else (self.strategy.ask(), None)
        if candidate is None:
            return None
        if self.datapoint_budget is not None:
            cost = self.cost(candidate)
            if self.issued_datapoints + cost > self.datapoint_budget:
                self._held = candidate
                return None
            self.issued_datapoints += cost
        candidate.member_id = self.issued
        self.issued += 1
        self.inflight[candidate.member_id] = candidate
        self._asked_at[candidate.member_id] = self.told
        return candidate

    def ask_batch(self, size: int) -> list[Candidate]:
        """Up to `size` children for one worker call, in the order `ask` would give them; fewer
        when the budget or the strategy (waiting for results) says so."""
        batch: list[Candidate] = []
        while len(batch) < size:
            candidate = self.ask()
            if candidate is None:
                break
            batch.append(candidate)
        return batch

    def tell(self, evaluation: Evaluation) -> EvalRecord:
        candidate = self.inflight.pop(evaluation.member_id)
        asked_at = self._asked_at.pop(evaluation.member_id, None)  # None: re-sent after a resume
        if asked_at is not None:
            self.staleness_total += self.told - asked_at
            self.staleness_count += 1
        n = self.strategy.problem.num_datapoints
        cost = self.cost(candidate)
        self.told_datapoints += cost
        problem = evaluation.error if evaluation.error else check_scores(evaluation.scores, cost)
        if problem is not None:
            evaluation = Evaluation(evaluation.member_id, None, None, problem, evaluation.seconds,
                                    started=evaluation.started)
            self.failed += 1
        returned = evaluation.scores  # what the worker sent: the payload records these
        if problem is None and self.completes(candidate):  # the last top-up: strategy and best see the full row
            evaluation = Evaluation(evaluation.member_id, self.full_row(candidate, evaluation.scores),
                                    evaluation.test_score, None, evaluation.seconds,
                                    test_scores=evaluation.test_scores, started=evaluation.started)
        self.strategy.tell(candidate, evaluation)
        admitted = self.strategy.take_admitted()
        if self.late is not None:
            space = self.strategy.problem.space
            for member_id, genome in admitted or ():
                self.late.want(member_id, space.realise(genome))
        train = evaluation.train_score
        test = evaluation.test_score if evaluation.test_score is None or math.isfinite(evaluation.test_score) else None
        # Only a mean over the whole set can be the best: a subset's mean is a noisy estimate, and
        # the highest of many noisy estimates is biased upward.
        whole = candidate.indices is None or self.completes(candidate)
        train_groups = test_groups = None
        if self.groups is not None and train is not None:
            train_groups = group_means(evaluation.scores, self.groups,
                                       None if whole else candidate.indices)
            test_groups = finite_scores(evaluation.test_scores)
        if whole and train is not None and (self.best is None or train > self.best.train_score):
            member = candidate.member_id if candidate.topup_of is None else candidate.topup_of  # the child itself
            self.best = BestMember(member, train, test, candidate.genome,
                                   candidate.generation, list(candidate.parents), train_groups, test_groups)
            if self.late is not None:  # a new best is tested too, in the archive or not
                self.late.want(member, self.strategy.problem.space.realise(candidate.genome))
                if member in self._known_tests:
                    self._best_tested(self._known_tests[member])
        curve_of = getattr(self.strategy, "intermediate_values", None)
        intermediate = curve_of(candidate) if curve_of is not None and train is not None else None
        record = EvalRecord(
            number=self.told, member_id=candidate.member_id, train_score=train,
            test_score=test if train is not None else None, params=dict(candidate.params),
            parents=list(candidate.parents), generation=candidate.generation, seconds=evaluation.seconds,
            error=evaluation.error,
            best_train=self.best.train_score if self.best else None,
            best_test=self.best.test_score if self.best else None, intermediate=intermediate,
            train_scores=train_groups, test_scores=test_groups,
            started=evaluation.started,
            replay=self._payload(candidate, returned, asked_at) if self.record_replay else None,
            datapoints=cost, topup_of=candidate.topup_of, partial=not whole,
            indices=None if candidate.indices is None else encode_indices(candidate.indices, n),
        )
        self.told += 1
        return record

    def full_row(self, candidate: Candidate, scores: np.ndarray) -> np.ndarray:
        """A completing top-up's scores together with the child's observed ones: its full row."""
        assert candidate.indices is not None and candidate.observed is not None
        full = np.empty(self.strategy.problem.num_datapoints, dtype=np.float64)
        full[candidate.observed[0]] = candidate.observed[1]
        full[candidate.indices] = scores
        return full

    def _payload(self, candidate: Candidate, scores: np.ndarray | None, asked_at: int | None) -> str:
        """The trial's replay payload (tracking/replay_payload.py). `n` is the count of children
        asked by now: a resume asks them all again before telling this one back."""
        digest = None
        if candidate.origin is None:  # nothing says how it was made: the genome's digest identifies it
            digest = genome_digest(self.strategy.problem.space, candidate.genome)
        return replay_payload.encode_text(scores, asked_at, self.issued, candidate.origin, digest)

    # -- test_every: archive (engine/late_tests.py) ---------------------------------------------
    @property
    def tests_outstanding(self) -> bool:
        """Test jobs queued or out: the search is over only when they are back too."""
        return self.late is not None and self.late.outstanding

    @property
    def pending_tests(self) -> int:
        """Test jobs queued and not yet sent."""
        return 0 if self.late is None else len(self.late.pending)

    def take_tests(self, size: int) -> list[TestJob]:
        return [] if self.late is None else self.late.take(size)

    def retry_tests(self, jobs: list[TestJob]) -> None:
        if self.late is not None:
            self.late.again(jobs)

    def tell_test(self, record: TestRecord) -> TestRecord:
        """A test job's result (the member's trial is written already): the best's score if it
        is the best's, and the record the study keeps against the member."""
        if record.test_score is not None and not math.isfinite(record.test_score):
            record.test_score = None
        record.test_scores = finite_scores(record.test_scores)
        if self.late is not None:
            self.late.back(record)
        if self.best is not None and self.best.member_id == record.member_id:
            self._best_tested(record)
        return record

    def note_measured(self, records: dict[int, TestRecord]) -> None:
        """On resume: the late tests the study holds are never asked again, and a best among
        them (now, or once a replayed trial makes it the best) gets its score back."""
        if self.late is None or not records:
            return
        self._known_tests.update(records)
        self.late.known(set(records))
        if self.best is not None and self.best.member_id in records:
            self._best_tested(records[self.best.member_id])

    def _best_tested(self, record: TestRecord) -> None:
        assert self.best is not None
        if not record.failed:
            self.best.test_score = record.test_score
            if self.best.train_scores is not None:
                self.best.test_scores = record.test_scores

    @property
    def basis_elements(self) -> list[Any]:
        """Merged models the strategy added to the seeds' basis; workers must hold them too."""
        return list(getattr(self.strategy.problem.space, "extensions", []))

    def status(self) -> dict[str, Any]:
        best = None
        if self.best is not None:
            best = {"member_id": self.best.member_id, "train_score": self.best.train_score,
                    "test_score": self.best.test_score, **self.best_groups()}
        return {
            "evaluations": self.told, "issued": self.issued, "failed": self.failed, "budget": self.budget,
            "datapoints": self.told_datapoints, "datapoint_budget": self.datapoint_budget,
            "best": best, "archive": self.strategy.archive_summary(), "recovery": dict(self.recovery),
            "tests": self.test_counts(),
        }

    def test_counts(self) -> dict[str, int] | None:
        """Late tests (`test_every: archive`) measured, failed and still to come; None otherwise."""
        if self.late is None:
            return None
        return {"measured": self.late.measured, "failed": self.late.failed,
                "outstanding": len(self.late.pending) + len(self.late.inflight)}

    def best_groups(self) -> dict[str, Any]:
        """The best member's per-group scores, as keys only a search with groups has."""
        if self.best is None or self.best.train_scores is None:
            return {}
        return {"train_scores": dict(self.best.train_scores),
                "test_scores": None if self.best.test_scores is None else dict(self.best.test_scores)}

    # -- snapshots -----------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Everything needed to continue identically; children in flight are kept to re-send."""
        strategy_meta, strategy_arrays = self.strategy.state_dict()
        space = self.strategy.problem.space
        arrays = {f"strategy/{k}": np.asarray(v) for k, v in strategy_arrays.items()}
        pending = [candidate for _, candidate in sorted(self.inflight.items())]
        inflight = [{"member_id": c.member_id, "params": dict(c.params), "parents": list(c.parents),
                     "generation": c.generation, "topup_of": c.topup_of} for c in pending]
        arrays.update(space.pack([c.genome for c in pending], "inflight"))
        for c in pending:  # a subsampled child goes out again on the same datapoints
            arrays.update(_pack_subset(c, f"inflight_subsets/{c.member_id}"))
        best = None
        if self.best is not None:
            best = {"member_id": self.best.member_id, "train_score": self.best.train_score,
                    "test_score": self.best.test_score, "generation": self.best.generation,
                    "parents": list(self.best.parents), **self.best_groups()}
            arrays.update(space.pack([self.best.genome], "best"))
        if self._held is not None:  # asked of the strategy but never issued: kept for a larger budget
            held = self._held
            arrays.update(space.pack([held.genome], "held"))
            arrays.update(_pack_subset(held, "held_subset"))
        meta = {"issued": self.issued, "told": self.told, "failed": self.failed, "budget": self.budget,
                "inflight": inflight, "best": best, "strategy": strategy_meta,
                "staleness": [self.staleness_total, self.staleness_count], "recovery": dict(self.recovery),
                "asked_at": {str(k): v for k, v in self._asked_at.items()},
                "datapoints": [self.issued_datapoints, self.told_datapoints],
                "held": None if self._held is None else {
                    "params": dict(self._held.params), "parents": list(self._held.parents),
                    "generation": self._held.generation, "topup_of": self._held.topup_of}}
        if self.late is not None:  # tests asked for and not back: a resume sends them again
            meta["late_tests"], late_arrays = self.late.state_dict(space)
            arrays.update(late_arrays)
        return meta, arrays

    def load_state_dict(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> list[Candidate]:
        """Restore; returns the children that were in flight, to be sent out again."""
        prefix = "strategy/"
        self.strategy.load_state_dict(meta["strategy"],
                                      {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
        self.issued, self.told, self.failed = int(meta["issued"]), int(meta["told"]), int(meta["failed"])
        self.staleness_total, self.staleness_count = (int(v) for v in meta.get("staleness", (0, 0)))
        # Children in flight keep their ask order, so that their trials record it (and the
        # staleness counts them) after a resume; snapshots older than replay lack it: {}.
        self._asked_at = {int(k): int(v) for k, v in meta.get("asked_at", {}).items()}
        self.recovery = {**{"replayed": 0, "resent": 0, "redone": 0}, **meta.get("recovery", {})}
        self.issued_datapoints, self.told_datapoints = (int(v) for v in meta.get("datapoints", (0, 0)))
        if self.late is not None:
            self.late.load_state_dict(meta.get("late_tests"), arrays, self.strategy.problem.space)
        self._held = None
        held = meta.get("held")
        if held:
            self._held = Candidate(genome=self.strategy.problem.space.unpack(arrays, "held")[0],
                                   params=dict(held["params"]), parents=tuple(held["parents"]),
                                   generation=int(held["generation"]), topup_of=held.get("topup_of"))
            _unpack_subset(self._held, arrays, "held_subset")
        space = self.strategy.problem.space
        self.best = None
        if meta.get("best"):
            b = meta["best"]
            self.best = BestMember(int(b["member_id"]), float(b["train_score"]), b["test_score"],
                                   space.unpack(arrays, "best")[0], int(b["generation"]), list(b["parents"]),
                                   b.get("train_scores"), b.get("test_scores"))
        self.inflight = {}
        genomes = space.unpack(arrays, "inflight") if meta["inflight"] else []
        for item, genome in zip(meta["inflight"], genomes):
            candidate = Candidate(genome=genome, params=dict(item["params"]),
                                  parents=tuple(item["parents"]), generation=int(item["generation"]),
                                  member_id=int(item["member_id"]), topup_of=item.get("topup_of"))
            _unpack_subset(candidate, arrays, f"inflight_subsets/{candidate.member_id}")
            self.inflight[candidate.member_id] = candidate
        return list(self.inflight.values())


def genome_digest(space: Any, genome: Any) -> str:
    """The digest of a genome: a dense vector's own bytes, anything else as the space packs it
    (what a snapshot would store)."""
    if isinstance(genome, np.ndarray):  # no packed copy: a third of the cost on digits
        return replay_payload.digest({"values": genome})
    return replay_payload.digest(space.pack([genome], "g"))


def _pack_subset(candidate: Candidate, prefix: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if candidate.indices is not None:
        out[f"{prefix}/indices"] = np.asarray(candidate.indices, dtype=np.int64)
    if candidate.inclusion is not None:
        out[f"{prefix}/inclusion"] = np.asarray(candidate.inclusion, dtype=np.float64)
    if candidate.observed is not None:
        out[f"{prefix}/observed_indices"] = np.asarray(candidate.observed[0], dtype=np.int64)
        out[f"{prefix}/observed_scores"] = np.asarray(candidate.observed[1], dtype=np.float64)
    return out


def _unpack_subset(candidate: Candidate, arrays: dict[str, np.ndarray], prefix: str) -> None:
    if f"{prefix}/indices" in arrays:
        candidate.indices = np.asarray(arrays[f"{prefix}/indices"], dtype=np.int64)
    if f"{prefix}/inclusion" in arrays:
        candidate.inclusion = np.asarray(arrays[f"{prefix}/inclusion"], dtype=np.float64)
    if f"{prefix}/observed_indices" in arrays:
        candidate.observed = (np.asarray(arrays[f"{prefix}/observed_indices"], dtype=np.int64),
                              np.asarray(arrays[f"{prefix}/observed_scores"], dtype=np.float64))
