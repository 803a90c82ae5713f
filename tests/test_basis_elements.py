"""Merged models joining a recipe basis: the Gram grows exactly, recipes over the new element
materialise right, and M2N2 guided by DAM over checkpoint-style seeds snapshots and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.genomes.basis import Basis
from evomerge.genomes.columns import ColumnGenome
from evomerge.genomes.elements import pack_elements, unpack_elements
from evomerge.genomes.recipe import (PrefixGram, Recipe, default_grid, materialise_dense, pack_recipes,
                                     recipe_dot, recipe_split_slerp, unpack_recipes)
from evomerge.genomes.spaces import RecipeSpace
from evomerge.snapshots import load_snapshot, write_snapshot
from evomerge.strategies.base import Evaluation, Problem
from evomerge.strategies.m2n2 import M2N2


class _Vector:
    """A stand-in merged model: anything with materialise(basis, out=None) can join."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def materialise(self, basis: Basis, out: torch.Tensor | None = None) -> torch.Tensor:
        values = torch.from_numpy(self.values.copy())
        return values if out is None else out.copy_(values)


@pytest.mark.parametrize("max_boundaries", [1 << 16, 16])  # every index, and a coarse grid
def test_gram_grows_by_one_element_exactly(max_boundaries):
    rng = np.random.default_rng(0)
    seeds = [rng.standard_normal(300).astype(np.float32) for _ in range(2)]
    extra = rng.standard_normal(300).astype(np.float32)
    basis = Basis.from_arrays(seeds)
    gram = basis.prefix_gram(max_boundaries)
    basis.add_element(torch.from_numpy(extra))
    grown = gram.with_element(basis.values)
    fresh = PrefixGram.from_chunks(gram.grid, Basis.from_arrays([*seeds, extra]).values)
    assert grown.num_seeds == 3
    np.testing.assert_array_equal(grown.prefix[:, :2, :2], gram.prefix)  # old entries keep their bits
    np.testing.assert_allclose(grown.prefix, fresh.prefix, rtol=1e-12, atol=1e-9)
    np.testing.assert_array_equal(grown.prefix[:, 2, :], grown.prefix[:, :, 2])


def test_recipes_over_an_added_element_match_dense_vectors():
    rng = np.random.default_rng(1)
    d = 257
    seeds = [rng.standard_normal(d).astype(np.float32) for _ in range(2)]
    extra = rng.standard_normal(d).astype(np.float32)
    basis = Basis.from_arrays(seeds)
    space = RecipeSpace(basis.prefix_gram(), basis)
    element = space.add_element(_Vector(extra))
    assert space.num_seeds == 2 and space.num_elements == 3 and basis.num_elements == 3
    assert element.coeffs.shape == (1, 3) and element.coeffs[0, 2] == 1.0
    every = [*seeds, extra]
    pool = [space.seed_genome(0), space.seed_genome(1), element]  # widths 2, 2 and 3
    for _ in range(30):
        a, b = (pool[i] for i in rng.choice(len(pool), 2, replace=False))
        child = recipe_split_slerp(a, b, int(rng.integers(0, d)), float(rng.uniform()), space.gram)
        dense_a, dense_b = materialise_dense(a, every), materialise_dense(b, every)
        assert recipe_dot(a, b, space.gram) == pytest.approx(float(np.dot(dense_a.astype(np.float64), dense_b)),
                                                             rel=1e-6)  # dense side is float32
        np.testing.assert_allclose(basis.materialise(child).numpy(), materialise_dense(child, every), atol=1e-5)
        pool.append(child)
    unpacked = unpack_recipes(pack_recipes(pool, "p"), "p")
    assert all(u.equals(r) for u, r in zip(unpacked, pool))  # each keeps its own width


def test_materialising_a_recipe_without_its_element_is_refused():
    basis = Basis.from_arrays([np.ones(8, np.float32), np.zeros(8, np.float32)])
    with pytest.raises(ValueError, match="3 basis elements.*has 2"):
        basis.materialise(Recipe.seed(2, 3, 8))
    with pytest.raises(ValueError, match="NaN"):
        basis.add_element(torch.full((8,), float("nan")))


def test_elements_pack_without_pickle_in_order():
    from evomerge.genomes.columns import ColumnLayout

    layout = ColumnLayout.from_tensors([("w", (2, 3)), ("b", (2,))], lambda n, s: 1 if len(s) == 2 else None)
    genomes = [ColumnGenome.uniform(layout, 2), ColumnGenome.seed(layout, 1, 2)]
    arrays = pack_elements(genomes, "elements")
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    back = unpack_elements(arrays, "elements")
    assert [type(g) for g in back] == [ColumnGenome, ColumnGenome]
    assert all(b.equals(g) for b, g in zip(back, genomes))
    assert unpack_elements({}, "elements") == []
    with pytest.raises(ValueError, match="basis element"):
        pack_elements([np.zeros(3)], "elements")


