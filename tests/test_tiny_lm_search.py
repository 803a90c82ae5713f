"""A short search over two tiny Llama experts on Ray: recipes, the LM task, the exported folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evomerge.config import config_from_dict
from evomerge.engine.search import SearchOptions, run_search
from evomerge.fixtures.tiny_lm import make_tiny_lm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    info = make_tiny_lm(root / "models", scale="test", seed=0, data_dir=root / "data")
    return root, info


def test_tiny_lm_search_exports_a_model_that_reproduces_its_scores(ray_session, tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fitness.lm_tasks import LMExactMatchTask, flat_params_of

    root, info = tiny
    options = {"model": info["models"]["base"], "data": [info["data"]["add_train"], info["data"]["rev_train"]],
               "test_data": [info["data"]["add_test"], info["data"]["rev_test"]], "limit": 24,
               "max_new_tokens": 6, "batch_size": 48}
    config = config_from_dict({
        "name": "tiny", "seed": 0, "seeds": [info["models"]["expert_add"], info["models"]["expert_rev"]],
        "fitness": {"task": "lm_exact_match", "options": options},
        "strategy": {"name": "m2n2", "options": {"mutation_sigma": 0.0}},
        "budget": {"evaluations": 24}, "workers": {"count": 2, "batch": 1},
    })
    out = tmp_path / "run"
    summary = run_search(config, SearchOptions(out_dir=out, progress=False))
    assert summary["evaluations"] == 24 and summary["failed"] == 0
    assert json.loads((out / "best.json").read_text())["genome"] == "recipe"
    exported = out / "best"
    model = AutoModelForCausalLM.from_pretrained(exported)  # transformers loads what we wrote
    AutoTokenizer.from_pretrained(exported)
    task = LMExactMatchTask(options)
    params = flat_params_of(exported)
    assert float(np.mean(task.evaluate(params))) == pytest.approx(summary["best"]["train_score"])
    assert task.test_score(params) == pytest.approx(summary["best"]["test_score"])
    assert sum(p.numel() for p in model.parameters()) > 0


def test_dam_guided_search_over_checkpoints_adds_a_basis_element(ray_session, tiny, tmp_path):
    """DAM's column genome joins the recipe archive as a new basis element; the Ray workers
    rebuild that element themselves, and the exported best reproduces its score."""
    from safetensors.numpy import load_file

    from evomerge.snapshots import load_latest_snapshot
    from fitness.lm_tasks import LMExactMatchTask, flat_params_of

    root, info = tiny
    options = {"model": info["models"]["base"], "data": [info["data"]["add_train"], info["data"]["rev_train"]],
               "test_data": [info["data"]["add_test"], info["data"]["rev_test"]], "limit": 16,
               "max_new_tokens": 6, "batch_size": 32}
    guide = {"from": "dam", "every": 6, "share": 0.3,  # auto's choice on Ray over checkpoints, spelled out
             "options": {"steps": 4, "eval_every": 2, "batch_size": 8, "train_on": "worker"}}
    config = config_from_dict({
        "name": "tiny-dam", "seed": 0, "seeds": [info["models"]["expert_add"], info["models"]["expert_rev"]],
        "fitness": {"task": "lm_exact_match", "options": options},
        "strategy": {"name": "m2n2", "options": {"mutation_sigma": 0.0, "guide": guide}},
        "budget": {"evaluations": 30}, "workers": {"count": 2, "batch": 2}, "sync": True,
    })
    out = tmp_path / "run"
    summary = run_search(config, SearchOptions(out_dir=out, progress=False))
    assert summary["evaluations"] == 30 and summary["failed"] == 0  # workers held every element they were asked for
    _, meta, arrays = load_latest_snapshot(out)
    kinds = arrays.get("population/strategy/elements/kinds", arrays.get("strategy/elements/kinds"))
    assert kinds is not None and kinds.size >= 1, sorted(arrays)[:20]
    best = json.loads((out / "best.json").read_text())
    assert best["basis_elements"] == kinds.size
    assert "elements/kinds" in load_file(str(out / "best.safetensors"))
    params = flat_params_of(out / "best")
    task = LMExactMatchTask(options)
    assert float(np.mean(task.evaluate(params))) == pytest.approx(summary["best"]["train_score"])
    # resuming rebuilds the elements from the snapshot, in the population and in fresh workers
    from evomerge.engine.search import resume_search

    more = resume_search(out, SearchOptions(out_dir=out, progress=False), budget=36)
    assert more["evaluations"] == 36 and more["failed"] == 0
