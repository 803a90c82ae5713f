"""CMA-ES: learning on digits, the async buffer, determinism, pickle-free resume, layerwise genomes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import evomerge.strategies.cmaes  # noqa: F401  (registers "cmaes")
from evomerge.engine.population import Population
from evomerge.genomes.basis import Basis, Piece
from evomerge.genomes.layerwise import (LayerwiseGenome, group_boundaries, layer_groups, pack_layerwise,
                                        unpack_layerwise)
from evomerge.genomes.recipe import Recipe
from evomerge.genomes.spaces import RecipeSpace
from evomerge.merging import MERGE_METHODS
from evomerge.models.layout import from_specs
from evomerge.snapshots import load_snapshot, write_snapshot
from evomerge.strategies import build_strategy
from evomerge.strategies.base import Candidate, Evaluation, Problem
from evomerge.strategies.cmaes import encode_es
from fitness.digits import DigitsTask

DIGITS = DigitsTask({"train_size": 200})
DIGITS_BOUNDS = [0, 64 * 256, 64 * 256 + 256, 64 * 256 + 256 + 2560, 19210]  # W1, b1, W2, b2


class Smooth:
    """A cheap continuous task on R^n: score_j = exp(-(a_j . x - b_j)^2) in (0, 1]."""

    def __init__(self, n: int, m: int = 12) -> None:
        rng = np.random.default_rng(42)
        self.a = rng.standard_normal((m, n)) / np.sqrt(n)
        self.b = rng.uniform(-1, 1, m)
        self.n, self.m = n, m

    def evaluate(self, genome: np.ndarray) -> np.ndarray:
        return np.exp(-(self.a @ np.asarray(genome, np.float64) - self.b) ** 2).astype(np.float32)

    def problem(self) -> Problem:
        return Problem(dimension=self.n, num_datapoints=self.m)


def _evaluate(task, candidate: Candidate, fail: bool = False) -> Evaluation:
    if fail:
        return Evaluation(candidate.member_id, None, None, "simulated failure")
    return Evaluation(candidate.member_id, task.evaluate(candidate.genome))


def _count_updates(strategy) -> list[int]:
    """Wrap pycma's tell to record how many results each generation update got."""
    sizes: list[int] = []
    tell = strategy.es.tell

    def spy(solutions, values, *args, **kwargs):
        sizes.append(len(solutions))
        return tell(solutions, values, *args, **kwargs)

    strategy.es.tell = spy
    return sizes


def _sync(strategy, task, evaluations: int, round_size: int = 4, fail_every: int = 0) -> list[Candidate]:
    """Sync dispatch: ask a round, tell it in id order."""
    seen: list[Candidate] = []
    while len(seen) < evaluations:
        batch = []
        for _ in range(round_size):
            candidate = strategy.ask()
            assert candidate is not None, "cmaes must never wait"
            candidate.member_id = len(seen) + len(batch)
            batch.append(candidate)
        for candidate in batch:
            fail = bool(fail_every) and candidate.member_id % fail_every == fail_every - 1
            strategy.tell(candidate, _evaluate(task, candidate, fail))
        seen.extend(batch)
    return seen


def _async(population: Population, task, steps: int, sim: np.random.Generator, inflight: list[Candidate],
           width: int = 8) -> list[tuple]:
    """Async dispatch: keep `width` in flight, complete a random one; returns what was issued."""
    issued = []
    for _ in range(steps):
        while len(inflight) < width:
            candidate = population.ask()
            assert candidate is not None, f"ask() returned None with only {len(inflight)} of {width} in flight"
            inflight.append(candidate)
            genome = candidate.genome
            issued.append((candidate.member_id, dict(candidate.params), np.asarray(genome).tobytes()))
        inflight.sort(key=lambda c: c.member_id)
        done = inflight.pop(int(sim.integers(len(inflight))))
        population.tell(_evaluate(task, done))
    return issued


def _es_state(strategy) -> tuple[dict, dict]:
    meta, arrays = encode_es(strategy.es)
    return meta, {k: v.tobytes() for k, v in arrays.items()}


