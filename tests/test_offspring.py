"""Children bred on the workers: the same bits as bred in the population, parents sent once,
stale caches detected and repaired, scores on the wire lossless, and a search that does not
change when breeding moves."""

from __future__ import annotations

import pickle

import numpy as np
import optuna
import pytest
from safetensors.numpy import load_file

from conftest import digits_config
from evomerge.engine.dispatch import Dispatcher
from evomerge.engine.actors import build_population
from evomerge.engine.search import SearchOptions, run_search
from evomerge.engine.worker import FitnessWorker
from evomerge.genomes.offspring import (
    Lineage,
    Offspring,
    ParentCache,
    ParentMirror,
    StaleParents,
    breed,
)
from evomerge.genomes.spaces import DenseSpace
from evomerge.strategies.base import Candidate, Evaluation, Problem
from evomerge.strategies.m2n2 import M2N2
from evomerge.tracking.storage import open_storage

D = 301


def _parents(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(D).astype(np.float32), rng.standard_normal(D).astype(np.float32))


def test_breed_is_split_slerp_then_seeded_noise():
    a, b = _parents()
    lineage = Lineage(parent_ids=(4, 9), slots=(0, 1), split=120, ratio=0.3, sigma=0.01, noise_seed=77)
    child = breed([a, b], lineage)
    # By hand: one angle over the whole vectors, t = 0.3 before the split and 0.7 after it.
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    omega = np.arccos(a64 @ b64 / np.linalg.norm(a64) / np.linalg.norm(b64))
    t = np.where(np.arange(D) < 120, 0.3, 0.7)
    slerp = (np.sin((1 - t) * omega) * a64 + np.sin(t * omega) * b64) / np.sin(omega)
    noise = np.random.default_rng(77).standard_normal(D, dtype=np.float32) * np.float32(0.01)
    np.testing.assert_allclose(child, slerp + noise, rtol=1e-5, atol=1e-6)
    assert child.dtype == np.float32
    assert np.array_equal(breed([a, b], lineage), child)  # the seed fixes the noise
    other = breed([a, b], Lineage((4, 9), (0, 1), 120, 0.3, 0.01, 78))
    assert not np.array_equal(other, child)
    copy = breed([a], Lineage((4,), (0,), sigma=0.0))
    assert np.array_equal(copy, a) and copy is not a


def test_a_worker_breeds_the_bits_the_population_breeds():
    """M2N2 with deferral on hands out Offspring; the worker's cache breeds each from its lineage
    to exactly what the population itself would have made (deferral off, same seed)."""
    eager = M2N2({"archive_size": 6}, Problem(dimension=D, num_datapoints=5), seed=3)
    lazy = M2N2({"archive_size": 6}, Problem(dimension=D, num_datapoints=5), seed=3)
    lazy.space.defer_breeding = True
    cache = ParentCache()
    rng = np.random.default_rng(0)
    deferred = 0
    for member_id in range(80):
        a, b = eager.ask(), lazy.ask()
        if isinstance(b.genome, Offspring):
            deferred += 1
            cache.update(b.genome.parent_entries())
            bred = cache.breed(b.genome.lineage)
        else:
            bred = b.genome
        assert np.array_equal(a.genome, bred)
        assert a.params == b.params and a.parents == b.parents
        scores = (rng.random(5) < 0.5).astype(np.float32)
        for strategy, candidate in ((eager, a), (lazy, b)):
            candidate.member_id = member_id
            strategy.tell(candidate, Evaluation(member_id, scores))
    assert deferred > 60
    assert np.array_equal(eager.ids, lazy.ids)
    assert all(np.array_equal(x, y) for x, y in zip(eager.genomes, lazy.genomes) if x is not None)


def test_the_cache_refuses_a_lineage_it_cannot_honour():
    a, b = _parents()
    cache = ParentCache()
    lineage = Lineage((4, 9), (0, 1), 10, 0.5, 0.0, None)
    with pytest.raises(StaleParents):
        cache.breed(lineage)
    cache.update([(0, 4, a), (1, 8, b)])  # slot 1 holds another member
    with pytest.raises(StaleParents):
        cache.breed(lineage)
    cache.update([(1, 9, b)])
    assert np.array_equal(cache.breed(lineage), breed([a, b], lineage))


def _offspring(ids, slots, parents, seed=1):
    return Offspring(Lineage(tuple(ids), tuple(slots), 5, 0.5, 0.01, seed), tuple(parents))


