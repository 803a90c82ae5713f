"""The ask/tell contract every search strategy follows (pycma style: plain ask, plain tell).

The engine owns ids, workers and recording; a strategy only proposes genomes and learns from
per-datapoint scores, so the same strategy runs in-process, on Ray, or from a snapshot.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

Params = dict[str, float | int]


@dataclass
class Problem:
    """What a strategy needs to know about the search space."""

    dimension: int
    num_datapoints: int
    initial: list[np.ndarray] = field(default_factory=list)  # dense pretrained seeds; empty = from scratch
    space: Any = None  # a genome space (evomerge.genomes.spaces); dense over `initial` by default
    task: Any = field(default=None, repr=False, compare=False)   # fitness task: DAM trains on its forward and data
    basis: Any = field(default=None, repr=False, compare=False)  # the seeds as a Basis when merging checkpoints
    # fitness.subsample (a SubsampleSpec) when children are scored on part of the set; None: all of it
    subsample: Any = field(default=None, compare=False)
    # The engine's async mode: a strategy may do long work (DAM's training) on a thread and let
    # ask() return None meanwhile. Off in sync mode, where the order of candidates must not
    # depend on timing.
    background: bool = field(default=False, compare=False)
    # The task's groups (skills) as (name, number of datapoints), contiguous in datapoint order;
    # None: one objective. Strategies select on all datapoints either way.
    groups: list[tuple[str, int]] | None = None
    # On Ray: the fitness workers' actor handles, and which of them the dispatcher still counts
    # live (indices). DAM's `train_on: worker` trains there; None in-process (run_local, tests).
    workers: list[Any] | None = field(default=None, repr=False, compare=False)
    live_workers: Any = field(default=None, repr=False, compare=False)  # Callable[[], list[int]]

    def __post_init__(self) -> None:
        if self.space is None:
            from evomerge.genomes.spaces import DenseSpace

            self.space = DenseSpace(self.dimension, self.initial)

    @property
    def from_scratch(self) -> bool:
        return self.space.num_seeds == 0


@dataclass
class Candidate:
    genome: Any  # a dense vector or a recipe, as the problem's genome space defines
    params: Params = field(default_factory=dict)
    parents: tuple[int, ...] = ()
    generation: int = 0
    member_id: int = -1  # assigned by the population when issued
    # How the strategy made the genome (a `Lineage`, `{"seed": i}`, ...): what a trial records so
    # that a resume can rebuild the child without evaluating it again (evomerge/engine/replay.py).
    origin: Any = field(default=None, repr=False, compare=False)
    # Subsampling (fitness.subsample): the datapoints to score, sorted; None: all of them.
    indices: np.ndarray | None = None
    # (N,) each datapoint's probability of being observed by the child's draw (strategies/subsets.py)
    inclusion: np.ndarray | None = None
    # A top-up: the rest of the set for child `topup_of`, whose `observed` (indices, scores) are
    # merged with this evaluation's into its full row before the strategy is told.
    topup_of: int | None = None
    observed: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def subsampled(self) -> bool:
        return self.indices is not None


@dataclass
class Evaluation:
    member_id: int
    scores: np.ndarray | None  # per training datapoint, in [0, 1]; None when failed
    test_score: float | None = None
    error: str | None = None
    seconds: float = 0.0
    _mean: float | None = field(default=None, repr=False, compare=False)
    test_scores: dict[str, float] | None = None  # held-out score per group (tasks with groups)
    started: float | None = None  # wall clock (time.time()) when the worker began; None: not run

    @property
    def failed(self) -> bool:
        return self.scores is None

    @property
    def train_score(self) -> float | None:
        if self.scores is None:
            return None
        if self._mean is None:
            self._mean = float(np.mean(self.scores))
        return self._mean

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Right/wrong scores (digits, exact match) travel as bits: 32x smaller, which keeps a
        # worker's reply for a whole batch small enough to skip Ray's object store. The mean
        # travels too: computed where the scores were made, not in the busy population actor.
        return (_evaluation_from_wire, (self.member_id, _scores_to_wire(self.scores), self.test_score,
                                        self.error, self.seconds, self.train_score, self.test_scores,
                                        self.started))


def _scores_to_wire(scores: np.ndarray | None) -> Any:
    if not isinstance(scores, np.ndarray) or scores.ndim != 1 or scores.dtype.kind != "f":
        return scores
    bits = scores.astype(bool)
    if not np.array_equal(bits, scores) or np.signbit(scores).any():  # only exact 0.0 / 1.0 pack
        return scores
    return ("bits", np.packbits(bits), scores.size, scores.dtype.str)


def _evaluation_from_wire(member_id: int, scores: Any, test_score: float | None, error: str | None,
                          seconds: float, mean: float | None = None,
                          test_scores: dict[str, float] | None = None, started: float | None = None) -> "Evaluation":
    if isinstance(scores, tuple):
        _, packed, size, dtype = scores
        scores = np.unpackbits(packed, count=size).astype(np.dtype(dtype))
    return Evaluation(member_id, scores, test_score, error, seconds, mean, test_scores, started)


class StrategyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Strategy(ABC):
    """Subclass, set `Options`, and register with `@STRATEGIES.register(name)`."""

    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    # Which searches a strategy can run: from scratch (dense genomes), and/or from seeds.
    supports_scratch: ClassVar[bool] = True
    supports_seeds: ClassVar[bool] = True
    # Whether the strategy reads `Problem.subsample` (fitness.subsample) and judges children on a subset.
    supports_subsample: ClassVar[bool] = False

    def __init__(self, options: dict[str, Any] | StrategyOptions, problem: Problem, seed: int) -> None:
        self.options = options if isinstance(options, BaseModel) else self.Options.model_validate(options or {})
        self.problem = problem
        self.rng = np.random.default_rng(seed)

    @abstractmethod
    def ask(self) -> Candidate | None:
        """Next genome to evaluate, or None when results must come back first."""

    @abstractmethod
    def tell(self, candidate: Candidate, evaluation: Evaluation) -> None:
        """Learn from one evaluation; failed evaluations are told too (and usually ignored)."""

    @abstractmethod
    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-able metadata plus named arrays: everything needed to continue identically."""

    @abstractmethod
    def load_state_dict(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        ...

    def take_admitted(self) -> list[tuple[int, Any]] | None:
        """The members that entered the archive since the last call, as (member id, genome), and
        forget them: `fitness.test_every: archive` tests each one. None: this strategy keeps no
        archive, and `archive` tests the new bests only, as `best` does."""
        return None

    def archive_summary(self) -> dict[str, Any]:
        """Small, display-oriented view of the strategy's population (for status tables)."""
        return {}

    @property
    def busy(self) -> bool:
        """True while the strategy works in the background and has nothing to ask. With nothing
        in flight, the engine then waits for it, where a None from ask() would be a stall."""
        return False

    def wait(self, timeout: float) -> None:
        """Block until the background work is done, or `timeout` seconds have passed."""

    @property
    def exhausted(self) -> bool:
        """True when further asks could only repeat what was already proposed (DAM after
        training, the static merges after their plan): a search ends once those children are
        back instead of spending the rest of its budget re-scoring them, and a host strategy
        stops giving it turns."""
        return False

    # -- replay on resume (evomerge/engine/replay.py) -------------------------------------------
    def allow_background(self, allowed: bool) -> bool:
        """Whether ask() may hand long work to a thread (`Problem.background`); returns the old
        setting. A resume turns it off while it asks the strategy again for the children of the
        trials it replays: an ask that returned None because a thread was still busy would leave
        out a child the crashed search had."""
        previous, self.problem.background = self.problem.background, allowed
        return previous

    def expect(self, params: dict[str, Any] | None) -> None:
        """A resume's hint before it asks again: the params the crashed search's child for this
        ask had (None: no trial says). A strategy whose asks depended on timing (a guide's turn
        that found DAM still training) follows it; the default needs none."""

    # RNG state travels as JSON, never pickled.
    def _rng_state(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def _set_rng_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state
