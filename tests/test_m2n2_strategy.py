"""M2N2 as a strategy: initialisation, children by the crossover formula, replacement inside the
archive, ablation flags, determinism and state round trips; expected values worked by hand.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evomerge.errors import FitnessError
from evomerge.strategies import STRATEGIES, Candidate, Evaluation, Problem
from evomerge.strategies.m2n2 import GA, M2N2
from hand_worked import P_A3, S3

D, N = 8, 6  # genome size and datapoints of the toy problem




def toy_scores(genome: np.ndarray) -> np.ndarray:
    """Datapoint j is 'solved' when genome[j] > 0 (a 0/1 score with real niches)."""
    return (np.asarray(genome[:N]) > 0).astype(np.float64)


def _stack(genomes) -> np.ndarray:
    """The archive's dense genomes as one array (empty slots as NaN rows)."""
    size = next(g.size for g in genomes if g is not None)
    return np.stack([np.full(size, np.nan, np.float32) if g is None else g for g in genomes])


class Harness:
    """Synchronous driver that plays the engine's part: assigns ids, evaluates, tells."""

    def __init__(self, strategy, fitness=toy_scores, next_id: int = 0):
        self.s = strategy
        self.fitness = fitness
        self.next_id = next_id
        self.genomes: dict[int, np.ndarray] = {}
        self.log: list[Candidate] = []

    def ask(self) -> Candidate | None:
        cand = self.s.ask()
        if cand is not None:
            cand.member_id = self.next_id
            self.next_id += 1
            self.genomes[cand.member_id] = cand.genome.copy()
            self.log.append(cand)
        return cand

    def tell(self, cand: Candidate, scores=None, *, failed: bool = False):
        if failed:
            ev = Evaluation(member_id=cand.member_id, scores=None, error="boom")
        else:
            ev = Evaluation(member_id=cand.member_id, scores=self.fitness(cand.genome) if scores is None else scores)
        self.s.tell(cand, ev)

    def step(self) -> Candidate:
        cand = self.ask()
        assert cand is not None
        self.tell(cand)
        return cand

    def run(self, n: int) -> list[Candidate]:
        return [self.step() for _ in range(n)]


def spec_child(pa: np.ndarray, pb: np.ndarray, split: int, w: float) -> np.ndarray:
    """DESIGN.md's crossover formula, written out independently in float64."""
    a, b = pa.astype(np.float64), pb.astype(np.float64)
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    omega = math.acos(max(-1.0, min(1.0, cos)))
    t = np.where(np.arange(a.size) < split, w, 1.0 - w)
    if abs(math.sin(omega)) < 1e-6:
        return (1 - t) * a + t * b
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / math.sin(omega)


def test_from_scratch_initialisation_then_children():
    s = M2N2({}, Problem(dimension=D, num_datapoints=N), seed=0)
    h = Harness(s)
    assert s.sigma == 0.01  # from scratch: mutation on, sigma = 0.01
    i0, i1 = h.ask(), h.ask()
    for c in (i0, i1):
        assert c.parents == () and c.params == {} and c.generation == 0
        assert c.genome.shape == (D,)
    assert not np.array_equal(i0.genome, i1.genome)
    assert s.ask() is None  # nothing told yet
    h.tell(i0)
    assert s.ask() is None  # one initial member still out
    h.tell(i1)
    child = h.ask()
    assert child is not None
    assert set(child.params) == {"parent_a", "parent_b", "mix_ratio", "split_fraction"}
    assert child.params["parent_a"] in (0, 1) and child.params["parent_b"] in (0, 1)
    assert child.parents == (child.params["parent_a"], child.params["parent_b"])
    assert 0.0 <= child.params["mix_ratio"] < 1.0
    assert 0.0 <= child.params["split_fraction"] <= 1.0
    assert child.generation == 1


def test_init_members_option_and_init_sigma():
    s = M2N2({"init_members": 3}, Problem(dimension=4000, num_datapoints=N), seed=1)
    cands = [s.ask() for _ in range(3)]
    assert all(c is not None and c.parents == () for c in cands)
    assert s.ask() is None
    # N(0, 0.01^2): std over 4000 values is within ~2% of 0.01 (allow 10%), mean ~ 0.
    for c in cands:
        assert abs(float(np.std(c.genome)) - 0.01) < 0.001
        assert abs(float(np.mean(c.genome))) < 0.001


