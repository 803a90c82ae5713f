"""The memory plan: hand-worked bytes per process, refusals that name the option, GPU planning
(GPU sizes passed in; no GPU needed), and a search that cannot fit stopping before any worker."""

from __future__ import annotations

import pytest

from evomerge.config import SearchConfig, config_from_dict
from evomerge.engine import memory_plan
from evomerge.engine.memory_plan import ModelSizes, check, plan_memory
from evomerge.errors import ConfigError
from evomerge.models import from_specs

# Two tensors in bf16: 1000x1000 + 500x1000 = 1,500,000 parameters, 3,000,000 bytes per seed.
LAYOUT = from_specs([("a.weight", (1000, 1000), "BF16"), ("b.weight", (500, 1000), "BF16")])
N = 1_500_000
F_BF16 = 2 * N
F_F32 = 4 * N
MiB = 1024 * 1024


def lm_config(tmp_path, options=None, workers=None, strategy=None, **extra) -> SearchConfig:
    """A config over two (empty) seed folders (plugin options are not validated)."""
    seeds = []
    for name in ("s0", "s1"):
        (tmp_path / name).mkdir(exist_ok=True)
        seeds.append(str(tmp_path / name))
    return SearchConfig.model_validate({
        "name": "plan", "seeds": seeds,
        "fitness": {"task": "lm_exact_match", "options": {"model": "base", **(options or {})}},
        "strategy": strategy or {"name": "m2n2", "options": {}},
        "budget": {"evaluations": 10}, "workers": {"count": 2, **(workers or {})}, **extra,
    })


def sizes(num_seeds: int = 2) -> ModelSizes:
    return ModelSizes.from_layout(LAYOUT, num_seeds)


def test_sizes_come_from_the_layout():
    s = sizes()
    assert (s.numel, s.seeds_dtype, s.num_seeds, s.seed_bytes) == (N, "bfloat16", 2, F_BF16)
    mixed = ModelSizes.from_layout(from_specs([("w", (100, 10), "BF16"), ("norm", (10,), "F32")]), 3)
    assert mixed.seeds_dtype == "bfloat16" and mixed.seed_bytes == 1000 * 2 + 10 * 4


def test_cpu_plan_in_bf16_hand_worked(tmp_path):
    config = lm_config(tmp_path, {"dtype": "auto"})  # auto = the seeds' dtype
    plan = plan_memory(config, sizes(), allowance_bytes=100)
    assert plan.run_dtype == "bfloat16" and plan.model_bytes == F_BF16 == 3_000_000
    assert plan.driver.host == 0 and plan.driver.device == 0
    assert plan.population.host == 0  # the LM task it builds is a weightless skeleton
    assert plan.worker.host == F_BF16 + 100 == 3_000_100  # merge buffer + activations
    assert plan.worker.device == 0
    assert plan.host_total == 2 * 3_000_100 == 6_000_200
    assert plan.page_cache_bytes == 2 * F_BF16 == 6_000_000  # seeds: once per node, in no process
    table = plan.table()
    assert "driver" in table and "population actor" in table and "worker 0" in table and "worker 1" in table
    assert "F = 3.0 MB" in table and "2.00F" in table and "page cache" in table


def test_without_a_dtype_option_the_buffer_is_float32(tmp_path):
    """Tasks without `dtype` (digits) materialise into float32; elements stay in the seeds' dtype."""
    guide = {"from": "dam", "every": 5, "max_elements": 3, "options": {"train_on": "population"}}
    config = lm_config(tmp_path, strategy={"name": "m2n2", "options": {"guide": guide}})
    plan = plan_memory(config, sizes(), allowance_bytes=0)
    assert plan.run_dtype == "float32" and plan.model_bytes == F_F32
    assert plan.num_elements == 3
    # worker: float32 buffer + 3 bf16 elements
    assert plan.worker.host == F_F32 + 3 * F_BF16 == 15_000_000
    # population: 3 elements + DAM's bound model, its merge and the merge's gradients in the run
    # dtype (no float32 seed copies)
    assert plan.population.host == 3 * F_BF16 + 3 * F_F32 == 27_000_000
    assert plan.dam == "population" and plan.dam_training is None
    with pytest.raises(ConfigError, match="DAM strategy or guide"):
        check(plan, free_host_bytes=plan.host_total - 1, gpu_bytes=None)


def _dam(train_on: str | None = None) -> dict:
    return {"name": "dam", "options": {} if train_on is None else {"train_on": train_on}}


