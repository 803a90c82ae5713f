"""Recipe genomes against the same operations done on dense vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import digits_config
from evomerge.genomes.basis import Basis, Piece
from evomerge.genomes.dense import angle_between, split_slerp
from evomerge.genomes.recipe import (PrefixGram, Recipe, default_grid, materialise_dense, pack_recipes,
                                     recipe_angle, recipe_dot, recipe_split_slerp, unpack_recipes)
from evomerge.genomes.spaces import RecipeSpace
from evomerge.strategies.base import Evaluation, Problem
from evomerge.strategies.m2n2 import M2N2


def _seeds(k: int, d: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=d).astype(np.float32)
    return [(base + 0.3 * rng.normal(size=d)).astype(np.float32) for _ in range(k)]


@pytest.mark.parametrize("k", [2, 4])
def test_chain_of_50_crossovers_matches_dense(k):
    d = 5000
    seeds = _seeds(k, d)
    basis = Basis.from_arrays(seeds)
    gram = basis.prefix_gram()
    rng = np.random.default_rng(1)
    recipes = [Recipe.seed(i, k, d) for i in range(k)]
    dense = [s.copy() for s in seeds]
    for _ in range(50):
        # always crossing the newest child keeps the chain 50 generations deep
        i, j = len(recipes) - 1, int(rng.integers(0, len(recipes)))
        split, ratio = int(rng.integers(0, d)), float(rng.uniform())
        recipes.append(recipe_split_slerp(recipes[i], recipes[j], split, ratio, gram))
        dense.append(split_slerp(dense[i], dense[j], split, ratio))
    errors = [float(np.abs(basis.materialise(r).numpy() - x).max()) for r, x in zip(recipes, dense)]
    assert max(errors) <= 1e-5
    assert recipes[-1].num_segments > 5  # the chain really did pile up split points


def test_gram_dot_and_angle_equal_dense_on_a_coarse_grid():
    d, k = 10_000, 3
    seeds = _seeds(k, d, seed=2)
    gram = Basis.from_arrays(seeds).prefix_gram(max_boundaries=64)
    assert gram.grid.size == 65 and gram.grid[-1] == d
    space = RecipeSpace(gram)
    rng = np.random.default_rng(3)
    a = space.crossover(space.seed_genome(0), space.seed_genome(1), space.draw_split(rng), 0.3)
    b = space.crossover(space.seed_genome(2), a, space.draw_split(rng), 0.8)
    assert set(b.breaks.tolist()) <= set(gram.grid.tolist())
    da, db = materialise_dense(a, seeds).astype(np.float64), materialise_dense(b, seeds).astype(np.float64)
    assert recipe_dot(a, b, gram) == pytest.approx(float(da @ db), rel=1e-6)
    assert recipe_angle(a, b, gram) == pytest.approx(angle_between(da, db), abs=1e-6)


def test_materialise_across_pieces_and_low_precision_seeds(monkeypatch):
    import evomerge.genomes.basis as basis_module

    monkeypatch.setattr(basis_module, "CHUNK", 1 << 14)
    rng = np.random.default_rng(4)
    k, sizes = 2, [7, 130_000, 5]  # the middle piece spans several fused chunks
    full = [rng.normal(size=sum(sizes)).astype(np.float32) for _ in range(k)]
    bf16 = [torch.from_numpy(f).to(torch.bfloat16) for f in full]
    pieces, start = [], 0
    for n in sizes:
        pieces.append(Piece(start, start + n, [t[start:start + n] for t in bf16]))
        start += n
    basis = Basis(pieces, start, k)
    recipe = Recipe(np.array([0, 3, 50_000, start - 2, start]), np.array([[1, 0], [0.25, 0.75], [0, 0], [-1, 2.0]]))
    expected = materialise_dense(recipe, [t.float().numpy() for t in bf16])
    out = torch.full((start,), 7.0)
    got = basis.materialise(recipe, out=out)
    assert got.data_ptr() == out.data_ptr()  # written into the reused buffer
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)


def test_pack_round_trip_and_size_independent_of_model_size():
    def packed_bytes(d: int) -> int:
        space = RecipeSpace(PrefixGram(default_grid(d, 1024), np.zeros((min(d, 1024) + 1, 2, 2))))
        rng = np.random.default_rng(5)
        archive = [space.seed_genome(0), space.seed_genome(1)]
        while len(archive) < 20:
            archive.append(recipe_split_slerp(archive[-1], archive[-2], space.draw_split(rng), 0.4, space.gram))
        arrays = pack_recipes(archive + [None], "genomes")
        back = unpack_recipes(arrays, "genomes")
        assert back[-1] is None and all(x.equals(y) for x, y in zip(archive, back[:-1]))
        return sum(a.nbytes for a in arrays.values())

    small, large = packed_bytes(1_000_000), packed_bytes(100_000_000)
    assert small < 10_000 and large < 10_000


def test_m2n2_on_recipes_follows_the_dense_search():
    """Same seed, same scores: recipe M2N2 makes the same choices as dense M2N2, and its
    children materialise to the dense children."""
    d, n = 300, 12
    seeds = _seeds(2, d, seed=6)
    basis = Basis.from_arrays(seeds)
    targets = np.random.default_rng(7).normal(size=(n, d)).astype(np.float32)

    def fitness(vec: np.ndarray) -> np.ndarray:
        return (targets @ vec > 0).astype(np.float32)

    dense = M2N2({}, Problem(dimension=d, num_datapoints=n, initial=seeds), seed=11)
    recipe = M2N2({}, Problem(dimension=d, num_datapoints=n, space=RecipeSpace(basis.prefix_gram())), seed=11)
    for step in range(60):
        cd, cr = dense.ask(), recipe.ask()
        cd.member_id = cr.member_id = step
        assert cd.params == cr.params
        vec = basis.materialise(cr.genome).numpy() if isinstance(cr.genome, Recipe) else cr.genome
        np.testing.assert_allclose(vec, cd.genome, atol=1e-5)
        scores = fitness(cd.genome)
        dense.tell(cd, Evaluation(step, scores))
        recipe.tell(cr, Evaluation(step, scores))
    np.testing.assert_array_equal(dense.ids, recipe.ids)


def test_recipe_search_on_ray_exports_what_it_scored(ray_session, tmp_path):
    from safetensors.numpy import load_file

    from evomerge.engine.search import SearchOptions, run_search
    from fitness.digits import DigitsTask

    config = digits_config("recipes", seeds="task", genome={"kind": "recipe"}, budget={"evaluations": 80},
                           strategy={"name": "m2n2", "options": {"mutation_sigma": 0.0}})
    summary = run_search(config, SearchOptions(out_dir=tmp_path / "run", progress=False))
    assert summary["evaluations"] == 80 and summary["failed"] == 0
    assert (tmp_path / "run" / "best.safetensors").stat().st_size < 50_000  # a recipe, not weights
    exported = tmp_path / "run" / "best" / "model.safetensors"
    weights = load_file(str(exported))
    task = DigitsTask({"train_size": 300})
    from fitness.digits import flatten
    params = flatten(weights["0.weight"].T, weights["0.bias"], weights["2.weight"].T, weights["2.bias"])
    assert float(task.evaluate(params).mean()) == pytest.approx(summary["best"]["train_score"])