def test_children_follow_the_crossover_formula():
    # mutation_sigma = 0, so the child must be exactly the spec's split-point SLERP of its parents.
    s = M2N2({"mutation_sigma": 0.0, "archive_size": 5}, Problem(dimension=D, num_datapoints=N), seed=11)
    h = Harness(s)
    h.run(2)
    splits = set()
    for _ in range(60):
        c = h.step()
        split = round(c.params["split_fraction"] * D)
        assert split == pytest.approx(c.params["split_fraction"] * D)
        splits.add(split)
        expected = spec_child(h.genomes[c.params["parent_a"]], h.genomes[c.params["parent_b"]],
                              split, c.params["mix_ratio"])
        np.testing.assert_allclose(c.genome, expected, rtol=1e-5, atol=1e-7)
    assert len(splits) > 3  # the split is redrawn each time


def test_parents_come_from_the_current_archive():
    s = M2N2({"archive_size": 4}, Problem(dimension=D, num_datapoints=N), seed=2)
    h = Harness(s)
    h.run(2)
    for _ in range(50):
        c = h.ask()
        live = set(int(i) for i in s.ids if i >= 0)
        assert c.params["parent_a"] in live and c.params["parent_b"] in live
        h.tell(c)
    assert (s.ids >= 0).sum() <= 4


def test_failed_evaluation_never_enters_archive():
    s = M2N2({"archive_size": 4}, Problem(dimension=D, num_datapoints=N), seed=3)
    h = Harness(s)
    i0, i1 = h.ask(), h.ask()
    h.tell(i0, failed=True)
    assert np.all(s.ids == -1)
    h.tell(i1)
    assert sorted(int(i) for i in s.ids if i >= 0) == [1]
    # The one surviving initial member is both parents.
    c = h.ask()
    assert c.params["parent_a"] == 1 and c.params["parent_b"] == 1
    before = (s.ids.copy(), s.scores.copy(), _stack(s.genomes))
    h.tell(c, failed=True)
    np.testing.assert_array_equal(s.ids, before[0])
    np.testing.assert_array_equal(s.scores, before[1])
    np.testing.assert_array_equal(_stack(s.genomes), before[2])
    assert c.member_id not in s.ids


def test_all_random_initial_members_failed_draws_another():
    s = M2N2({}, Problem(dimension=D, num_datapoints=N), seed=3)
    h = Harness(s)
    i0, i1 = h.ask(), h.ask()
    h.tell(i0, failed=True)
    h.tell(i1, failed=True)
    again = h.ask()
    assert again is not None and again.parents == () and again.params == {}
    assert not np.array_equal(again.genome, i0.genome) and not np.array_equal(again.genome, i1.genome)
    assert s.ask() is None  # and waits for its score before making children
    h.tell(again, np.ones(N))
    child = h.ask()
    assert child.parents == (again.member_id, again.member_id)


def test_all_pretrained_seeds_failed_raises():
    seeds = [np.ones(D, np.float32), -np.ones(D, np.float32)]
    s = M2N2({}, Problem(dimension=D, num_datapoints=N, initial=seeds), seed=3)
    h = Harness(s)
    i0, i1 = h.ask(), h.ask()
    h.tell(i0, failed=True)
    h.tell(i1, failed=True)
    with pytest.raises(FitnessError, match="seed"):
        s.ask()