def test_dam_on_a_cpu_worker_adds_one_merge_there_and_none_in_the_population(tmp_path):
    """auto over checkpoint seeds = the worker: the population loses its 3F, worker 0 gains 2F
    (the merge kept for backward and its gradients)."""
    config = lm_config(tmp_path, {"dtype": "auto"}, strategy=_dam())
    plan = plan_memory(config, sizes(), allowance_bytes=100)
    assert plan.dam == "worker" and plan.population.host == 0
    assert plan.worker.host == F_BF16 + 100  # every worker: buffer + activations
    assert plan.dam_training.host == 2 * F_BF16 and plan.dam_training.device == 0
    assert plan.host_total == 2 * (F_BF16 + 100) + 2 * F_BF16 == 12_000_200  # the trainer's, once
    rows = {line.split()[0] + line.split()[1]: line for line in plan.table().splitlines()[2:6]}
    assert "DAM training" in rows["worker0"] and "DAM training" not in rows["worker1"]
    population = plan_memory(lm_config(tmp_path, {"dtype": "auto"}, strategy=_dam("population")), sizes(),
                             allowance_bytes=100)
    assert population.population.host == 3 * F_BF16 and population.dam_training is None
    assert population.host_total == 2 * (F_BF16 + 100) + 3 * F_BF16
    with pytest.raises(ConfigError) as err:
        check(plan, free_host_bytes=plan.host_total - 1, gpu_bytes=None)
    assert "`strategy.options.train_on: population`" in str(err.value), str(err.value)
    check(plan, free_host_bytes=plan.host_total, gpu_bytes=None)
    # dense genomes over the seeds: auto keeps DAM in the population actor
    dense = plan_memory(lm_config(tmp_path, {"dtype": "auto"}, strategy=_dam(), genome={"kind": "dense"}),
                        sizes(), allowance_bytes=0)
    assert dense.dam == "population"


def test_dam_on_a_gpu_worker_is_counted_on_its_gpu_and_refused_when_it_does_not_fit(tmp_path):
    config = lm_config(tmp_path, {"dtype": "auto", "seeds_on": "device"}, workers={"num_gpus": 0.5},
                       strategy=_dam("worker"))
    # per worker: buffer F + 2 seeds 2F = 9 MB; two share a GPU; the trainer adds 2F = 6 MB on one
    plan = plan_memory(config, sizes(), gpu_bytes=24_000_000, allowance_bytes=0)
    assert plan.dam_training.device == 2 * F_BF16 and plan.dam_training.host == 0
    assert plan.device_per_gpu == 2 * 9_000_000 + 2 * F_BF16 == 24_000_000 and plan.population.host == 0
    check(plan, free_host_bytes=10**12, gpu_bytes=24_000_000)
    with pytest.raises(ConfigError) as err:
        check(plan, free_host_bytes=10**12, gpu_bytes=23_999_999)
    message = str(err.value)
    assert "`strategy.options.train_on: population`" in message and "workers.num_gpus" in message, message


def test_dam_on_a_gpu_worker_with_host_seeds_is_refused_with_the_reason(tmp_path):
    config = lm_config(tmp_path, {"dtype": "auto", "seeds_on": "host"}, workers={"num_gpus": 1},
                       strategy=_dam())
    plan = plan_memory(config, sizes(), gpu_bytes=10**12, allowance_bytes=0)
    with pytest.raises(ConfigError) as err:
        check(plan, free_host_bytes=10**12, gpu_bytes=10**12)
    message = str(err.value)
    assert "`fitness.options.seeds_on` is host" in message and "seeds_on: device" in message, message
    assert "`strategy.options.train_on: population`" in message, message
    # auto that finds the seeds do not fit: the same refusal, saying so; a guide names its own option
    guide = {"from": "dam", "options": {"train_on": "worker"}}
    config = lm_config(tmp_path, {"dtype": "auto"}, workers={"num_gpus": 1},
                       strategy={"name": "m2n2", "options": {"guide": guide}})
    plan = plan_memory(config, sizes(), gpu_bytes=5_000_000, allowance_bytes=0)
    assert plan.seeds_on == "host"
    with pytest.raises(ConfigError, match="do not fit on the GPU") as err:
        check(plan, free_host_bytes=10**12, gpu_bytes=5_000_000)
    assert "`strategy.options.guide.options.train_on: population`" in str(err.value)
    # in the population actor, host seeds are fine
    config = lm_config(tmp_path, {"dtype": "auto", "seeds_on": "host"}, workers={"num_gpus": 1},
                       strategy=_dam("population"))
    check(plan_memory(config, sizes(), gpu_bytes=10**12, allowance_bytes=0), free_host_bytes=10**12,
          gpu_bytes=10**12)


