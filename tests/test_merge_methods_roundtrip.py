"""`evomerge merge` (the CLI entry point, in-process) for every registered method on tiny Llama folders.

Each written folder must load with transformers and equal, tensor by tensor, the method applied
directly to the checkpoints' tensors: the YAML → plan → operator path adds nothing of its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from evomerge.merging import MERGE_METHODS

# method -> (global parameters, per-model parameters, uses base_model)
CASES = {
    "linear": ({}, {"weight": 0.5}, False),
    "slerp": ({"t": 0.4}, None, True),
    "task_arithmetic": ({"lambda": 0.8}, {"weight": 0.5}, True),
    "ties": ({}, {"weight": 0.5, "density": 0.5}, True),
    "dare_linear": ({"seed": 3}, {"weight": 0.5, "density": 0.5}, True),
    "dare_ties": ({"seed": 3}, {"weight": 0.5, "density": 0.5}, True),
    "breadcrumbs": ({}, {"weight": 0.5, "density": 0.5, "gamma": 0.05}, True),
    "breadcrumbs_ties": ({}, {"weight": 0.5, "density": 0.5, "gamma": 0.05}, True),
    "della": ({"seed": 1}, {"weight": 0.5, "density": 0.5, "epsilon": 0.1}, True),
    "della_linear": ({"seed": 1}, {"weight": 0.5, "density": 0.5, "epsilon": 0.1}, True),
    "sce": ({"select_topk": 0.5}, None, True),
    "model_stock": ({}, None, True),
    "nuslerp": ({}, {"weight": 0.5}, True),
    "multislerp": ({}, {"weight": 0.5}, False),
    "karcher": ({}, None, True),
    "pcb": ({}, {"weight": 1.0, "density": 0.3}, True),
    "star": ({"eta": 50}, {"weight": 1.0}, True),
    "tsv": ({"lambda": 0.9}, {"weight": 1.0}, True),
}


def test_every_registered_method_has_a_round_trip_case():
    assert set(MERGE_METHODS.names()) <= set(CASES) | {"fisher", "regmean"}  # data-based: tests/test_merging_data.py


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> list[Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llamas3")
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    out = [root / "base"]
    for seed in (1, 2):  # fine-tunes: base + small deltas, so norms stay nearly parallel
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():
            for p, q in zip(model.parameters(), base.parameters()):
                p.copy_(q + 0.02 * torch.randn_like(q))
        model.save_pretrained(root / f"ft{seed}")
        out.append(root / f"ft{seed}")
    return out


def _direct(method_name: str, name: str, tensors: dict[Path, dict[str, torch.Tensor]], base: Path,
            others: list[Path], params: dict, per_model: dict | None) -> torch.Tensor:
    method = MERGE_METHODS.get(method_name)
    models = [method.model_params.model_validate(per_model or {}) for _ in others]
    b = tensors[base][name] if base is not None else None
    return method(b, [tensors[p][name] for p in others], models, method.params(**params), key=name)


@pytest.mark.parametrize("method", sorted(CASES))
def test_evomerge_merge_round_trip(llamas, tmp_path, method):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from evomerge.cli import main

    params, per_model, with_base = CASES[method]
    base, ft1, ft2 = llamas
    listed = [ft1] if method == "slerp" else [ft1, ft2]  # slerp: base_model plus exactly one
    config = {"merge_method": method, "parameters": params,
              "models": [{"model": str(p), **({"parameters": per_model} if per_model else {})} for p in listed]}
    if with_base:
        config["base_model"] = str(base)
    (tmp_path / "m.yml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "m.yml"), str(tmp_path / "out")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    tensors = {p: load_file(p / "model.safetensors") for p in llamas}
    spec = MERGE_METHODS.get(method)
    if spec.base_is_model:  # karcher: the base is one more model
        op_base, others = None, [ft1, ft2, base]
    else:
        op_base, others = (base if with_base else None), listed
    for name in tensors[base]:
        want = _direct(method, name, tensors, op_base, others, params, per_model)
        torch.testing.assert_close(merged[name], want, rtol=0, atol=0, msg=f"{method}: {name}")
    # and the merge did something: not any input model
    name = "model.layers.1.mlp.up_proj.weight"
    assert all(not torch.equal(merged[name], tensors[p][name]) for p in llamas)


@pytest.mark.parametrize("method", ["della", "dare_ties"])
def test_random_methods_are_reproducible_from_seed(llamas, tmp_path, method):
    from safetensors.torch import load_file

    from evomerge.merging import run_merge

    base, ft1, ft2 = llamas

    def merge(seed: int, out: str) -> dict[str, torch.Tensor]:
        config = {"merge_method": method, "base_model": str(base), "parameters": {"seed": seed},
                  "models": [{"model": str(p), "parameters": {"weight": 0.5, "density": 0.4}} for p in (ft1, ft2)]}
        (tmp_path / f"{out}.yml").write_text(yaml.safe_dump(config))
        return load_file(run_merge(tmp_path / f"{out}.yml", tmp_path / out) / "model.safetensors")

    a, b, c = merge(7, "a"), merge(7, "b"), merge(8, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same merge, bit for bit
    assert any(not torch.equal(a[k], c[k]) for k in a)  # another seed draws other masks
