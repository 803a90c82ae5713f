"""Checkpoint tasks bind candidates by name, in the seeds' layout and dtype, into a weightless skeleton.

The fixture is what users have: bf16, 12 layers (`layers.10` sorts before `layers.2` inside one file),
a base saved as one file and experts in several shards, tied embeddings and old float32 buffers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.engine.basis_spec import checkpoint_basis
from evomerge.fixtures.synthetic_llama import make_synthetic_llama
from evomerge.genomes.recipe import Recipe
from evomerge.models import save_model_folder
from evomerge.tasks import TaskContext
from fitness import lm_binding
from fitness.lm_scoring import answer_likelihood_scores, load_tokenizer
from fitness.lm_tasks import LMAnswerLikelihoodTask, LMExactMatchTask

PROMPTS = [("12+34=", "46"), ("rev:abc=", "cba"), ("7+8=", "15"), ("rev:hello=", "olleh"), ("3+3=", "6")]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bind")
    folders = make_synthetic_llama(root / "ckpt", params="3M", experts=2, dtype="bfloat16", shard_size="2MB",
                                   layers=12)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in PROMPTS))
    return {**folders, "data": data}


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> dict[str, Path]:
    """Tied embeddings and the old per-layer float32 `rotary_emb.inv_freq` tensors in every file."""
    root = tmp_path_factory.mktemp("bind-tied")
    return make_synthetic_llama(root / "ckpt", params="3M", experts=2, dtype="bfloat16", shard_size="2MB",
                                layers=12, tie_embeddings=True, extra_buffer=True)


def _task(made, cls=LMAnswerLikelihoodTask, seeds=None, **options):
    seeds = seeds or [str(made["expert_1"]), str(made["expert_2"])]
    basis = checkpoint_basis(seeds)
    task = cls({"data": [str(made["data"])], "batch_size": 2, **options})
    task.attach(TaskContext(seeds=tuple(seeds), layout=basis.layout))
    return task, basis


def _reference(basis, recipe: Recipe, out: Path, source: Path):
    """The materialised merge written by name and reopened with `from_pretrained`: the ground truth."""
    from transformers import AutoModelForCausalLM

    flat = basis.materialise(recipe, out=basis.new_buffer())
    tensors = {s.name: flat[s.offset:s.end].view(s.shape) for s in basis.layout.tensors}
    save_model_folder(tensors, out, source=source)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, local_files_only=True)
    model.eval()
    return model, flat


def test_fixture_is_the_trap(made):
    assert len(list(made["expert_1"].glob("*.safetensors"))) >= 3
    assert [p.name for p in made["base"].glob("*.safetensors")] == ["model.safetensors"]


@pytest.mark.parametrize("model_option", ["first seed", "base (one file)"])
def test_candidate_scores_equal_from_pretrained_of_the_materialised_model(made, tmp_path, model_option):
    extra = {} if model_option == "first seed" else {"model": str(made["base"])}
    task, basis = _task(made, **extra)
    recipe = Recipe(np.array([0, basis.size // 3, basis.size]), np.array([[0.3, 0.7], [0.8, 0.2]]))
    buffer = task.candidate_buffer()
    assert buffer.dtype == torch.bfloat16 and next(task.model.parameters()).dtype == torch.bfloat16
    basis.materialise(recipe, out=buffer)
    hits, logprobs = task.evaluate_detailed(buffer)

    model, flat = _reference(basis, recipe, tmp_path / "ref", made["expert_1"])
    assert torch.equal(buffer, flat)
    state = model.state_dict()
    for name, param in task.model.named_parameters():  # every parameter holds the seeds' tensor of its name
        assert torch.equal(param, state[name]), name
    want_hits, want_lps = answer_likelihood_scores(model, load_tokenizer(str(made["expert_1"])), task.train_examples,
                                                   batch_size=2)
    np.testing.assert_array_equal(hits, want_hits)
    np.testing.assert_allclose(logprobs, want_lps, rtol=0, atol=1e-5)


def test_a_by_position_binding_would_have_scrambled_this_fixture(made):
    """Guards the test above: in the base's own (one-file) order, most tensors sit elsewhere."""
    from evomerge.models import build_layout, open_checkpoint

    with open_checkpoint(made["base"]) as ckpt:
        base_layout = build_layout(ckpt)
    _, basis = _task(made)
    moved = [s.name for s in basis.layout.tensors if base_layout.index(s.name).offset != s.offset]
    assert len(moved) > len(basis.layout.tensors) // 2


def test_a_seed_materialises_to_its_own_weights_bit_for_bit(made):
    from safetensors import safe_open

    task, basis = _task(made, cls=LMExactMatchTask)
    basis.materialise(Recipe(np.array([0, basis.size]), np.array([[0.0, 1.0]])), out=task.candidate_buffer())
    params = dict(task.model.named_parameters())
    for path in made["expert_2"].glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                assert torch.equal(params[name], f.get_tensor(name)), name