def test_host_refusal_names_the_options(tmp_path):
    guide = {"from": "cmaes", "every": 5, "max_elements": 2}
    config = lm_config(tmp_path, {"dtype": "float32"}, strategy={"name": "m2n2", "options": {"guide": guide}})
    plan = plan_memory(config, sizes(), allowance_bytes=0)
    check(plan, free_host_bytes=plan.host_total, gpu_bytes=None)  # exactly fits
    with pytest.raises(ConfigError) as err:
        check(plan, free_host_bytes=plan.host_total - 1, gpu_bytes=None)
    message = str(err.value)
    for option in ("workers.count", "fitness.options.dtype", "strategy.options.guide.max_elements",
                   "workers.memory_check"):
        assert option in message, message
    # bf16 seeds run in bf16: nothing cheaper to suggest than fewer workers
    plan = plan_memory(lm_config(tmp_path, {"dtype": "auto"}), sizes(), allowance_bytes=0)
    with pytest.raises(ConfigError, match="workers.count") as err:
        check(plan, free_host_bytes=1000, gpu_bytes=None)
    assert "fitness.options.dtype" not in str(err.value)


SEED_WITH = [{"method": "ties", "parameters": {"density": 0.5}},  # joins the basis
             {"method": "linear", "weights": [1, 3]},  # a recipe: holds nothing
             {"method": "task_arithmetic", "parameters": {"lambda": 0.5}},  # a recipe too
             {"method": "fisher"}]  # the driver's merged folder, read into a basis element


def test_seed_with_elements_are_counted_in_the_population_and_every_worker(tmp_path):
    """2 of the 4 merges join the basis: exactly 2 bf16 elements (2 x 3,000,000 bytes) more in the
    population actor and in each worker, none in the driver, whatever the run dtype."""
    base = plan_memory(lm_config(tmp_path, {"dtype": "float32"}), sizes(), allowance_bytes=0)
    config = lm_config(tmp_path, {"dtype": "float32"}, strategy={"name": "m2n2", "options": {"seed_with": SEED_WITH}})
    plan = plan_memory(config, sizes(), allowance_bytes=0)
    assert plan.num_seed_elements == 2 and plan.num_elements == 0 and plan.element_bytes == F_BF16
    assert plan.driver.host == base.driver.host == 0
    assert plan.population.host == base.population.host + 2 * F_BF16 == 6_000_000
    assert plan.worker.host == base.worker.host + 2 * F_BF16 == F_F32 + 2 * F_BF16 == 12_000_000
    assert plan.host_total == base.host_total + 3 * 2 * F_BF16 == 30_000_000  # population + 2 workers
    table = plan.table()
    assert "0 guide element(s), 2 seed_with element(s)" in table
    assert table.count("2 seed_with elements 1.00F") == 3  # the population and both workers (F is float32)


def test_seed_with_elements_beside_guide_elements_on_gpu_workers_stay_on_the_host(tmp_path):
    guide = {"from": "cmaes", "every": 5, "max_elements": 3}
    options = {"guide": guide, "seed_with": SEED_WITH[:1]}
    config = lm_config(tmp_path, {"dtype": "auto", "seeds_on": "device"}, workers={"num_gpus": 1},
                       strategy={"name": "m2n2", "options": options})
    plan = plan_memory(config, sizes(), gpu_bytes=10**12, allowance_bytes=0)
    assert (plan.num_elements, plan.num_seed_elements) == (3, 1)
    assert plan.worker.device == 3 * F_BF16  # buffer + 2 seeds; no element on the device
    assert plan.worker.host == (3 + 1) * F_BF16 == 12_000_000
    assert plan.population.host == 4 * F_BF16


def test_seed_with_over_dense_genomes_or_linear_only_adds_no_element(tmp_path):
    linear = {"name": "m2n2", "options": {"seed_with": SEED_WITH[1:3]}}
    assert plan_memory(lm_config(tmp_path, strategy=linear), sizes()).num_seed_elements == 0
    dense = lm_config(tmp_path, strategy={"name": "m2n2", "options": {"seed_with": SEED_WITH}},
                      genome={"kind": "dense"})
    assert plan_memory(dense, sizes()).num_seed_elements == 0  # members are vectors (noted), not elements


