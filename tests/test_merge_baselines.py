"""Every merge method where a search can use it: static plans, CMA-ES layer-wise genomes, M2N2's seed_with."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from evomerge.genomes.basis import Basis
from evomerge.genomes.layerwise import LayerwiseGenome, pack_layerwise, unpack_layerwise
from evomerge.genomes.recipe import Recipe
from evomerge.genomes.spaces import RecipeSpace
from evomerge.merging import MERGE_METHODS
from evomerge.snapshots import load_snapshot, write_snapshot
from evomerge.strategies.base import Evaluation, Problem
from evomerge.strategies.cmaes import CMAES, CMAESOptions
from evomerge.strategies.m2n2 import M2N2
from evomerge.strategies.static import StaticMerges, StaticOptions
from fitness.digits import DigitsTask

TASK = DigitsTask({"train_size": 200})
SEEDS = TASK.make_seeds()


def _dense_problem() -> Problem:
    problem = Problem(dimension=TASK.dimension, num_datapoints=TASK.num_datapoints, initial=SEEDS)
    problem.task = TASK
    return problem


def _direct(method: str, weights=None, densities=None, base=0, **settings) -> np.ndarray:
    """The method applied tensor by tensor (digits' W1, b1, W2, b2) to the two seeds, directly."""
    op = MERGE_METHODS.get(method)
    out = np.zeros(TASK.dimension, dtype=np.float32)
    model_keys = set(op.model_params.model_fields)
    per = {k: v for k, v in settings.items() if k in model_keys}
    glob = {k: v for k, v in settings.items() if k not in model_keys}
    for spec in TASK.layout.tensors:
        views = [torch.from_numpy(s[spec.offset:spec.offset + spec.numel].copy()).view(spec.shape) for s in SEEDS]
        use_base = op.needs_base or op.pairwise  # nuslerp / multislerp: no base unless one is named
        others = [1] if use_base else [0, 1]
        w = [1.0] * len(others) if weights is None else [weights[k] for k in others]
        d = None if densities is None else [densities[k] for k in others]
        models = op.model_params_list(w, d, per)
        merged = op(views[base] if use_base else None, [views[k] for k in others], models, op.params(**glob),
                    key=spec.name)
        out[spec.offset:spec.offset + spec.numel] = merged.reshape(-1).numpy()
    return out


# ---- static strategy -----------------------------------------------------------------------------

def test_static_plan_takes_any_method_and_matches_the_operator():
    merges = [{"method": "ties", "parameters": {"density": 0.5}},
              {"method": "breadcrumbs", "parameters": {"density": 0.5, "gamma": 0.05}},
              {"method": "tsv"},
              {"method": "della_linear", "parameters": {"density": 0.5, "epsilon": 0.1, "seed": 4}},
              {"method": "linear", "weights": [1.0, 3.0]},
              {"method": "task_arithmetic", "parameters": {"lambda": 0.5}}]
    strategy = StaticMerges({"merges": merges, "slerp_points": [], "linear": False}, _dense_problem(), seed=0)
    plan = {params["merge"]: genome for params, genome in strategy.plan if "merge" in params}
    assert sorted(plan) == list(range(len(merges)))
    np.testing.assert_array_equal(plan[0], _direct("ties", density=0.5))
    np.testing.assert_array_equal(plan[1], _direct("breadcrumbs", density=0.5, gamma=0.05))
    np.testing.assert_array_equal(plan[2], _direct("tsv"))  # the matrices are merged as matrices
    np.testing.assert_array_equal(plan[3], _direct("della_linear", density=0.5, epsilon=0.1, seed=4))
    # linear weights (1, 3) normalised: (s0 + 3 s1)/4; task arithmetic λ .5 = the midpoint
    np.testing.assert_allclose(plan[4], (SEEDS[0] + 3 * SEEDS[1]) / 4, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(plan[5], SEEDS[0] + 0.5 * (SEEDS[1] - SEEDS[0]), rtol=1e-6, atol=1e-7)
    assert not np.array_equal(plan[0], plan[1])


def test_static_merge_specs_name_the_field():
    with pytest.raises(ValidationError) as info:
        StaticOptions.model_validate({"merges": [{"method": "soup"}]})
    assert info.value.errors()[0]["loc"][:3] == ("merges", 0, "method") and "ties" in str(info.value)
    with pytest.raises(ValidationError, match="gamma"):
        StaticOptions.model_validate({"merges": [{"method": "ties", "parameters": {"gamma": 0.1}}]})
    with pytest.raises(ValueError, match="merges.0: .*weights has 3 values"):
        StaticMerges({"merges": [{"method": "ties", "weights": [1, 1, 1]}]}, _dense_problem(), seed=0)


def test_recipe_space_static_plan_sends_layerwise_genomes_and_recipes():
    space = RecipeSpace(Basis.from_arrays(SEEDS).prefix_gram(), Basis.from_arrays(SEEDS))
    problem = Problem(dimension=TASK.dimension, num_datapoints=TASK.num_datapoints, space=space)
    strategy = StaticMerges({"merges": [{"method": "sce"}, {"method": "linear"}]}, problem, seed=0)
    plan = {params["merge"]: genome for params, genome in strategy.plan if "merge" in params}
    assert isinstance(plan[0], LayerwiseGenome) and plan[0].method == "sce"
    assert isinstance(plan[1], Recipe)
    np.testing.assert_allclose(plan[1].coeffs, [[0.5, 0.5]])


# ---- layer-wise genomes ---------------------------------------------------------------------------

def test_layerwise_genomes_pack_any_method_with_its_settings_and_read_old_snapshots():
    g = LayerwiseGenome("breadcrumbs_ties", np.array([[0.0, 0.7]]), np.array([[1.0, 0.4]]), 0,
                        np.array([0, 10]), None, {"gamma": 0.02, "normalize": True})
    old = LayerwiseGenome("ties", np.array([[0.0, 1.0]]), None, 0, np.array([0, 10]))
    arrays = pack_layerwise([g, None, old], "lw")
    back = unpack_layerwise(arrays, "lw")
    assert back[0].equals(g) and back[1] is None and back[2].equals(old)
    assert back[0].settings == {"gamma": 0.02, "normalize": True}
    legacy = {k: v for k, v in arrays.items() if not k.endswith(("method_names", "settings"))}
    legacy["lw/method"] = np.array([-1, -1, 2])  # a snapshot written before any method: index into METHODS
    legacy["lw/has_density"] = np.array([False, False, False])
    legacy["lw/densities"] = np.zeros((0, 2))
    legacy["lw/groups"], legacy["lw/segments"] = np.array([0, 0, 1]), np.array([0, 0, 1])
    legacy["lw/weights"], legacy["lw/boundaries"] = np.array([[0.0, 1.0]]), np.array([0, 10])
    legacy["lw/segment_group"], legacy["lw/base"] = np.array([0]), np.array([-1, -1, 0])
    assert unpack_layerwise(legacy, "lw")[2].equals(old)
    with pytest.raises(ValueError, match="epsilon"):
        LayerwiseGenome("ties", np.ones((1, 2)), None, 0, np.array([0, 10]), None, {"epsilon": 0.1})


def test_cmaes_layerwise_genomes_use_any_weighted_method():
    strategy = CMAES({"method": "breadcrumbs", "parameters": {"gamma": 0.05}, "popsize": 4}, _dense_problem(), seed=0)
    for _ in range(2):
        assert strategy.ask().params == {}  # the two seeds first
    candidate = strategy.ask()
    genome = strategy.coder.genome(strategy.samples[candidate.params["index"]])
    assert genome.method == "breadcrumbs" and genome.settings == {"gamma": 0.05} and genome.densities is not None
    np.testing.assert_array_equal(candidate.genome, genome.materialise(strategy.coder.basis).numpy())
    # one group per digits tensor: each tensor merged as breadcrumbs with its group's weight and density
    g = genome.num_groups
    assert g == 4
    for spec, gi in zip(TASK.layout.tensors, range(g)):
        op = MERGE_METHODS.get("breadcrumbs")
        views = [torch.from_numpy(s[spec.offset:spec.offset + spec.numel].copy()).view(spec.shape) for s in SEEDS]
        models = op.model_params_list([genome.weights[gi, 1]], [genome.densities[gi, 1]], {"gamma": 0.05})
        want = op(views[0], [views[1]], models, op.params(), key=spec.name).reshape(-1).numpy()
        np.testing.assert_array_equal(candidate.genome[spec.offset:spec.offset + spec.numel], want)
    with pytest.raises(ValidationError, match="karcher"):
        CMAESOptions.model_validate({"method": "karcher"})  # no per-model weights or densities
    with pytest.raises(ValidationError, match="parameters"):
        CMAESOptions.model_validate({"method": "ties", "parameters": {"gamma": 0.1}})


# ---- M2N2 seed_with ------------------------------------------------------------------------------

SEED_WITH = [{"method": "ties", "parameters": {"density": 0.5}}, {"method": "multislerp"}]


def _tell(strategy, candidate, member_id: int, scores: np.ndarray) -> None:
    candidate.member_id = member_id
    strategy.tell(candidate, Evaluation(member_id, scores, None))


def test_seed_with_dense_merges_join_the_archive_at_start():
    strategy = M2N2({"seed_with": SEED_WITH, "archive_size": 4}, _dense_problem(), seed=0)
    asked = [strategy.ask() for _ in range(4)]
    assert [c.params for c in asked] == [{}, {}, {"seed_with": 0}, {"seed_with": 1}]
    assert strategy.ask() is None  # children wait until all four initial members are scored
    np.testing.assert_array_equal(asked[2].genome, _direct("ties", density=0.5))
    np.testing.assert_array_equal(asked[3].genome, _direct("multislerp"))
    n = TASK.num_datapoints
    for i, c in enumerate(asked):  # each member best on its own quarter of the datapoints
        scores = np.zeros(n)
        scores[i * n // 4:(i + 1) * n // 4] = 1.0
        _tell(strategy, c, i, scores)
    assert sorted(strategy.ids.tolist()) == [0, 1, 2, 3]
    child = strategy.ask()
    assert child is not None and child.parents  # now crossing the merges with the seeds


def test_seed_with_recipe_space_adds_basis_elements_and_survives_a_snapshot(tmp_path):
    def problem() -> Problem:
        basis = Basis.from_arrays(SEEDS)
        return Problem(dimension=TASK.dimension, num_datapoints=TASK.num_datapoints,
                       space=RecipeSpace(basis.prefix_gram(), basis))

    options = {"seed_with": SEED_WITH + [{"method": "linear", "weights": [1, 3]}], "archive_size": 6}
    strategy = M2N2(options, problem(), seed=3)
    asked = [strategy.ask() for _ in range(5)]
    space = strategy.space
    # ties and multislerp became basis elements 2 and 3; the linear one is just its recipe
    assert [g.method for g in space.extensions] == ["ties", "multislerp"] and space.num_elements == 4
    np.testing.assert_array_equal(asked[2].genome.coeffs, [[0, 0, 1]])  # "all of element 2"
    np.testing.assert_array_equal(asked[3].genome.coeffs, [[0, 0, 0, 1]])
    np.testing.assert_allclose(asked[4].genome.coeffs, [[0.25, 0.75]])
    element = space.basis.values(0, space.size)[2].astype(np.float32)
    np.testing.assert_allclose(element, _flat_ties(), rtol=0, atol=0)
    n = TASK.num_datapoints
    for i, c in enumerate(asked):
        scores = np.zeros(n)
        scores[i * n // 5:(i + 1) * n // 5] = 1.0
        _tell(strategy, c, i, scores)
    assert sorted(strategy.ids[strategy.ids >= 0].tolist()) == [0, 1, 2, 3, 4]
    meta, arrays = strategy.state_dict()
    path = write_snapshot(tmp_path, 5, meta, arrays)
    meta2, arrays2 = load_snapshot(path)
    resumed = M2N2(options, problem(), seed=99)
    resumed.load_state_dict(meta2, arrays2)
    assert [g.method for g in resumed.space.extensions] == ["ties", "multislerp"]
    assert all(a.equals(b) for a, b in zip(resumed.space.extensions, space.extensions))
    np.testing.assert_array_equal(resumed.space.basis.values(0, space.size), space.basis.values(0, space.size))
    a, b = strategy.ask(), resumed.ask()  # the same child from the same archive and generator state
    np.testing.assert_array_equal(a.genome.breaks, b.genome.breaks)
    np.testing.assert_array_equal(a.genome.coeffs, b.genome.coeffs)


def _flat_ties() -> np.ndarray:
    """ties over the whole flat vector (a basis without a layout is one piece), by the operator."""
    op = MERGE_METHODS.get("ties")
    s0, s1 = (torch.from_numpy(s.copy()) for s in SEEDS)
    models = op.model_params_list([1.0], [0.5])
    return op(s0, [s1], models, op.params(), key="0:19210").numpy()


def test_a_run_folder_from_before_seed_with_resumes_without_force():
    from evomerge.engine.search import config_differences

    old = {"strategy": {"name": "m2n2", "options": {"archive_size": 20, "alpha": 1.0}}}
    new = {"strategy": {"name": "m2n2", "options": {"archive_size": 20, "alpha": 1.0, "seed_with": []}}}
    assert config_differences(old, new) == []  # a missing option counts as the strategy's default
    changed = {"strategy": {"name": "m2n2", "options": {"archive_size": 20, "alpha": 1.0,
                                                        "seed_with": [{"method": "ties"}]}}}
    assert [d.split(" ")[0] for d in config_differences(old, changed)] == ["strategy.options.seed_with"]
    static_new = {"strategy": {"name": "static", "options": {"linear": True, "merges": []}}}
    assert config_differences({"strategy": {"name": "static", "options": {"linear": True}}}, static_new) == []