def test_mirror_sends_each_parent_once_per_worker_and_again_after_forget():
    a, b = _parents()
    c = a + 1
    mirror = ParentMirror(2)
    first = [_offspring((1, 2), (0, 1), (a, b)), _offspring((2, 1), (1, 0), (b, a), seed=2)]
    sent, entries = mirror.wire(0, first)
    assert [type(g) for g in sent] == [Lineage, Lineage]
    assert [(s, m) for s, m, _ in entries] == [(0, 1), (1, 2)]
    assert mirror.wire(0, first)[1] == []  # worker 0 holds them now
    assert len(mirror.wire(1, first)[1]) == 2  # worker 1 does not
    # Slot 0 now holds member 5: only that entry travels.
    _, entries = mirror.wire(0, [_offspring((5, 2), (0, 1), (c, b))])
    assert [(s, m) for s, m, _ in entries] == [(0, 5)]
    mirror.forget(0)
    assert len(mirror.wire(0, first)[1]) == 2
    # Plain genomes pass through untouched.
    plain = np.zeros(D, dtype=np.float32)
    sent, entries = mirror.wire(1, [plain])
    assert sent[0] is plain and entries == []


def test_mirror_sends_a_child_whole_when_its_slot_is_taken_in_the_same_call():
    """A re-sent child names member 1 in slot 0 while a fresh child names member 5 there: one call
    cannot fill the slot twice, so the second goes as values, bred here."""
    a, b = _parents()
    c = a + 1
    old = _offspring((1, 2), (0, 1), (a, b))
    new = _offspring((5, 2), (0, 1), (c, b), seed=3)
    sent, entries = ParentMirror(1).wire(0, [new, old])
    assert isinstance(sent[0], Lineage)
    assert isinstance(sent[1], np.ndarray) and np.array_equal(sent[1], old.materialise())
    assert [(s, m) for s, m, _ in entries] == [(0, 5), (1, 2)]


def test_worker_reports_stale_children_instead_of_failing_them():
    config = digits_config("w")
    worker = FitnessWorker(config.model_dump(mode="json"), 0)
    population = build_population(config)
    population.strategy.problem.space.defer_breeding = True
    for _ in range(2):  # the two random initial members
        c = population.ask()
        population.tell(worker.evaluate_one(c.member_id, c.genome))
    children = population.ask_batch(3)
    assert all(isinstance(c.genome, Offspring) for c in children)
    payload = [(c.member_id, c.genome.lineage) for c in children]
    evaluations, stale = worker.evaluate(payload)  # no parents sent: nothing can be bred
    assert evaluations == [] and stale == [c.member_id for c in children]
    entries = ParentMirror(1).wire(0, [c.genome for c in children])[1]
    evaluations, stale = worker.evaluate(payload, None, *entries)
    assert stale == [] and [e.member_id for e in evaluations] == [c.member_id for c in children]
    for child, evaluation in zip(children, evaluations):
        expected = worker.evaluate_one(child.member_id, child.genome.materialise())
        assert np.array_equal(evaluation.scores, expected.scores)


@pytest.mark.parametrize("scores", [
    np.array([0, 1, 1, 0, 1, 1, 1, 0, 0], dtype=np.float32),
    np.array([0.0, 1.0], dtype=np.float64),
    np.array([0.5, 1.0], dtype=np.float32),
    np.array([-0.0, 1.0], dtype=np.float32),
    np.array([1.0, np.nan], dtype=np.float32),
    None,
])
def test_scores_cross_the_wire_unchanged(scores):
    back = pickle.loads(pickle.dumps(Evaluation(3, scores, 0.25, None, 0.5), protocol=5))
    assert (back.member_id, back.test_score, back.error, back.seconds) == (3, 0.25, None, 0.5)
    if scores is None:
        assert back.scores is None
    else:
        assert back.scores.dtype == scores.dtype and back.scores.tobytes() == scores.tobytes()
        expected = float(np.mean(scores))
        assert back.train_score == expected or (np.isnan(expected) and np.isnan(back.train_score))


def test_right_or_wrong_scores_travel_as_bits():
    scores = (np.random.default_rng(0).random(1437) < 0.7).astype(np.float32)
    packed = len(pickle.dumps(Evaluation(1, scores), protocol=5))
    assert packed < scores.nbytes / 10


class _StaleOnce:
    """A worker whose parent cache is wiped once after a while, as if Ray had restarted it
    without the dispatcher noticing."""

    def __init__(self, worker: FitnessWorker, after: int) -> None:
        self.worker, self.after, self.calls, self.stale = worker, after, 0, 0

    def evaluate(self, batch, elements=None, *parents, test_above=None):
        self.calls += 1
        if self.calls == self.after:
            self.worker.parents = ParentCache()
        evaluations, stale = self.worker.evaluate(batch, elements, *parents, test_above=test_above)
        self.stale += len(stale)
        return evaluations, stale