def test_refusal_names_seed_with_when_its_elements_matter(tmp_path):
    config = lm_config(tmp_path, {"dtype": "auto"}, strategy={"name": "m2n2", "options": {"seed_with": SEED_WITH}})
    plan = plan_memory(config, sizes(), allowance_bytes=0)
    with pytest.raises(ConfigError) as err:
        check(plan, free_host_bytes=plan.host_total - 1, gpu_bytes=None)
    message = str(err.value)
    assert "`strategy.options.seed_with` (2 non-linear merges now; each joins the basis as an element of " \
           "3.0 MB" in message, message
    assert "workers.count" in message and "guide.max_elements" not in message
    # without non-linear merges it is not named
    plain = plan_memory(lm_config(tmp_path, {"dtype": "auto"}), sizes(), allowance_bytes=0)
    with pytest.raises(ConfigError) as err:
        check(plain, free_host_bytes=1000, gpu_bytes=None)
    assert "seed_with" not in str(err.value)
    # elements sit on the host, so a GPU that is too small is not told to drop them
    config = lm_config(tmp_path, {"dtype": "auto", "seeds_on": "device"}, workers={"num_gpus": 1},
                       strategy={"name": "m2n2", "options": {"seed_with": SEED_WITH}})
    plan = plan_memory(config, sizes(), gpu_bytes=1_000_000, allowance_bytes=0)
    with pytest.raises(ConfigError) as err:
        check(plan, free_host_bytes=10**12, gpu_bytes=1_000_000)
    assert "seed_with" not in str(err.value) and "seeds_on: host" in str(err.value)


def test_gpu_plan_seeds_on_device_when_they_fit(tmp_path):
    config = lm_config(tmp_path, {"dtype": "auto"}, workers={"num_gpus": 0.5})
    # device per worker: buffer F + 2 seeds 2F (+ allowance 0) = 9 MB; two workers share a GPU
    plan = plan_memory(config, sizes(), gpu_bytes=20_000_000, allowance_bytes=0)
    assert plan.on_gpu and plan.seeds_on == "device" and plan.workers_per_gpu == 2
    assert plan.worker.device == 3 * F_BF16 == 9_000_000 and plan.device_per_gpu == 18_000_000
    assert plan.worker.host == 0
    check(plan, free_host_bytes=10**12, gpu_bytes=20_000_000)
    assert "GPU (2 per GPU, seeds on device)" in plan.table()


def test_gpu_plan_auto_falls_back_to_pinned_host_seeds(tmp_path):
    config = lm_config(tmp_path, {"dtype": "auto"}, workers={"num_gpus": 0.5})
    plan = plan_memory(config, sizes(), gpu_bytes=10_000_000, allowance_bytes=0)
    assert plan.seeds_on == "host"
    assert plan.worker.device == F_BF16 and plan.device_per_gpu == 6_000_000
    assert plan.worker.host == 2 * F_BF16  # the seeds, pinned, per worker
    check(plan, free_host_bytes=10**12, gpu_bytes=10_000_000)


def test_gpu_refusal_names_num_gpus_and_seeds_on(tmp_path):
    config = lm_config(tmp_path, {"dtype": "auto", "seeds_on": "device"}, workers={"num_gpus": 0.5})
    plan = plan_memory(config, sizes(), gpu_bytes=10_000_000, allowance_bytes=0)
    assert plan.seeds_on == "device" and plan.device_per_gpu == 18_000_000
    with pytest.raises(ConfigError) as err:
        check(plan, free_host_bytes=10**12, gpu_bytes=10_000_000)
    message = str(err.value)
    assert "workers.num_gpus" in message and "fitness.options.seeds_on: host" in message, message
    # one worker per GPU: num_gpus is no help, the seeds' place and the dtype are
    config = lm_config(tmp_path, {"dtype": "float32", "seeds_on": "device"}, workers={"num_gpus": 1})
    plan = plan_memory(config, sizes(), gpu_bytes=1_000_000, allowance_bytes=0)
    with pytest.raises(ConfigError) as err:
        check(plan, free_host_bytes=10**12, gpu_bytes=1_000_000)
    message = str(err.value)
    assert "workers.num_gpus" not in message and "fitness.options.dtype" in message, message