# -- learning ------------------------------------------------------------------------------------
def test_improves_digits_from_scratch():
    task = DigitsTask({})
    strategy = build_strategy("cmaes", {}, Problem(task.dimension, task.num_datapoints), seed=0)
    assert strategy.diagonal and strategy.kind == "dense"  # 19,210 > auto_threshold: separable
    lam, generations = strategy.lam, 14
    scores: dict[int, list[float]] = {}
    for candidate in _sync(strategy, task, lam * generations, round_size=lam):
        scores.setdefault(candidate.params["generation"], []).append(
            float(task.evaluate(candidate.genome).mean()))
    first, last = np.mean(scores[1]), np.mean(scores[generations])
    assert strategy.updates == generations
    assert last > first + 0.03, f"mean train accuracy went {first:.3f} -> {last:.3f}"
    assert max(scores[generations]) > max(scores[1])


# -- buffering -----------------------------------------------------------------------------------
@pytest.mark.parametrize("popsize", [None, 4])  # λ > in-flight, and λ < in-flight (extras outnumber λ)
def test_buffered_ask_keeps_an_async_pool_busy(popsize):
    task = Smooth(30)
    strategy = build_strategy("cmaes", {"popsize": popsize}, task.problem(), seed=1)
    sizes = _count_updates(strategy)
    population = Population(strategy, budget=400)
    inflight: list[Candidate] = []
    _async(population, task, 300, np.random.default_rng(7), inflight, width=2 * 2 * 2)  # 2 workers, batch 2, depth 2
    assert strategy.updates == len(sizes) >= 300 // (strategy.lam + 8) - 1
    assert set(sizes) == {strategy.lam}, sizes
    assert not strategy.diagonal  # 30 dimensions: full covariance


def test_sync_rounds_tell_the_regular_samples():
    task = Smooth(10)
    strategy = build_strategy("cmaes", {"popsize": 6}, task.problem(), seed=2)
    sizes = _count_updates(strategy)
    candidates = _sync(strategy, task, 40, round_size=4)  # rounds of 4 over generations of 6
    assert set(sizes) == {6} and strategy.updates == len(sizes) >= 4
    first = [c.params["index"] for c in candidates if c.params["generation"] == 1]
    assert first[:6] == list(range(6)) and all(i >= 6 for i in first[6:])  # extras only after the λ


def test_failures_do_not_stall():
    task = Smooth(10)
    strategy = build_strategy("cmaes", {"popsize": 5}, task.problem(), seed=3)
    sizes = _count_updates(strategy)
    _sync(strategy, task, 40, round_size=5, fail_every=1)  # every evaluation fails
    assert strategy.updates == 8 and set(sizes) == {5}
    assert np.isfinite(strategy.es.sigma) and np.all(np.isfinite(strategy.es.mean))
    _sync(strategy, task, 60, round_size=4, fail_every=3)
    assert strategy.updates > 8
    assert 0.0 <= strategy.archive_summary()["best_train"] <= 1.0


# -- determinism and state -----------------------------------------------------------------------
def test_fixed_seed_is_deterministic_and_leaves_global_rng_alone():
    task = Smooth(20)

    def run(seed: int, disturb: bool) -> list:
        strategy = build_strategy("cmaes", {"popsize": 7}, task.problem(), seed=seed)
        out = []
        for c in _sync(strategy, task, 50, round_size=3):
            if disturb:
                np.random.rand(5)  # someone else in the process uses numpy's global RNG
            out.append((c.params, c.genome.tobytes()))
        return out

    np.random.seed(11)
    before = np.random.get_state()[1].copy()
    a = run(5, disturb=False)
    assert np.array_equal(np.random.get_state()[1], before), "cmaes must not touch numpy's global RNG"
    assert a == run(5, disturb=True)
    assert a != run(6, disturb=False)


