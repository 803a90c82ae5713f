"""Subsampled fitness (fitness.subsample): tasks scoring a subset, M2N2's rules on a child's
subset against hand-worked numbers, top-up, estimates, reproducible draws, the datapoint budget."""

from __future__ import annotations

import sys
from fractions import Fraction as Q

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from _common import load_population  # noqa: E402

from evomerge import snapshots  # noqa: E402
from evomerge.config import SubsampleSpec, config_from_dict  # noqa: E402
from evomerge.engine.local import run_local  # noqa: E402
from evomerge.engine.population import Population  # noqa: E402
from evomerge.errors import ConfigError  # noqa: E402
from evomerge.strategies.base import Candidate, Evaluation, Problem  # noqa: E402
from evomerge.strategies.m2n2 import M2N2  # noqa: E402
from evomerge.strategies.niches import estimate_unobserved, screen_slot  # noqa: E402
from evomerge.strategies.subsets import (allocate, decode_indices, draw_subset, encode_indices,  # noqa: E402
                                         subset_rng)
from evomerge.tasks import FitnessTask  # noqa: E402
from fitness.digits import DigitsTask  # noqa: E402

# The 3-member archive over 6 datapoints of every hand-worked case below.
ARCHIVE = np.array([[1, 1, 0, 0, 1, 0],
                    [1, 0, 1, 0, 0, 1],
                    [0, 1, 1, 1, 0, 0]], dtype=np.float64)
OBSERVED_ON = np.array([0, 2, 4])
HALF = np.full(3, 2.0)  # 3 of 6 drawn uniformly: each drawn datapoint stands for 6 / 3 = 2
INCLUSION = np.full(6, 0.5)  # the same draw as inclusion probabilities


class PlainTask(FitnessTask):
    """A task that cannot subsample (its evaluate takes no indices)."""

    dimension = 4
    num_datapoints = 3

    def evaluate(self, params):
        return np.zeros(3)


# -- the task side --------------------------------------------------------------------------
def test_digits_scores_exactly_the_requested_rows() -> None:
    task = DigitsTask({"train_size": 50})
    params = np.random.default_rng(0).normal(0, 0.05, task.dimension).astype(np.float32)
    full = task.evaluate(params)
    idx = np.array([1, 7, 8, 30, 49])
    assert np.array_equal(task.evaluate(params, idx), full[idx])
    with pytest.raises(ValueError, match="sorted, distinct"):
        task.evaluate(params, np.array([7, 1]))


def test_a_task_that_cannot_subsample_says_so_and_the_search_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot score a subset"):
        from evomerge.tasks import check_indices
        check_indices(PlainTask(), np.array([0]))
    data = {"name": "x", "fitness": {"task": "test_subsample:PlainTask", "subsample": {"size": 2}},
            "budget": {"evaluations": 10}}
    with pytest.raises(ConfigError, match=r"fitness.subsample.*cannot score a subset"):
        config_from_dict(data)
    data = {"name": "x", "fitness": {"task": "digits", "subsample": {"size": 2}}, "strategy": {"name": "dam"},
            "budget": {"evaluations": 10}}
    with pytest.raises(ConfigError, match=r"fitness.subsample.*strategy 'dam'"):
        config_from_dict(data)
    with pytest.raises(ConfigError, match="exactly one of `size`"):
        config_from_dict({"name": "x", "fitness": {"task": "digits", "subsample": {"size": 2, "fraction": 0.5}},
                          "budget": {"evaluations": 10}})


# -- the draw -------------------------------------------------------------------------------
def test_stratified_allocation_and_weights_by_hand() -> None:
    # loads [0, 0, 1, 2, 3, 3], 3 strata of 2: mean loads 0, 1.5, 3, rates 1, 0.4, 0.25 (alpha 1).
    # M = 4: one per stratum, then the last by share 2 : 0.8 : 0.5 -> the first stratum: 2, 1, 1.
    assert allocate(np.array([2, 2, 2]), np.array([1.0, 0.4, 0.25]), 4).tolist() == [2, 1, 1]
    load = np.array([0, 0, 1, 2, 3, 3], dtype=float)
    subset = draw_subset(load, 4, alpha=1.0, strata=3, rng=np.random.default_rng(0))
    assert subset.indices[:2].tolist() == [0, 1]  # the uncontested stratum is drawn whole
    assert subset.weights.tolist() == [1.0, 1.0, 2.0, 2.0]  # N_h / m_h
    assert {int(subset.indices[2])} <= {2, 3} and {int(subset.indices[3])} <= {4, 5}
    whole = draw_subset(load, 6, alpha=1.0, strata=3, rng=np.random.default_rng(0))
    assert whole.indices.tolist() == list(range(6)) and whole.weights.tolist() == [1.0] * 6