def test_tied_embeddings_and_old_float_buffers_bind(tied, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in PROMPTS))
    seeds = [str(tied["expert_1"]), str(tied["expert_2"])]
    task, basis = _task({"data": data, **tied}, seeds=seeds)
    assert any(s.name.endswith("rotary_emb.inv_freq") for s in basis.layout.tensors)
    recipe = Recipe(np.array([0, basis.size]), np.array([[0.5, 0.5]]))
    basis.materialise(recipe, out=task.candidate_buffer())
    hits, lps = task.evaluate_detailed(task.candidate_buffer())
    assert task.model.lm_head.weight is task.model.model.embed_tokens.weight  # still tied
    assert all(n.endswith("inv_freq") for n in task._plan.skipped) and task._plan.skipped
    model, _ = _reference(basis, recipe, tmp_path / "ref", tied["expert_1"])
    want_hits, want_lps = answer_likelihood_scores(model, load_tokenizer(seeds[0]), task.train_examples, batch_size=2)
    np.testing.assert_allclose(lps, want_lps, rtol=0, atol=1e-5)


def _edited_config(made, tmp_path, **changes) -> Path:
    folder = tmp_path / "other"
    shutil.copytree(made["base"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_a_model_of_another_shape_is_refused_naming_both_shapes(made, tmp_path):
    cfg = json.loads((made["base"] / "config.json").read_text())
    other = _edited_config(made, tmp_path, intermediate_size=cfg["intermediate_size"] + 8)
    task, _ = _task(made, model=str(other))
    with pytest.raises(ValueError) as err:
        task.candidate_buffer()
    msg = str(err.value)
    assert "mlp" in msg and str(cfg["intermediate_size"]) in msg and str(cfg["intermediate_size"] + 8) in msg


def test_a_model_with_other_parameter_names_is_refused_naming_both(made, tmp_path):
    cfg = json.loads((made["base"] / "config.json").read_text())
    more = _edited_config(made, tmp_path, num_hidden_layers=cfg["num_hidden_layers"] + 1)
    task, _ = _task(made, model=str(more))
    with pytest.raises(ValueError, match=rf"model\.layers\.{cfg['num_hidden_layers']}\..*seeds lack"):
        task.candidate_buffer()
    fewer = _edited_config(made, tmp_path / "f", num_hidden_layers=cfg["num_hidden_layers"] - 1)
    task, _ = _task(made, model=str(fewer))
    with pytest.raises(ValueError, match=rf"seed tensor 'model\.layers\.{cfg['num_hidden_layers'] - 1}\."):
        task.candidate_buffer()


def test_the_task_reads_no_weights_and_builds_nothing_until_it_scores(made, monkeypatch):
    builds = lm_binding.SKELETON_BUILDS
    task, basis = _task(made)
    assert task.dimension == basis.size and task.num_datapoints == len(PROMPTS)
    assert lm_binding.SKELETON_BUILDS == builds
    task.candidate_buffer()
    assert lm_binding.SKELETON_BUILDS == builds + 1
    assert all(p.device.type == "cpu" for p in task.model.parameters())  # bound: none left on meta


def test_non_finite_candidates_score_zero(made):
    task, basis = _task(made)
    buffer = task.candidate_buffer()
    basis.materialise(Recipe(np.array([0, basis.size]), np.array([[0.5, 0.5]])), out=buffer)
    buffer[basis.size // 2] = float("nan")
    hits, lps = task.evaluate_detailed(buffer)
    assert not hits.any() and np.isneginf(lps).all()


def test_float32_option_runs_bf16_seeds_in_float32(made):
    task, basis = _task(made, dtype="float32")
    recipe = Recipe(np.array([0, basis.size]), np.array([[0.25, 0.75]]))
    basis.materialise(recipe, out=task.candidate_buffer())
    assert task.candidate_buffer().dtype == torch.float32
    assert next(task.model.parameters()).dtype == torch.float32
    reference = basis.materialise(recipe, out=torch.empty(basis.size, dtype=torch.float32))
    assert torch.equal(task.candidate_buffer(), reference)


def test_device_auto_is_the_cpu_without_gpus(made):
    task, _ = _task(made)
    assert task.device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_buffer_model_and_scores_are_on_the_device(made):
    seeds = [str(made["expert_1"]), str(made["expert_2"])]
    basis = checkpoint_basis(seeds)
    task = LMAnswerLikelihoodTask({"data": [str(made["data"])], "batch_size": 2})
    task.attach(TaskContext(seeds=tuple(seeds), layout=basis.layout, num_gpus=1))
    buffer = task.candidate_buffer()
    assert buffer.device.type == "cuda"
    basis.place(buffer.device)
    recipe = Recipe(np.array([0, basis.size]), np.array([[0.3, 0.7]]))
    basis.materialise(recipe, out=buffer)
    hits, lps = task.evaluate_detailed(buffer)
    cpu = checkpoint_basis(seeds).materialise(recipe, out=torch.empty(basis.size, dtype=torch.bfloat16))
    assert torch.equal(buffer.cpu(), cpu)
    assert np.isfinite(lps).all()


def test_the_population_actor_builds_no_model(made, monkeypatch):
    """The actor's own constructor, run in-process: sizes come from the layout and the data files."""
    from transformers import AutoModelForCausalLM

    from evomerge.config import config_from_dict
    from evomerge.engine.actors import PopulationActor

    def refuse(*args, **kwargs):
        raise AssertionError("the population actor loaded a model")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    builds = lm_binding.SKELETON_BUILDS
    config = config_from_dict({
        "name": "pop", "seed": 0, "seeds": [str(made["expert_1"]), str(made["expert_2"])],
        "fitness": {"task": "lm_answer_likelihood", "options": {"data": [str(made["data"])]}},
        "strategy": {"name": "m2n2", "options": {"mutation_sigma": 0.0}}, "budget": {"evaluations": 4},
    })
    actor = PopulationActor(config.model_dump(mode="json"), [])
    problem = actor.population.strategy.problem
    assert problem.dimension == checkpoint_basis(list(config.seeds)).size
    assert problem.num_datapoints == len(PROMPTS)
    assert lm_binding.SKELETON_BUILDS == builds and problem.task._model is None


def test_the_skeleton_keeps_the_folders_generation_config(made, tmp_path):
    folder = tmp_path / "instruct"
    shutil.copytree(made["expert_1"], folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    gen["eos_token_id"] = [gen.get("eos_token_id", 2), 7]
    (folder / "generation_config.json").write_text(json.dumps(gen))
    model = lm_binding.build_skeleton(folder, torch.bfloat16)
    assert model.generation_config.eos_token_id == gen["eos_token_id"]


def test_cpu_threads_default_to_the_workers_num_cpus(made):
    seeds = (str(made["expert_1"]), str(made["expert_2"]))
    layout = checkpoint_basis(list(seeds)).layout
    task = LMAnswerLikelihoodTask({"data": [str(made["data"])]})
    task.attach(TaskContext(seeds=seeds, layout=layout, num_cpus=3))
    task.candidate_buffer()
    assert task._threads() == 3
    pinned = LMAnswerLikelihoodTask({"data": [str(made["data"])], "threads": 1})
    pinned.attach(TaskContext(seeds=seeds, layout=layout, num_cpus=3))
    assert pinned._threads() == 1
    outside = LMAnswerLikelihoodTask({"data": [str(made["data"])]})
    outside.attach(TaskContext(seeds=seeds, layout=layout))
    outside.candidate_buffer()
    assert outside._threads() is None  # torch's own setting outside a worker


def test_the_driver_refuses_a_mismatched_model_before_any_worker_starts(made, tmp_path, ray_session, monkeypatch):
    """The pre-flight builds the architecture on the meta device (no bytes, no skeleton) and
    refuses the search with both shapes; no worker is started."""
    from evomerge.config import config_from_dict
    from evomerge.engine import search as search_module
    from evomerge.engine.basis_spec import preflight_task
    from evomerge.errors import ConfigError

    cfg = json.loads((made["base"] / "config.json").read_text())
    other = _edited_config(made, tmp_path, intermediate_size=cfg["intermediate_size"] + 8)
    spec = {"name": "pre", "seed": 0, "seeds": [str(made["expert_1"]), str(made["expert_2"])],
            "fitness": {"task": "lm_answer_likelihood", "options": {"data": [str(made["data"])], "model": str(other)}},
            "budget": {"evaluations": 2}, "workers": {"count": 1}}
    builds = lm_binding.SKELETON_BUILDS
    with pytest.raises(ConfigError, match=rf"fitness.*{cfg['intermediate_size']}.*{cfg['intermediate_size'] + 8}"):
        preflight_task(config_from_dict(spec))
    assert lm_binding.SKELETON_BUILDS == builds
    preflight_task(config_from_dict({**spec, "fitness": {"task": "lm_answer_likelihood",
                                                         "options": {"data": [str(made["data"])]}}}))  # fits

    def no_workers(*args, **kwargs):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(search_module, "start_workers", no_workers)
    with pytest.raises(ConfigError, match="does not fit the seeds"):
        search_module.run_search(config_from_dict(spec), search_module.SearchOptions(out_dir=tmp_path / "run",
                                                                                     progress=False))