def test_replacement_inside_the_strategy():
    # archive_size = 3, seeds are irrelevant; scores are told by hand (the S3 example).
    s = M2N2({"archive_size": 3, "init_members": 3, "mutation_sigma": 0.0},
             Problem(dimension=D, num_datapoints=4), seed=4)
    h = Harness(s)
    init = [h.ask() for _ in range(3)]
    for cand, row in zip(init, S3):
        h.tell(cand, row.copy())
    assert list(s.ids) == [0, 1, 2]
    np.testing.assert_array_equal(s.scores, S3)
    # child [1,0,0,0] is the argmin (hand: f(c) = 1/3) -> archive unchanged
    c = h.ask()
    h.tell(c, np.array([1, 0, 0, 0.0]))
    assert list(s.ids) == [0, 1, 2]
    # child [0,0,1,1] replaces slot 2 (hand: f = [3/2, 5/6, 1/3, c: 4/3])
    c = h.ask()
    h.tell(c, np.array([0, 0, 1, 1.0]))
    assert list(s.ids) == [0, 1, c.member_id]
    np.testing.assert_array_equal(s.genomes[2], c.genome)
    np.testing.assert_array_equal(s.scores[2], [0, 0, 1, 1])
    # child [0,0,1,1] again, duplicating slot 2 = [0,0,1,1] (slot 1 = [1,0,0,1]):
    #   z = [2, 1, 2, 3]; f = [1/2+1, 1/2+1/3, 1/2+1/3, c: 1/2+1/3] = [3/2, 5/6, 5/6, 5/6]
    #   three-way tie at 5/6 -> an existing member goes first; the lowest index is slot 1.
    c2 = h.ask()
    h.tell(c2, np.array([0, 0, 1, 1.0]))
    assert list(s.ids) == [0, c2.member_id, c.member_id]


def test_continuous_tie_drops_existing_member_in_strategy():
    """DESIGN.md: "Ties go to existing members first", also for continuous scores once stored.

    (A float32 archive once broke this: float32(0.1) > 0.1 turned the tie into a loss.)

    Hand working: m0 = [1/10, 0], m1 = [0, 1/10], child = [1/10, 0] (duplicate of m0)
      z = [1/5, 1/10];  f(m0) = 1/2, f(m1) = 1, f(child) = 1/2  -> tie -> m0 (slot 0) dropped.
    """
    s = M2N2({"archive_size": 2, "mutation_sigma": 0.0}, Problem(dimension=D, num_datapoints=2), seed=5)
    h = Harness(s)
    i0, i1 = h.ask(), h.ask()
    h.tell(i0, np.array([0.1, 0.0]))
    h.tell(i1, np.array([0.0, 0.1]))
    assert list(s.ids) == [0, 1]
    c = h.ask()
    h.tell(c, np.array([0.1, 0.0]))
    assert list(s.ids) == [c.member_id, 1]


def test_empty_slot_fills_before_zero_scoring_member_is_dropped():
    """Empty slots fill before any member is dropped, even one that scores 0 everywhere
    (a deliberate deviation from the reference's argmin, which would evict it; see niches.py).

    Hand working: archive_size 3; member 0 told [0,0,0,0]; member 1 told [1,0,0,0]
      extended f = [0 (member 0), 0 (empty), 0 (empty), 1 (child)] -> should go to an empty slot.
    """
    s = M2N2({"archive_size": 3}, Problem(dimension=D, num_datapoints=4), seed=6)
    h = Harness(s)
    i0, i1 = h.ask(), h.ask()
    h.tell(i0, np.zeros(4))
    assert 0 in s.ids
    h.tell(i1, np.array([1, 0, 0, 0.0]))
    assert sorted(int(i) for i in s.ids if i >= 0) == [0, 1]


def test_ablation_no_crossover_exact_parent_copy():
    s = M2N2({"crossover": False, "mutation_sigma": 0.0, "archive_size": 4},
             Problem(dimension=D, num_datapoints=N), seed=8)
    h = Harness(s)
    h.run(2)
    for _ in range(20):
        c = h.step()
        assert "mix_ratio" not in c.params and "split_fraction" not in c.params
        assert c.parents == (c.params["parent_a"],)
        np.testing.assert_array_equal(c.genome, h.genomes[c.params["parent_a"]])