def test_draws_are_reproducible_from_the_childs_seed_and_encode_compactly() -> None:
    load = np.random.default_rng(1).integers(0, 20, 1437).astype(float)
    a = draw_subset(load, 144, 1.0, 4, subset_rng(7, 12)).indices
    b = draw_subset(load, 144, 1.0, 4, subset_rng(7, 12)).indices
    c = draw_subset(load, 144, 1.0, 4, subset_rng(7, 13)).indices
    assert np.array_equal(a, b) and not np.array_equal(a, c) and a.size == 144
    text = encode_indices(a, 1437)
    assert len(text) == 240 and np.array_equal(decode_indices(text, 1437), a)  # 180 bytes, base64


# -- the rules on a child's subset, by hand ---------------------------------------------------
def test_screen_on_the_childs_three_datapoints_by_hand() -> None:
    # Child right on 0, 2, 4. Loads with it: z0 = 3, z2 = 3, z4 = 2. Weighted by 2:
    # f'0 = 2(1/3 + 1/2) = 5/3, f'1 = 2(1/3 + 1/3) = 4/3, f'2 = 2(1/3) = 2/3, f'c = 2(1/3+1/3+1/2) = 7/3.
    assert screen_slot(ARCHIVE, np.array([1, 1, 1]), OBSERVED_ON, HALF, 1.0) == 2
    # Right on 4 only: z = 2, 2, 2: f'0 = 2, f'1 = 2, f'2 = 1, f'c = 1: a tie drops the member.
    assert screen_slot(ARCHIVE, np.array([0, 0, 1]), OBSERVED_ON, HALF, 1.0) == 2
    # Wrong everywhere: f'c = 0 is the least: the archive is unchanged.
    assert screen_slot(ARCHIVE, np.array([0, 0, 0]), OBSERVED_ON, HALF, 1.0) is None
    # An empty slot fills first, whatever the scores.
    assert screen_slot(ARCHIVE, np.zeros(3), OBSERVED_ON, HALF, 1.0, filled=np.array([1, 0, 1], bool)) == 1


def _strategy(topup: str, scores: np.ndarray = ARCHIVE) -> M2N2:
    problem = Problem(dimension=4, num_datapoints=6, subsample=SubsampleSpec(size=3, topup=topup))
    strategy = M2N2({"archive_size": 3, "mutation_sigma": 0.01}, problem, seed=0)
    strategy.scores[:] = scores
    strategy.ids[:] = [10, 11, 12]
    strategy.genomes = [np.full(4, float(k), dtype=np.float32) for k in range(3)]
    strategy.init_issued = strategy.init_told = strategy.init_target
    strategy._changed()
    return strategy


def _child(member_id: int) -> Candidate:
    return Candidate(genome=np.full(4, 9.0, dtype=np.float32), params={"parent_a": 10, "parent_b": 11},
                     parents=(10, 11), generation=1, member_id=member_id,
                     indices=OBSERVED_ON.copy(), inclusion=INCLUSION.copy())


