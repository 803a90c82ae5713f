"""DAM trains on a fitness worker (`strategy.options.train_on: worker`), over tiny Llama
checkpoints on Ray: the same bits as training in the population actor, which then builds no
model; a resumed search ends where the straight one does; a chunk survives one worker death."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.config import config_from_dict
from evomerge.engine.search import SearchOptions, resume_search, run_search
from evomerge.fixtures.tiny_lm import make_tiny_lm
from evomerge.snapshots import load_latest_snapshot

DAM_OPTIONS = {"steps": 4, "eval_every": 2, "batch_size": 8, "lr": 0.05}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-dam")
    return make_tiny_lm(root / "models", scale="test", seed=0, data_dir=root / "data")


def _config(info, train_on: str, budget: int = 8, **extra):
    options = {"model": info["models"]["base"], "data": [info["data"]["add_train"], info["data"]["rev_train"]],
               "limit": 12, "max_new_tokens": 4, "batch_size": 24}
    return config_from_dict({
        "name": f"dam-{train_on}", "seed": 3, "seeds": [info["models"]["expert_add"], info["models"]["expert_rev"]],
        "fitness": {"task": "lm_exact_match", "options": options},
        "strategy": {"name": "dam", "options": {**DAM_OPTIONS, "train_on": train_on}},
        "budget": {"evaluations": budget}, "workers": {"count": 2, "batch": 1}, **extra,
    })


def _drive_actor(config):
    """The population actor and workers as the search starts them, advanced to the end; returns
    the DAM state, and what the actor's own process built (its task's model, skeletons)."""
    import ray

    from evomerge.engine.actors import RemotePopulation, start_workers

    workers = start_workers(config)
    population = RemotePopulation.remote(config.model_dump(mode="json"), workers)
    try:
        over = False
        while not over:
            _, over, _ = ray.get(population.advance.remote(5.0))
        meta, arrays = ray.get(population.state_dict.remote())

        def built(actor):
            from fitness import lm_binding

            strategy = actor.population.strategy
            return {"model": strategy.problem.task._model is not None, "skeletons": lm_binding.SKELETON_BUILDS,
                    "train_on": strategy.train_on, "calls": getattr(strategy.trainer, "calls", None)}

        return meta, arrays, ray.get(population.__ray_call__.remote(built))
    finally:
        for actor in (population, *workers):
            ray.kill(actor)


def test_worker_training_matches_population_training_and_builds_no_model(ray_session, tiny):
    meta_w, arrays_w, built_w = _drive_actor(_config(tiny, "auto", sync=True))
    meta_p, arrays_p, built_p = _drive_actor(_config(tiny, "population", sync=True))
    # auto over checkpoint seeds on Ray: the worker trains, two chunks of two steps, two calls
    assert built_w == {"model": False, "skeletons": 0, "train_on": "worker", "calls": 2}
    assert built_p["model"] and built_p["train_on"] == "population"  # what the old path cost
    for key in ("coeffs", "adam/exp_avg", "adam/exp_avg_sq", "curve"):
        np.testing.assert_array_equal(arrays_w[f"strategy/{key}"], arrays_p[f"strategy/{key}"], err_msg=key)
    w, p = meta_w["strategy"], meta_p["strategy"]
    assert (w["step"], w["adam_step"], w["batch_seed"]) == (p["step"], p["adam_step"], p["batch_seed"]) == (4, 4.0, p["batch_seed"])
    assert arrays_w["strategy/curve"].shape == (4,) and not np.array_equal(arrays_w["strategy/coeffs"], np.full_like(arrays_w["strategy/coeffs"], 0.5))
    assert w["best_train"] == p["best_train"] is not None


@pytest.mark.slow  # ~40 s; the sync bits: test_worker_training_matches_population_training_and_builds_no_model
def test_async_worker_training_gives_the_sync_bits(ray_session, tiny):
    """Async dispatch: the chunk runs inline in ask() (no thread), so the bits are the sync ones."""
    _, arrays_a, built = _drive_actor(_config(tiny, "worker"))
    _, arrays_s, _ = _drive_actor(_config(tiny, "worker", sync=True))
    assert built["train_on"] == "worker" and not built["model"]
    np.testing.assert_array_equal(arrays_a["strategy/coeffs"], arrays_s["strategy/coeffs"])
    np.testing.assert_array_equal(arrays_a["strategy/curve"], arrays_s["strategy/curve"])


@pytest.mark.slow  # ~60 s; the state's round trip: test_dam.py::test_snapshot_mid_training_resumes_bit_identically
def test_resumed_search_with_dam_on_a_worker_ends_as_the_straight_one(ray_session, tiny, tmp_path):
    straight = run_search(_config(tiny, "worker", sync=True), SearchOptions(out_dir=tmp_path / "a", progress=False))
    # Stopped after the seeds, the plain average and the first trained merge (step 2), then resumed.
    out = tmp_path / "b"
    first = run_search(_config(tiny, "worker", budget=4, sync=True), SearchOptions(out_dir=out, progress=False))
    assert first["evaluations"] == 4
    resumed = resume_search(out, SearchOptions(out_dir=out, progress=False), budget=8)
    assert straight["evaluations"] == resumed["evaluations"] == 5  # DAM ends once its final merge is back
    assert resumed["best"]["train_score"] == straight["best"]["train_score"]
    _, _, a = load_latest_snapshot(tmp_path / "a")
    _, _, b = load_latest_snapshot(out)
    for key in ("coeffs", "curve", "adam/exp_avg_sq"):
        found = [k for k in a if k.endswith(f"strategy/{key}")]
        assert len(found) == 1, sorted(a)
        np.testing.assert_array_equal(a[found[0]], b[found[0]], err_msg=key)
    assert next(v for k, v in a.items() if k.endswith("strategy/curve")).shape == (4,)  # all four steps


class _Trainer:
    """A stand-in worker for WorkerTrainer's retries: `mode` dies (the process exits), raises, or
    trains (adds n to the step and marks the coefficients with its name)."""

    def __init__(self, mode: str, name: int) -> None:
        self.mode, self.name = mode, name

    def dam_train(self, settings, num_seeds, fingerprint, meta, arrays, steps):
        import os

        if self.mode == "die":
            os._exit(1)
        if self.mode == "nan":
            raise FloatingPointError("dam: the loss became nan at step 0; lower strategy.options.lr")
        arrays = dict(arrays, coeffs=arrays["coeffs"] + self.name)
        return {**meta, "step": meta["step"] + steps, "adam_step": meta["adam_step"] + steps}, arrays


def _worker_trainer(modes, live=None):
    import ray

    from evomerge.genomes.columns import ColumnLayout
    from evomerge.strategies.dam_trainer import TrainOptions, WorkerTrainer

    actor = ray.remote(_Trainer).options(num_cpus=0, max_restarts=0)
    workers = [actor.remote(mode, i) for i, mode in enumerate(modes)]
    layout = ColumnLayout.from_tensors([("w", (2, 3))], lambda name, shape: 1)
    return WorkerTrainer(workers, live, 2, layout, TrainOptions()), workers


def test_a_worker_that_dies_mid_chunk_costs_one_retry_on_the_next_live_worker(ray_session):
    from evomerge.strategies.dam_trainer import TrainingState

    trainer, _ = _worker_trainer(["die", "dead", "train"], live=lambda: [0, 2])  # 1: the dispatcher gave up on it
    state = TrainingState.start(2, 3, batch_seed=5)
    out = trainer.train(state, 2)
    assert (out.step, out.adam_step, out.batch_seed) == (2, 2.0, 5)
    np.testing.assert_array_equal(out.coeffs, state.coeffs + 2)  # worker 2 trained it
    assert trainer.index == 2 and trainer.calls == 2
    assert trainer.train(out, 1).step == 3 and trainer.calls == 3  # and keeps training there


def test_two_deaths_fail_with_the_reason_and_a_trainer_error_is_raised_as_itself(ray_session):
    from evomerge.strategies.dam_trainer import TrainingState

    trainer, _ = _worker_trainer(["die", "die"])
    with pytest.raises(RuntimeError, match="DAM training died on two fitness workers.*train_on: population"):
        trainer.train(TrainingState.start(2, 3, batch_seed=0), 1)
    trainer, _ = _worker_trainer(["nan"])
    with pytest.raises(FloatingPointError, match="lower strategy.options.lr"):
        trainer.train(TrainingState.start(2, 3, batch_seed=0), 1)


def test_train_on_worker_without_workers_or_over_dense_genomes_is_refused():
    from evomerge.strategies.base import Problem
    from evomerge.strategies.dam import DAM
    from fitness.digits import DigitsTask

    task = DigitsTask({"train_size": 100})
    seeds = [np.zeros(task.dimension, dtype=np.float32), np.ones(task.dimension, dtype=np.float32)]
    problem = Problem(dimension=task.dimension, num_datapoints=task.num_datapoints, initial=seeds)
    problem.task = task
    with pytest.raises(ValueError, match="train_on: worker trains over the workers' checkpoint seeds"):
        DAM({"train_on": "worker"}, problem, seed=0)
    assert DAM({}, problem, seed=0).train_on == "population"  # auto: digits stays in-process
    from evomerge.genomes.columns import ColumnLayout
    from evomerge.strategies.dam_trainer import TrainOptions, WorkerTrainer

    with pytest.raises(ValueError, match="this run has none .*train_on: population"):
        WorkerTrainer([], None, 2, ColumnLayout.from_tensors([("w", (2,))], lambda n, s: None), TrainOptions())