def test_device_cpu_keeps_gpu_workers_on_the_host(tmp_path):
    config = lm_config(tmp_path, {"dtype": "auto", "device": "cpu"}, workers={"num_gpus": 1})
    plan = plan_memory(config, sizes(), gpu_bytes=1, allowance_bytes=0)
    assert not plan.on_gpu and plan.worker.device == 0
    check(plan, free_host_bytes=10**12, gpu_bytes=1)


def test_check_is_skipped_without_seeds_or_when_switched_off(tmp_path):
    from conftest import digits_config

    assert memory_plan.check_before_start(digits_config("scratch")) is None
    config = lm_config(tmp_path, workers={"memory_check": False})
    assert memory_plan.check_before_start(config) is None  # the seed folders are never opened


def test_resume_ignores_memory_check():
    from evomerge.engine.search import config_differences

    old = {"workers": {"count": 2}, "budget": {"evaluations": 5}}
    assert config_differences(old, {"workers": {"count": 2, "memory_check": True}, "budget": {"evaluations": 9}}) == []
    assert config_differences(old, {"workers": {"count": 2, "memory_check": False}}) == []
    assert config_differences(old, {"workers": {"count": 3}}) == ["workers.count (2 -> 3)"]


# -- with real checkpoints ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from evomerge.fixtures.tiny_lm import make_tiny_lm

    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_lm(root / "models", scale="test", seed=0, data_dir=root / "data")


def tiny_config(info, **workers):
    options = {"model": info["models"]["base"], "data": [info["data"]["add_train"]], "limit": 4,
               "max_new_tokens": 4, "batch_size": 4}
    return config_from_dict({
        "name": "tiny-plan", "seed": 0, "seeds": [info["models"]["expert_add"], info["models"]["expert_rev"]],
        "fitness": {"task": "lm_exact_match", "options": options},
        "strategy": {"name": "m2n2", "options": {"mutation_sigma": 0.0}},
        "budget": {"evaluations": 4}, "workers": {"count": 2, "batch": 1, **workers},
    })


def test_plan_reads_the_seed_headers(tiny, capsys):
    from evomerge.models import build_layout, open_checkpoint

    with open_checkpoint(tiny["models"]["expert_add"]) as ckpt:
        layout = build_layout(ckpt)
    plan = memory_plan.check_before_start(tiny_config(tiny))
    assert plan is not None and plan.sizes.numel == layout.size and plan.sizes.num_seeds == 2
    assert plan.model_bytes == layout.size * 4  # float32 seeds, float32 buffer
    assert "memory plan" in capsys.readouterr().err


def test_a_search_that_cannot_fit_stops_before_any_worker(ray_session, tiny, tmp_path, monkeypatch):
    from evomerge.engine import search

    started = []
    monkeypatch.setattr(memory_plan, "free_host_bytes", lambda: 1000)
    monkeypatch.setattr(search, "start_workers", lambda config: started.append(config) or [])
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="workers.count") as err:
        search.run_search(tiny_config(tiny), search.SearchOptions(out_dir=out, progress=False))
    assert "1.0 KB available" in str(err.value)
    assert started == []  # no worker was asked for
    assert not (out / "optuna.journal").exists()  # nor a study opened, so no trials
    assert ray_session.is_initialized()  # a session the search did not start is left alone


@pytest.mark.parametrize("lacks", [True, False])
def test_a_cpu_without_native_bf16_is_named_in_the_plan_with_the_fix(tmp_path, monkeypatch, lacks):
    from evomerge import devices

    monkeypatch.setattr(devices, "cpu_lacks_native", lambda dtype: lacks)
    bf16 = plan_memory(lm_config(tmp_path, {"dtype": "auto"}), sizes(), allowance_bytes=100)
    said = [n for n in bf16.notes if "no native bfloat16" in n]
    assert len(said) == int(lacks)
    if lacks:
        assert "fitness.options.dtype: float32" in said[0] and "workers.num_gpus" in said[0]
        assert "note: this CPU has no native bfloat16" in bf16.table()
    f32 = plan_memory(lm_config(tmp_path, {"dtype": "float32"}), sizes(), allowance_bytes=100)
    assert not [n for n in f32.notes if "native" in n]  # float32 runs at full speed anyway
    gpu = plan_memory(lm_config(tmp_path, {"dtype": "auto"}, workers={"num_gpus": 1}), sizes(),
                      gpu_bytes=10**10, allowance_bytes=100)
    assert not [n for n in gpu.notes if "native" in n]  # the workers compute on their GPUs