@pytest.mark.parametrize("rest, slot", [
    # Rest wrong: full row [1,0,1,0,1,0]. Loads z = 3,2,3,1,2,1. f0 = 1/3+1/2+1/2 = 4/3,
    # f1 = 1/3+1/3+1 = 5/3, f2 = 1/2+1/3+1 = 11/6, fc = 1/3+1/3+1/2 = 7/6: the child is the least
    # fit after all, and is dropped (the archive stays as it was).
    ([0, 0, 0], None),
    # Right on 5 too: z5 = 2. f0 = 4/3, f1 = 1/3+1/3+1/2 = 7/6, f2 = 11/6, fc = 5/3: the full rule
    # drops member 1, not member 2 whom the subset had named.
    ([0, 0, 1], 1),
])
def test_topup_scores_the_rest_and_the_full_rule_decides(rest, slot) -> None:
    strategy = _strategy("archive")
    population = Population(strategy, budget=100)
    child = _child(member_id=50)
    population.inflight[50] = child
    population.issued = 51
    record = population.tell(Evaluation(50, np.array([1.0, 1.0, 1.0])))
    assert record.datapoints == 3 and decode_indices(record.indices, 6).tolist() == [0, 2, 4]
    assert strategy.ids.tolist() == [10, 11, 12]  # not inserted before its top-up
    topup = population.ask()
    assert topup.topup_of == 50 and topup.indices.tolist() == [1, 3, 5] and population.job(topup)[1] == 3.0
    record = population.tell(Evaluation(topup.member_id, np.array(rest, dtype=float)))
    assert record.datapoints == 3 and record.topup_of == 50
    assert record.train_score == pytest.approx((3 + sum(rest)) / 6)  # the full row's mean
    if slot is None:
        assert strategy.ids.tolist() == [10, 11, 12] and strategy.topup_counts["dropped"] == 1
        assert np.array_equal(strategy.scores, ARCHIVE)
    else:
        assert strategy.ids[slot] == 50 and strategy.topup_counts["kept"] == 1
        assert strategy.scores[slot].tolist() == [1, 0, 1, 0, 1, 1]
    assert population.best.member_id == 50  # 0.5+ beats nothing recorded: a full row can be the best


def test_estimates_of_unobserved_entries_by_hand() -> None:
    observed = np.array([[1, 1, 1, 1, 1, 1],
                         [1, 1, 1, 0, 0, 0],
                         [0, 0, 1, 1, 1, 1]], dtype=bool)
    scores = np.where(observed, ARCHIVE, 0.0)
    # abilities m = 1/2, 2/3, 1/2; difficulties (mean residual of the members seen at j):
    # d0 = (1/2 + 1/3)/2 = 5/12, d1 = (1/2 - 2/3)/2 = -1/12, d2 = (-1/2 + 1/3 + 1/2)/3 = 1/9,
    # d3 = d4 = 0, d5 = (-1/2 - 1/2)/2 = -1/2.
    est = estimate_unobserved(scores, observed, np.ones(3, bool))
    expected = ARCHIVE.copy()
    expected[1, 3:] = [float(Q(2, 3)), float(Q(2, 3)), float(Q(1, 6))]
    expected[2, :2] = [float(Q(11, 12)), float(Q(5, 12))]
    assert np.allclose(est, expected, rtol=0, atol=1e-12)
    assert np.array_equal(estimate_unobserved(ARCHIVE, np.ones((3, 6), bool), np.ones(3, bool)), ARCHIVE)


def test_topup_none_screens_on_estimates_and_keeps_the_observed_mask() -> None:
    observed = np.array([[1, 1, 1, 1, 1, 1],
                         [1, 1, 1, 0, 0, 0],
                         [0, 0, 1, 1, 1, 1]], dtype=bool)
    strategy = _strategy("none", np.where(observed, ARCHIVE, 0.0))
    strategy.observed[:] = observed
    strategy._changed()
    # On 0, 2, 4 with the estimates: member 1 at 4 is 2/3, member 2 at 0 is 11/12. z0 = 47/12,
    # z2 = 3, z4 = 8/3. f'0 = 2(12/47 + 3/8) = 1.261, f'1 = 2(12/47 + 1/3 + 1/4) = 1.677,
    # f'2 = 2(11/47 + 1/3) = 1.135, f'c = 2(12/47 + 1/3 + 3/8): member 2 goes.
    strategy.tell(_child(60), Evaluation(60, np.array([1.0, 1.0, 1.0])))
    assert strategy.ids.tolist() == [10, 11, 60] and not strategy.topups
    assert strategy.observed[2].tolist() == [True, False, True, False, True, False]
    assert strategy.scores[2].tolist() == [1, 0, 1, 0, 1, 0]


# -- whole searches -------------------------------------------------------------------------
ROWS = 400  # digits' first 400 training rows: the same search machinery, a quarter of the work