CASES = {
    "dense-full": (lambda: Smooth(12).problem(), {"popsize": 6}),
    "dense-diagonal": (lambda: Smooth(40).problem(), {"diagonal": True}),
    "layerwise-ties-bounded": (lambda: Problem(DIGITS.dimension, DIGITS.num_datapoints, initial=DIGITS.make_seeds()),
                               {"method": "ties", "boundaries": DIGITS_BOUNDS}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_snapshot_mid_generation_resumes_bit_identically(case):
    make_problem, options = CASES[case]
    problem = make_problem()
    task = DIGITS if problem.initial else Smooth(problem.dimension)
    straight = Population(build_strategy("cmaes", options, problem, seed=9), budget=10_000)
    sim, inflight = np.random.default_rng(3), []
    _async(straight, task, 29, sim, inflight)
    while not straight.strategy.results:  # stop mid-generation: some results in, 8 children in flight
        _async(straight, task, 1, sim, inflight)
    assert straight.strategy.updates >= 1 and len(inflight) == 7  # the 8th just came back
    meta, arrays = straight.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        meta, arrays = load_snapshot(write_snapshot(Path(tmp), straight.told, meta, arrays))
    resumed = Population(build_strategy("cmaes", options, problem, seed=12345), budget=10_000)
    requeued = resumed.load_state_dict(meta, arrays)
    assert [c.member_id for c in requeued] == sorted(c.member_id for c in inflight)
    assert _es_state(resumed.strategy) == _es_state(straight.strategy)

    sim_copy = np.random.default_rng(3)
    sim_copy.bit_generator.state = sim.bit_generator.state
    requeued = sorted(requeued, key=lambda c: c.member_id)
    for step in range(40):  # same children, bit for bit, and the same pycma state after every tell
        assert _async(resumed, task, 1, sim_copy, requeued) == _async(straight, task, 1, sim, inflight), step
        assert _es_state(resumed.strategy) == _es_state(straight.strategy), step
    assert straight.strategy.updates >= 3


def test_snapshot_refuses_other_options():
    task = Smooth(12)
    strategy = build_strategy("cmaes", {"popsize": 6}, task.problem(), seed=0)
    meta, arrays = strategy.state_dict()
    other = build_strategy("cmaes", {"popsize": 8}, task.problem(), seed=0)
    with pytest.raises(ValueError, match="options or the problem changed"):
        other.load_state_dict(meta, arrays)


# -- layerwise genomes ---------------------------------------------------------------------------
def _tiny_seeds(k: int = 2, size: int = 10) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(size).astype(np.float32) for _ in range(k)]


def test_linear_and_task_arithmetic_genomes_are_recipes():
    seeds = _tiny_seeds()
    basis = Basis.from_arrays(seeds)
    bounds = [0, 4, 7, 10]
    weights = np.array([[0.2, 0.5], [1.0, 0.0], [0.3, 0.9]])
    linear = LayerwiseGenome("linear", weights, None, None, bounds)
    recipe = linear.to_recipe()
    assert isinstance(recipe, Recipe)
    expected = np.concatenate([weights[g, 0] * seeds[0][lo:hi].astype(np.float64)
                               + weights[g, 1] * seeds[1][lo:hi] for g, (lo, hi) in enumerate(zip(bounds, bounds[1:]))])
    np.testing.assert_allclose(basis.materialise(recipe).numpy(), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(linear.materialise(basis).numpy(), basis.materialise(recipe).numpy())

    ta = LayerwiseGenome("task_arithmetic", weights, None, 0, bounds)  # θ0 + w1 (θ1 − θ0); column 0 ignored
    expected = np.concatenate([seeds[0][lo:hi] + weights[g, 1] * (seeds[1][lo:hi] - seeds[0][lo:hi].astype(np.float64))
                               for g, (lo, hi) in enumerate(zip(bounds, bounds[1:]))])
    np.testing.assert_allclose(basis.materialise(ta.to_recipe()).numpy(), expected, rtol=1e-6, atol=1e-6)


def _two_tensor_basis(k: int = 3) -> Basis:
    seeds = _tiny_seeds(k, 10)
    pieces = [Piece(0, 6, [torch.from_numpy(s[:6].copy()) for s in seeds]),
              Piece(6, 10, [torch.from_numpy(s[6:].copy()) for s in seeds])]
    basis = Basis(pieces, 10, k)
    basis.layout = from_specs([("model.layers.0.w", (2, 3), "F32"), ("model.norm.weight", (4,), "F32")])
    return basis


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_sparse_genome_matches_the_merge_method_per_tensor(method):
    basis = _two_tensor_basis()
    weights = np.array([[0.0, 0.7, 0.4], [0.0, 0.2, 0.9]])
    densities = np.array([[1.0, 0.5, 0.34], [1.0, 0.75, 0.5]])
    genome = LayerwiseGenome(method, weights, densities, 0, group_boundaries(basis.layout))
    got = genome.materialise(basis).numpy()
    op = MERGE_METHODS.get(method)
    for g, (piece, spec) in enumerate(zip(basis.pieces, basis.layout.tensors)):
        views = [v.reshape(spec.shape) for v in piece.views]
        per_model = op.model_params_list(weights[g, 1:], densities[g, 1:])
        want = op(views[0], views[1:], per_model, op.params(), key=spec.name).reshape(-1).numpy()
        np.testing.assert_array_equal(got[piece.start:piece.stop], want)


def test_layer_groups_from_a_layout():
    layout = from_specs([("model.embed_tokens.weight", (4, 2), "F32"),
                         ("model.layers.0.attn.weight", (2, 2), "F32"), ("model.layers.0.mlp.weight", (2, 2), "F32"),
                         ("model.layers.1.attn.weight", (2, 2), "F32"), ("model.layers.2.attn.weight", (2, 2), "F32"),
                         ("model.norm.weight", (2,), "F32"), ("lm_head.weight", (4, 2), "F32")])
    one = layer_groups(layout, 1)
    assert one.labels == ("model.embed_tokens.weight", "layers.0", "layers.1", "layers.2", "model.norm.weight",
                          "lm_head.weight")
    assert one.boundaries.tolist() == [0, 8, 16, 20, 24, 26, 34]
    two = layer_groups(layout, 2)
    assert two.labels[1:3] == ("layers.0", "layers.1") and two.boundaries.tolist() == [0, 8, 20, 24, 26, 34]
    assert group_boundaries(DIGITS_BOUNDS).tolist() == DIGITS_BOUNDS
    assert group_boundaries(19210).tolist() == [0, 19210]


def test_layerwise_genomes_pack_without_pickle():
    a = LayerwiseGenome("ties", np.ones((2, 3)), np.full((2, 3), 0.5), 1, [0, 6, 10])
    b = LayerwiseGenome("linear", np.zeros((3, 3)), None, None, [0, 2, 5, 10], [0, 2, 1])
    out = unpack_layerwise(pack_layerwise([a, None, b], "g"), "g")
    assert out[1] is None and out[0].equals(a) and out[2].equals(b)


def test_layerwise_strategy_on_dense_and_recipe_spaces():
    seeds = DIGITS.make_seeds()
    dense = Problem(DIGITS.dimension, DIGITS.num_datapoints, initial=seeds)
    strategy = build_strategy("cmaes", {"boundaries": DIGITS_BOUNDS}, dense, seed=0)
    assert strategy.kind == "layerwise" and strategy.n == 8  # 4 groups x 2 seeds
    first = [strategy.ask() for _ in range(3)]
    assert [c.params for c in first[:2]] == [{}, {}]  # the seeds go first
    c = first[2]
    weights = np.array([[c.params[f"w_g{g}_s{k}"] for k in range(2)] for g in range(4)])
    assert np.all((weights >= 0) & (weights <= 1))
    genome = LayerwiseGenome("linear", weights, None, None, DIGITS_BOUNDS)
    assert c.genome.dtype == np.float32
    np.testing.assert_array_equal(c.genome, genome.materialise(Basis.from_arrays(seeds)).numpy())

    gram_space = RecipeSpace(Basis.from_arrays(seeds).prefix_gram())
    recipe_problem = Problem(DIGITS.dimension, DIGITS.num_datapoints, space=gram_space)
    linear = build_strategy("cmaes", {"boundaries": DIGITS_BOUNDS}, recipe_problem, seed=0)
    assert isinstance([linear.ask() for _ in range(3)][2].genome, Recipe)
    ties = build_strategy("cmaes", {"method": "ties", "boundaries": DIGITS_BOUNDS}, recipe_problem, seed=0)
    candidate = [ties.ask() for _ in range(3)][2]
    assert isinstance(candidate.genome, LayerwiseGenome) and candidate.genome.densities is not None
    assert ties.n == 8 and sorted(candidate.params)[:2] == ["d_g0_s1", "d_g1_s1"]  # 4 weights + 4 densities
    space = recipe_problem.space  # swapped so the population can snapshot layerwise members
    packed = space.pack([first_recipe := space.seed_genome(1), None, candidate.genome], "inflight")
    back = space.unpack(packed, "inflight")
    assert back[0].equals(first_recipe) and back[1] is None and back[2].equals(candidate.genome)


def test_layer_groups_come_from_the_task_or_the_checkpoints():
    seeds = DIGITS.make_seeds()
    problem = Problem(DIGITS.dimension, DIGITS.num_datapoints, initial=seeds)
    problem.task = DIGITS  # as the engine's build_problem sets it
    assert build_strategy("cmaes", {}, problem, seed=0).coder.groups.boundaries.tolist() == DIGITS_BOUNDS
    basis = _two_tensor_basis(2)
    space = RecipeSpace(basis.prefix_gram())
    problem = Problem(10, 3, space=space)
    problem.basis = basis
    strategy = build_strategy("cmaes", {"method": "task_arithmetic"}, problem, seed=0)
    assert strategy.coder.groups.labels == ("layers.0", "model.norm.weight") and strategy.n == 2