def test_ablation_no_crossover_adds_only_mutation_noise():
    dim = 4000
    s = M2N2({"crossover": False}, Problem(dimension=dim, num_datapoints=N), seed=9)
    h = Harness(s)
    h.run(2)
    c = h.step()
    noise = c.genome.astype(np.float64) - h.genomes[c.params["parent_a"]].astype(np.float64)
    # N(0, 0.01^2) on every parameter: std within 10% of 0.01, every entry perturbed.
    assert abs(float(np.std(noise)) - 0.01) < 0.001
    assert abs(float(np.mean(noise))) < 0.001
    assert np.count_nonzero(noise) == dim


def test_ablation_no_split_point():
    s = M2N2({"split_point": False, "mutation_sigma": 0.0, "archive_size": 4},
             Problem(dimension=D, num_datapoints=N), seed=10)
    h = Harness(s)
    h.run(2)
    for _ in range(20):
        c = h.step()
        assert c.params["split_fraction"] == 1.0
        # t = w on every element: whole-vector SLERP of the two parents.
        expected = spec_child(h.genomes[c.params["parent_a"]], h.genomes[c.params["parent_b"]], D,
                              c.params["mix_ratio"])
        np.testing.assert_allclose(c.genome, expected, rtol=1e-5, atol=1e-7)


def _loaded_strategy(options, seed):
    """A strategy whose archive is S3 in slots 0..2 (ids 100, 101, 102), via load_state_dict."""
    s = M2N2({"archive_size": 3, "mutation_sigma": 0.0, **options}, Problem(dimension=4, num_datapoints=4), seed)
    meta, arrays = s.state_dict()
    arrays = {k: np.array(v) for k, v in arrays.items()}
    arrays["scores"] = S3.astype(np.float32)
    arrays["ids"] = np.array([100, 101, 102])
    arrays["genomes/values"] = np.eye(4, dtype=np.float32)[:3] + 0.5
    arrays["genomes/present"] = np.ones(3, dtype=bool)
    meta = dict(meta, init_issued=2, init_told=2)
    s.load_state_dict(meta, arrays)
    return s


def test_attraction_flag_in_strategy():
    # On S3 with attraction: A = member 101 (slot 1) always has B = 100 (g = [1, 0, 0]).
    # Without attraction: B ~ f / sum f = [1/2, 1/3, 1/6] whatever A is.
    on = _loaded_strategy({}, seed=21)
    off = _loaded_strategy({"attraction": False}, seed=21)
    pairs_on = [(c.params["parent_a"], c.params["parent_b"]) for c in (on.ask() for _ in range(1500))]
    pairs_off = [(c.params["parent_a"], c.params["parent_b"]) for c in (off.ask() for _ in range(3000))]
    assert all(b == 100 for a, b in pairs_on if a == 101)
    assert all(a != b for a, b in pairs_on)
    b_off = np.array([b for _, b in pairs_off])
    np.testing.assert_allclose([np.mean(b_off == k) for k in (100, 101, 102)], P_A3, atol=0.035)
    assert np.mean(np.array([a == b for a, b in pairs_off])) == pytest.approx(7 / 18, abs=0.035)


def _run_sequence(seed, n, options=None):
    s = M2N2({"archive_size": 5, **(options or {})}, Problem(dimension=D, num_datapoints=N), seed=seed)
    return Harness(s).run(n)


def test_same_seed_same_children():
    a, b = _run_sequence(42, 40), _run_sequence(42, 40)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.genome, y.genome)
        assert x.params == y.params and x.parents == y.parents and x.generation == y.generation
    c = _run_sequence(43, 40)
    assert not np.array_equal(a[0].genome, c[0].genome)


def test_state_dict_round_trip_mid_run():
    problem = Problem(dimension=D, num_datapoints=N)
    s = M2N2({"archive_size": 5}, problem, seed=77)
    h = Harness(s)
    h.run(25)
    meta, arrays = s.state_dict()
    meta = json.loads(json.dumps(meta))  # must be JSON-able (no pickle)
    arrays = {k: np.array(v, copy=True) for k, v in arrays.items()}
    resume_id = h.next_id

    straight = h.run(15)

    s2 = M2N2({"archive_size": 5}, problem, seed=12345)  # different seed: the state must win
    s2.load_state_dict(meta, arrays)
    h2 = Harness(s2, next_id=resume_id)
    resumed = h2.run(15)
    for x, y in zip(straight, resumed):
        np.testing.assert_array_equal(x.genome, y.genome)
        assert x.params == y.params and x.parents == y.parents
    np.testing.assert_array_equal(s.ids, s2.ids)
    np.testing.assert_array_equal(s.scores, s2.scores)
    np.testing.assert_array_equal(_stack(s.genomes), _stack(s2.genomes))