def _digits(budget: int, **overrides):
    return load_population("digits-scratch", {"budget.evaluations": budget, "seed": 5,
                                              "fitness.options": {"train_size": ROWS}, **overrides})


def _archive(population: Population):
    s = population.strategy
    return s.scores.copy(), s.ids.copy(), [np.asarray(g).copy() for g in s.genomes]


def test_m_equal_to_the_whole_set_is_bitwise_the_full_search() -> None:
    full = run_local(_digits(120))
    sub = run_local(_digits(120, **{"fitness.subsample": {"size": ROWS}}))
    for a, b in zip(_archive(full), _archive(sub)):
        if isinstance(a, list):
            assert all(np.array_equal(x, y) for x, y in zip(a, b))
        else:
            assert np.array_equal(a, b)
    assert sub.best.test_score == full.best.test_score and sub.told_datapoints == full.told_datapoints


def test_the_datapoint_budget_is_never_exceeded_and_nothing_fits_after() -> None:
    budget = ROWS * 30 + 157
    records = []
    config = _digits(10_000, **{"budget.datapoints": budget, "fitness.subsample": {"size": 30}})
    population = run_local(config, on_record=records.append)
    spent = sum(r.datapoints for r in records)
    assert spent == population.told_datapoints == population.issued_datapoints <= budget
    held = population._held  # the child that ended the search: it did not fit
    assert spent == budget or (held is not None and spent + population.cost(held) > budget)
    assert population.told > 30  # subsampled children: far more candidates than full evaluations
    full = run_local(_digits(10_000, **{"budget.datapoints": ROWS * 7 + 10}))
    assert full.told == 7 and full.told_datapoints == ROWS * 7


def test_subset_draws_and_topups_survive_a_snapshot(tmp_path) -> None:
    """Children in flight (subsampled, and top-ups) and top-ups queued go through a real snapshot;
    the resumed population continues exactly as the original."""
    config = _digits(400, **{"fitness.subsample": {"fraction": 0.1, "staged": False}})
    from evomerge.engine.actors import build_population
    from evomerge.engine.worker import FitnessWorker

    worker = FitnessWorker(config.model_dump(mode="json"), 0)

    def step(population: Population, queue: list) -> None:
        while len(queue) < 4:
            child = population.ask()
            if child is None:
                break
            queue.append(child)
        child = queue.pop(0)
        population.tell(worker.evaluate_one(child.member_id, child.genome, test_above=None,
                                            job=population.job(child)))

    original, queue = build_population(config), []
    while original.strategy.topup_counts["asked"] < 3:
        step(original, queue)
    meta, arrays = original.state_dict()
    snapshots.write_snapshot(tmp_path, original.told, {"population": meta}, arrays)
    _, meta2, arrays2 = snapshots.load_latest_snapshot(tmp_path)
    resumed = build_population(config)
    requeued = sorted(resumed.load_state_dict(meta2["population"], arrays2), key=lambda c: c.member_id)
    assert any(c.subsampled for c in requeued) and all(
        np.array_equal(a.indices, b.indices) for a, b in zip(queue, requeued) if a.subsampled)
    queue2 = list(requeued)
    for _ in range(60):
        step(original, queue)
        step(resumed, queue2)
    for a, b in zip(_archive(original), _archive(resumed)):
        if isinstance(a, list):
            assert all(np.array_equal(x, y) for x, y in zip(a, b))
        else:
            assert np.array_equal(a, b)
    assert original.strategy.topup_counts == resumed.strategy.topup_counts
    assert original.told_datapoints == resumed.told_datapoints


def test_cmaes_scores_each_generation_on_one_shared_subset() -> None:
    config = load_population("digits-scratch", {"budget.evaluations": 60, "seed": 2, "strategy.name": "cmaes",
                                                "strategy.options": {"popsize": 8},
                                                "fitness.options": {"train_size": ROWS},
                                                "fitness.subsample": {"size": 200}})
    records = []
    population = run_local(config, on_record=records.append, in_flight=3)
    by_generation: dict[int, set[str]] = {}
    for r in records:
        assert r.datapoints == 200 and r.indices is not None
        by_generation.setdefault(int(r.params["generation"]), set()).add(r.indices)
    assert len(by_generation) >= 6 and all(len(v) == 1 for v in by_generation.values())
    assert len(set.union(*by_generation.values())) == len(by_generation)  # a fresh subset each generation
    assert population.strategy.updates >= 6