def test_dispatcher_resends_children_a_worker_could_not_breed(ray_session):
    import ray

    config = digits_config("stale", budget={"evaluations": 120}, sync=True)
    population = build_population(config)
    population.strategy.problem.space.defer_breeding = True
    actor = ray.remote(_StaleOnce).remote(FitnessWorker(config.model_dump(mode="json"), 0), 6)
    dispatcher = Dispatcher(population, [actor], batch=4, sync=True, max_retries_per_child=0, max_worker_deaths=1)
    records = []
    while not population.done:
        records.extend(dispatcher.advance(5.0))
    assert len(records) == 120 and not any(r.failed for r in records)
    assert sorted(r.member_id for r in records) == list(range(120))
    assert ray.get(actor.__ray_call__.remote(lambda self: self.stale)) > 0


def _search(tmp_path, name, breed_on_workers):
    config = digits_config("same", budget={"evaluations": 120}, sync=True, seed=5,
                           workers={"count": 2, "batch": 3, "breed_on_workers": breed_on_workers})
    summary = run_search(config, SearchOptions(out_dir=tmp_path / name, progress=False))
    study = optuna.load_study(study_name=summary["study_name"], storage=open_storage(summary["storage"]))
    trials = [(t.params, t.value, t.user_attrs["member_id"]) for t in study.get_trials(deepcopy=False)]
    return trials, load_file(str(tmp_path / name / "best.safetensors"))["params"].tobytes()


def test_a_search_is_the_same_whoever_breeds(ray_session, tmp_path):
    """Sync mode, fixed seed: breeding on the workers gives the population's search, bit for bit."""
    on, off = _search(tmp_path, "on", True), _search(tmp_path, "off", False)
    assert len(on[0]) == 120
    assert on == off


def test_deferral_is_for_dense_spaces_only():
    space = DenseSpace(4)
    a = np.ones(4, dtype=np.float32)
    lineage = Lineage((0,), (0,), sigma=0.0)
    assert isinstance(space.breed([a], lineage), np.ndarray)
    space.defer_breeding = True
    offspring = space.breed([a], lineage)
    assert isinstance(offspring, Offspring)
    assert np.array_equal(space.copy(offspring), a) and np.array_equal(space.realise(offspring), a)
    packed = space.pack([offspring, None], "x")
    assert np.array_equal(space.realise(space.unpack(packed, "x")[0]), a)
    assert Candidate(genome=offspring).genome is offspring


def test_children_in_flight_are_packed_as_lineages_with_each_parent_once():
    """A snapshot holds an unbred child as its lineage plus its parents (shared parents once), and
    the child bred after unpacking has the bits of the child bred before packing."""
    space = DenseSpace(D)
    a, b = _parents(3)
    c = np.arange(D, dtype=np.float64) / D  # a parent of another dtype keeps it
    children = [Offspring(Lineage((7, 9), (0, 1), split=100, ratio=0.3, sigma=0.01, noise_seed=2**62 + 5), (a, b)),
                Offspring(Lineage((9,), (1,), sigma=0.02, noise_seed=11), (b,)),
                Offspring(Lineage((7, 4), (0, 2), split=D - 1, ratio=0.9), (a, c))]
    plain = np.full(D, 0.5, dtype=np.float32)
    genomes = [children[0], None, plain, children[1], children[2]]
    packed = space.pack(genomes, "inflight")
    parents = sorted(k for k in packed if "/parent/" in k)
    assert parents == ["inflight/offspring/parent/4", "inflight/offspring/parent/7", "inflight/offspring/parent/9"]
    assert packed["inflight/values"].shape == (1, D)  # only the bred genome is stored whole
    back = space.unpack(packed, "inflight")
    assert back[1] is None and np.array_equal(back[2], plain)
    for before, after in zip(children, [back[0], back[3], back[4]]):
        assert isinstance(after, Offspring) and after.lineage == before.lineage
        assert np.array_equal(after.materialise(), before.materialise())
    assert back[4].parents[1].dtype == np.float64


def test_snapshots_without_lineages_still_unpack():
    """Every genome stored whole (archive members, and snapshots from before lineages were packed)."""
    space = DenseSpace(D)
    a, b = _parents(4)
    packed = space.pack([a, None, b], "genomes")
    assert set(packed) == {"genomes/values", "genomes/present"}
    back = space.unpack(packed, "genomes")
    assert np.array_equal(back[0], a) and back[1] is None and np.array_equal(back[2], b)


def test_a_snapshot_missing_a_parent_is_refused():
    space = DenseSpace(D)
    a, b = _parents(5)
    packed = space.pack([Offspring(Lineage((1, 2), (0, 1), split=3, ratio=0.5), (a, b))], "x")
    del packed["x/offspring/parent/2"]
    with pytest.raises(ValueError, match=r"parents \[2\]"):
        space.unpack(packed, "x")
