"""One suite over every registered strategy: the ask/tell contract, determinism, snapshots, failures.

A new strategy is covered by registering it; nothing here names a strategy.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from evomerge.strategies import STRATEGIES, build_strategy
from evomerge.strategies.base import Candidate, Evaluation, Problem
from fitness.digits import DigitsTask

TASK = DigitsTask({"train_size": 200})
BUDGET = 60


def _problems(name: str) -> list[tuple[str, Problem]]:
    strategy = STRATEGIES.get(name)
    problems = []
    if strategy.supports_scratch:
        problems.append(("scratch", Problem(dimension=TASK.dimension, num_datapoints=TASK.num_datapoints)))
    if strategy.supports_seeds:
        problems.append(("seeds", Problem(dimension=TASK.dimension, num_datapoints=TASK.num_datapoints,
                                          initial=TASK.make_seeds())))
    return problems


CASES = [pytest.param(name, kind, problem, id=f"{name}-{kind}")
         for name in STRATEGIES.names() for kind, problem in _problems(name)]


def _vector(genome) -> np.ndarray:
    if isinstance(genome, np.ndarray):
        return genome
    raise AssertionError(f"dense problems must produce dense genomes, got {type(genome).__name__}")


def _evaluate(candidate: Candidate, fail: bool = False) -> Evaluation:
    if fail:
        return Evaluation(candidate.member_id, None, None, "simulated failure")
    params = _vector(candidate.genome)
    return Evaluation(candidate.member_id, TASK.evaluate(params), TASK.test_score(params))


def _drive(strategy, start: int, stop: int, fail_every: int = 0) -> list[Candidate]:
    """Sync-style driving: ask up to 4 at a time, tell in id order."""
    seen, member_id = [], start
    while member_id < stop:
        batch = []
        while len(batch) < 4 and member_id < stop:
            candidate = strategy.ask()
            if candidate is None:
                break
            candidate.member_id = member_id
            member_id += 1
            batch.append(candidate)
        assert batch, "ask() returned None with nothing in flight"
        for candidate in batch:
            fail = bool(fail_every) and candidate.member_id % fail_every == fail_every - 1
            strategy.tell(candidate, _evaluate(candidate, fail))
            seen.append(candidate)
    return seen


def _fingerprint(candidates: list[Candidate]) -> list:
    return [(c.params, c.parents, _vector(c.genome).tobytes()) for c in candidates]


@pytest.mark.parametrize("name,kind,problem", CASES)
def test_ask_tell_contract(name, kind, problem):
    strategy = build_strategy(name, {}, problem, seed=0)
    candidates = _drive(strategy, 0, BUDGET)
    assert len(candidates) == BUDGET
    for c in candidates:
        vec = _vector(c.genome)
        assert vec.shape == (problem.dimension,) and vec.dtype == np.float32 and np.isfinite(vec).all()
        assert all(isinstance(v, (int, float)) for v in c.params.values())
        json.dumps(c.params)  # params go to Optuna as they are
    if kind == "seeds":
        initial = [c for c in candidates if not c.parents][: len(problem.initial)]
        assert initial, "a strategy with seeds evaluates them"


@pytest.mark.parametrize("name,kind,problem", CASES)
def test_fixed_seed_is_deterministic(name, kind, problem):
    a = _drive(build_strategy(name, {}, problem, seed=5), 0, BUDGET)
    b = _drive(build_strategy(name, {}, problem, seed=5), 0, BUDGET)
    assert _fingerprint(a) == _fingerprint(b)


@pytest.mark.parametrize("name,kind,problem", CASES)
def test_snapshot_round_trip_resumes_identically(name, kind, problem):
    from evomerge.snapshots import load_snapshot, write_snapshot

    straight = build_strategy(name, {}, problem, seed=9)
    _drive(straight, 0, 30)
    meta, arrays = straight.state_dict()

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:  # through the real, pickle-free snapshot files
        path = write_snapshot(Path(tmp), 30, meta, arrays)
        meta, arrays = load_snapshot(path)
    resumed = build_strategy(name, {}, problem, seed=12345)  # the seed must come from the snapshot
    resumed.load_state_dict(meta, arrays)
    assert _fingerprint(_drive(resumed, 30, BUDGET)) == _fingerprint(_drive(straight, 30, BUDGET))


@pytest.mark.parametrize("name,kind,problem", CASES)
def test_failed_children_are_survived(name, kind, problem):
    strategy = build_strategy(name, {}, problem, seed=3)
    candidates = _drive(strategy, 0, BUDGET, fail_every=3)
    assert len(candidates) == BUDGET  # failures never stall ask()
    summary = strategy.archive_summary()
    if "best_train" in summary and summary["best_train"] is not None:
        assert 0.0 <= summary["best_train"] <= 1.0


@pytest.mark.parametrize("name,kind,problem", CASES)
def test_a_search_spends_its_budget_or_ends_when_the_strategy_is_exhausted(name, kind, problem):
    from evomerge.engine.population import Population

    population = Population(build_strategy(name, {}, problem, seed=4), BUDGET)
    genomes = []
    while not population.done:
        batch = population.ask_batch(4)
        assert batch, "nothing to ask while the population is not done"
        genomes.extend(_vector(c.genome).tobytes() for c in batch)
        for candidate in batch:
            population.tell(_evaluate(candidate))
    assert population.told == population.issued == len(genomes)
    if population.strategy.exhausted:  # it ended early, and never re-scored what it had offered
        assert population.told < BUDGET and population.finished_early
        assert len(set(genomes)) == len(genomes)
    else:
        assert population.told == BUDGET and not population.finished_early


def test_every_builtin_strategy_is_covered():
    assert {"m2n2", "ga"} <= set(STRATEGIES.names())
    assert {p.values[0] for p in CASES} == set(STRATEGIES.names())