def test_a_staged_topup_doubles_what_is_observed_with_exact_inclusion() -> None:
    from evomerge.strategies.subsets import widen
    # 2 of 8 observed at probability 1/4 each: 2 more from the 6 unobserved, so every datapoint
    # is observed after the stage with 1/4 + (3/4)(2/6) = 1/2.
    stage = widen(np.array([0, 2]), np.full(8, 0.25), np.random.default_rng(0))
    assert stage.indices.size == 2 and not set(stage.indices.tolist()) & {0, 2}
    assert np.allclose(stage.inclusion, 0.5)
    # 4 of 8 observed: doubling reaches half of the rest, so the rest comes whole.
    stage = widen(np.arange(4), np.full(8, 0.5), np.random.default_rng(0))
    assert stage.indices.tolist() == [4, 5, 6, 7] and np.allclose(stage.inclusion, 1.0)
    records = []
    run_local(_digits(300, **{"fitness.subsample": {"size": 25, "staged": True}}), on_record=records.append)
    stages = {r.datapoints for r in records if r.topup_of is not None}
    assert stages == {25, 50, 100, 200}  # 25 observed, then 50, 100, 200, then the rest (200)


def test_pipeline_auto_queues_nothing_ahead_for_slow_evaluations() -> None:
    from evomerge.engine.dispatch import BatchSizer, auto_depth

    sizer = BatchSizer("auto", sync=False)
    assert auto_depth(sizer) == 1  # nothing measured yet: one call per worker
    sizer.observe([Evaluation(0, np.zeros(1), seconds=0.002)] * 3)
    assert auto_depth(sizer) == 2 and sizer.size(100, 4) > 1  # a 2 ms fitness: queued, batched
    for _ in range(7):
        sizer.observe([Evaluation(0, np.zeros(1), seconds=1.5)])
    assert auto_depth(sizer) == 1 and sizer.size(100, 4) == 1  # 1.5 s: one child, asked when a worker is free


def test_a_resume_with_a_larger_datapoint_budget_continues_as_one_straight_run(tmp_path) -> None:
    """The child that did not fit the first budget is kept in the snapshot and goes first."""
    from evomerge.engine.actors import build_population
    from evomerge.engine.worker import FitnessWorker

    small, large = ROWS * 20 + 100, ROWS * 45
    config = _digits(100_000, **{"budget.datapoints": large, "fitness.subsample": {"size": 40}})
    worker = FitnessWorker(config.model_dump(mode="json"), 0)

    def drive(population: Population) -> None:
        while not population.done:
            child = population.ask()
            if child is None:
                break
            population.tell(worker.evaluate_one(child.member_id, child.genome,
                                                test_above=population.test_threshold(), job=population.job(child)))

    straight = build_population(config)
    drive(straight)
    first = build_population(config)
    first.datapoint_budget = small
    drive(first)
    assert first._held is not None and first.told_datapoints <= small
    meta, arrays = first.state_dict()
    snapshots.write_snapshot(tmp_path, first.told, {"population": meta}, arrays)
    _, meta2, arrays2 = snapshots.load_latest_snapshot(tmp_path)
    resumed = build_population(config)
    assert resumed.load_state_dict(meta2["population"], arrays2) == []
    drive(resumed)
    for a, b in zip(_archive(straight), _archive(resumed)):
        if isinstance(a, list):
            assert all(np.array_equal(x, y) for x, y in zip(a, b))
        else:
            assert np.array_equal(a, b)
    assert resumed.told == straight.told and resumed.told_datapoints == straight.told_datapoints <= large


def test_ga_uses_the_same_mechanism() -> None:
    records = []
    population = run_local(_digits(150, **{"strategy.name": "ga", "strategy.options": {},
                                           "fitness.subsample": {"size": 25}}), on_record=records.append)
    children = [r for r in records if r.parents and r.topup_of is None]
    assert children and all(r.datapoints == 25 and r.partial for r in children)
    assert population.strategy.topup_counts["asked"] > 0 and any(r.topup_of is not None for r in records)
