"""Batch sizing and batched asks: `workers.batch: auto` stays within bounds, and asking for a
batch gives exactly the children that asking one by one gives."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evomerge.config import config_from_dict
from evomerge.engine.dispatch import SYNC_AUTO_BATCH, BatchSizer
from evomerge.engine.population import Population
from evomerge.errors import ConfigError
from evomerge.strategies.base import Evaluation, Problem
from evomerge.strategies.m2n2 import M2N2


def _evals(seconds: float, n: int = 4) -> list[Evaluation]:
    return [Evaluation(i, np.zeros(3), seconds=seconds) for i in range(n)]


def test_fixed_batch_is_used_as_given():
    sizer = BatchSizer(7, sync=False)
    sizer.observe(_evals(10.0))
    assert sizer.size(unissued=1000, slots=4) == 7


def test_auto_in_sync_mode_is_fixed():
    sizer = BatchSizer("auto", sync=True)
    sizer.observe(_evals(1e-4))
    assert sizer.fixed == SYNC_AUTO_BATCH
    assert sizer.size(unissued=1000, slots=4) == SYNC_AUTO_BATCH


@pytest.mark.parametrize("seconds, expected", [
    (1e-6, BatchSizer.CAP),                           # near-free fitness: capped
    (0.0013, int(BatchSizer.TARGET_SECONDS / 0.0013)),  # digits
    (0.05, 1), (5.0, 1), (600.0, 1),                 # slow fitness: one child per call
])
def test_auto_aims_at_the_target_work_per_call(seconds, expected):
    sizer = BatchSizer("auto", sync=False)
    assert sizer.size(unissued=10_000, slots=4) == 1  # nothing measured yet
    for _ in range(30):
        sizer.observe(_evals(seconds))
    assert sizer.size(unissued=10_000, slots=4) == expected
    assert 1 <= expected <= BatchSizer.CAP


def test_auto_splits_the_end_of_the_budget_evenly():
    sizer = BatchSizer("auto", sync=False)
    sizer.observe(_evals(1e-5))
    for unissued in range(0, 300):
        size = sizer.size(unissued=unissued, slots=4)
        assert 1 <= size <= max(1, math.ceil(unissued / 4))


def test_auto_ignores_failures_without_a_time_and_recovers_from_a_slow_start():
    sizer = BatchSizer("auto", sync=False)
    sizer.observe(_evals(0.0))
    assert sizer.size(unissued=1000, slots=2) == 1
    sizer.observe(_evals(2.0, n=1))  # a slow first call (warm-up)
    for _ in range(20):
        sizer.observe(_evals(0.001))
    assert sizer.size(unissued=1000, slots=2) == int(BatchSizer.TARGET_SECONDS / 0.001)


def _population(seed: int) -> Population:
    strategy = M2N2({"archive_size": 5}, Problem(dimension=32, num_datapoints=10), seed=seed)
    return Population(strategy, budget=120)


def _tell_all(population: Population, candidates) -> None:
    for c in candidates:
        population.tell(Evaluation(c.member_id, (c.genome[:10] > 0).astype(np.float64)))


def test_ask_batch_gives_the_same_children_as_sequential_asks():
    one, many = _population(3), _population(3)
    sizes = [1, 3, 1, 8, 2, 16, 5]
    while not one.done:
        size = sizes[one.issued % len(sizes)]
        singles = []
        for _ in range(size):
            candidate = one.ask()
            if candidate is None:
                break
            singles.append(candidate)
        batch = many.ask_batch(size)
        assert [(c.member_id, c.params, c.parents, c.genome.tobytes()) for c in batch] == \
            [(c.member_id, c.params, c.parents, c.genome.tobytes()) for c in singles]
        _tell_all(one, singles)
        _tell_all(many, batch)
    assert many.ask_batch(10) == []  # budget spent


def test_ask_batch_stops_when_the_strategy_waits():
    population = _population(0)
    first = population.ask_batch(10)
    assert len(first) == 2  # the two random initial members; children need their scores first


def _config(batch):
    return config_from_dict({"name": "t", "fitness": {"task": "digits"}, "budget": {"evaluations": 10},
                             "workers": {"batch": batch}})


def test_config_batch_accepts_auto_and_counts():
    assert _config("auto").workers.batch == "auto"
    assert _config(12).workers.batch == 12


@pytest.mark.parametrize("bad", [0, -3, "fast", 2.5, True])
def test_config_batch_errors_name_the_field_and_the_fix(bad):
    with pytest.raises(ConfigError) as info:
        _config(bad)
    message = str(info.value)
    assert "workers.batch" in message and "auto" in message and ">= 1" in message


def test_staleness_counts_the_tells_between_a_childs_ask_and_its_own_tell():
    """Hand-worked: the 2 initial members are asked together and told in order (0 and 1 tells in
    between); then 3 children asked together and told in reverse (0, 1, 2). Mean 4/5."""
    from evomerge.engine.population import mean_staleness

    population = _population(1)
    _tell_all(population, population.ask_batch(2))
    children = population.ask_batch(3)
    assert len(children) == 3
    _tell_all(population, reversed(children))
    assert (population.staleness_total, population.staleness_count) == (0 + 1 + 0 + 1 + 2, 5)
    meta, _ = population.state_dict()
    assert mean_staleness(meta) == pytest.approx(4 / 5)
    assert mean_staleness({}) is None  # a snapshot from before the count