def test_load_state_dict_rejects_wrong_shapes():
    s = M2N2({"archive_size": 5}, Problem(dimension=D, num_datapoints=N), seed=0)
    meta, arrays = s.state_dict()
    arrays = dict(arrays, scores=np.zeros((4, N), np.float32))
    with pytest.raises(ValueError):
        s.load_state_dict(meta, arrays)


def test_registry_and_defaults():
    assert STRATEGIES.get("m2n2") is M2N2
    assert STRATEGIES.get("ga") is GA
    ga = STRATEGIES.get("ga")({}, Problem(dimension=D, num_datapoints=N), seed=0)
    assert ga.options.alpha == 0.0 and ga.options.attraction is False
    assert ga.options.crossover is True and ga.options.split_point is True
    m = M2N2({}, Problem(dimension=D, num_datapoints=N), seed=0)
    o = m.options
    assert (o.archive_size, o.alpha, o.attraction, o.init_members, o.init_sigma) == (20, 1.0, True, 2, 0.01)
    assert m.sigma == 0.01


def test_ga_uses_plain_sum_replacement():
    # r0 = [1,1,0,0], r1 = [1,1,1,0]; child [0,0,0,1]:
    #   GA (alpha 0): f = [2, 3, 1] -> child dropped;  M2N2 (alpha 1): f = [1, 2, 1] -> r0 dropped (tie).
    def fill(cls):
        s = cls({"archive_size": 2, "mutation_sigma": 0.0}, Problem(dimension=D, num_datapoints=4), seed=0)
        h = Harness(s)
        i0, i1 = h.ask(), h.ask()
        h.tell(i0, np.array([1, 1, 0, 0.0]))
        h.tell(i1, np.array([1, 1, 1, 0.0]))
        c = h.ask()
        h.tell(c, np.array([0, 0, 0, 1.0]))
        return list(s.ids), c.member_id

    ids, _ = fill(GA)
    assert ids == [0, 1]
    ids, child = fill(M2N2)
    assert ids == [child, 1]


def test_pretrained_seeds():
    rng = np.random.default_rng(0)
    s1 = rng.standard_normal(D).astype(np.float32)
    s2 = rng.standard_normal(D).astype(np.float32)
    s1_copy = s1.copy()
    problem = Problem(dimension=D, num_datapoints=N, initial=[s1, s2])
    s = M2N2({}, problem, seed=0)
    assert s.sigma == 0.0  # mutation off by default with seeds
    h = Harness(s)
    c1, c2 = h.ask(), h.ask()
    np.testing.assert_array_equal(c1.genome, s1)
    np.testing.assert_array_equal(c2.genome, s2)
    assert c1.parents == () and c2.parents == ()
    assert s.ask() is None
    h.tell(c1)
    h.tell(c2)
    assert sorted(int(i) for i in s.ids if i >= 0) == [0, 1]  # both inserted by the replacement rule
    # Children of two seeds, no noise: exactly the spec's split-point SLERP.
    for _ in range(10):
        c = h.step()
        expected = spec_child(h.genomes[c.params["parent_a"]], h.genomes[c.params["parent_b"]],
                              round(c.params["split_fraction"] * D), c.params["mix_ratio"])
        np.testing.assert_allclose(c.genome, expected, rtol=1e-5, atol=1e-6)
    # The seed arrays themselves are not mutated by the search.
    np.testing.assert_array_equal(problem.initial[0], s1_copy)

    assert M2N2({"mutation_sigma": 0.05}, problem, seed=0).sigma == 0.05
    with pytest.raises(ValueError):
        M2N2({"archive_size": 2}, Problem(dimension=D, num_datapoints=N, initial=[s1, s2, s1]), seed=0)