# ---- M2N2 guided by DAM over a recipe basis (digits seeds, checkpoint-style) ---------------------

def _digits_problem():
    from fitness.digits import DigitsTask

    task = DigitsTask({"train_size": 200})
    seeds = task.make_seeds()
    basis = Basis.from_arrays(seeds)
    problem = Problem(dimension=task.dimension, num_datapoints=task.num_datapoints,
                      space=RecipeSpace(basis.prefix_gram(max_boundaries=256), basis))
    problem.task, problem.basis = task, basis
    return problem


def _run(strategy: M2N2, start: int, stop: int) -> list:
    task, basis = strategy.problem.task, strategy.problem.basis
    seen = []
    for member_id in range(start, stop):
        candidate = strategy.ask()
        candidate.member_id = member_id
        genome = candidate.genome
        params = (basis.materialise(genome) if isinstance(genome, Recipe) else genome.materialise(basis)).numpy()
        strategy.tell(candidate, Evaluation(member_id, task.evaluate(params), task.test_score(params)))
        seen.append(candidate)
    return seen


GUIDED = {"guide": {"from": "dam", "every": 10, "share": 0.25,
                    "options": {"steps": 20, "eval_every": 5, "batch_size": 64}}}


def test_dam_guide_joins_a_checkpoint_archive_as_a_new_element():
    strategy = M2N2(GUIDED, _digits_problem(), seed=0)
    _run(strategy, 0, 80)
    space = strategy.space
    assert space.extensions, "the DAM merge never joined the basis"
    assert all(isinstance(g, ColumnGenome) for g in space.extensions)
    assert space.num_seeds == 2 and space.num_elements == 2 + len(space.extensions)
    members = [g for g in strategy.genomes if g is not None]
    assert all(isinstance(g, Recipe) for g in members)  # the archive stays recipes
    joined = [g for g in members if g.coeffs.shape[1] > 2 and g.num_segments == 1 and g.coeffs[0, -1] == 1.0]
    for recipe in joined:  # "all of element k" is exactly the DAM merge it came from
        k = recipe.coeffs.shape[1] - 1 - 2
        np.testing.assert_array_equal(strategy.problem.basis.materialise(recipe).numpy(),
                                      space.extensions[k].materialise(strategy.problem.basis).numpy())


def test_dam_guided_checkpoint_search_resumes_identically(tmp_path: Path):
    straight = M2N2(GUIDED, _digits_problem(), seed=5)
    _run(straight, 0, 60)
    assert straight.space.extensions
    meta, arrays = straight.state_dict()
    meta, arrays = load_snapshot(write_snapshot(tmp_path, 60, json.loads(json.dumps(meta)), arrays))
    resumed = M2N2(GUIDED, _digits_problem(), seed=123)
    resumed.load_state_dict(meta, arrays)
    np.testing.assert_array_equal(resumed.space.gram.prefix, straight.space.gram.prefix)
    a, b = _run(straight, 60, 100), _run(resumed, 60, 100)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.params == y.params
        assert x.genome.equals(y.genome)
    np.testing.assert_array_equal(straight.ids, resumed.ids)
    np.testing.assert_array_equal(straight.scores, resumed.scores)
    assert len(resumed.space.extensions) == len(straight.space.extensions)


def test_max_elements_caps_basis_growth():
    options = {"guide": {**GUIDED["guide"], "every": 5, "max_elements": 1}}
    strategy = M2N2(options, _digits_problem(), seed=2)
    _run(strategy, 0, 100)
    assert len(strategy.space.extensions) <= 1


def test_recipe_space_snapshots_guide_genomes_among_recipes():
    """In flight and best may be a DAM candidate: the population packs them through the recipe space."""
    from evomerge.genomes.columns import ColumnLayout

    layout = ColumnLayout.from_tensors([("w", (4, 2))], lambda n, s: 1)
    basis = Basis.from_arrays([np.ones(8, np.float32), np.arange(8, dtype=np.float32)])
    space = RecipeSpace(basis.prefix_gram(), basis)
    mixed = [space.seed_genome(0), ColumnGenome.uniform(layout, 2), None, space.seed_genome(1)]
    arrays = space.pack(mixed, "inflight")
    back = space.unpack(arrays, "inflight")
    assert back[2] is None and isinstance(back[1], ColumnGenome) and back[1].equals(mixed[1])
    assert back[0].equals(mixed[0]) and back[3].equals(mixed[3])
