"""mergekit itself against `evomerge merge`: the same YAML must give the same tensors (issue 18).

Skipped where mergekit is not installed. Each case writes one mergekit YAML, runs mergekit's
Python API (`run_merge`, CPU) and `evomerge merge` on it, and checks that every tensor agrees
within 1e-6 max abs in float32. Two model sets:

- a synthetic Llama with 12 layers (so `layers.10` sorts before `layers.2`), sharded experts and
  an unsharded base: each method at mergekit's defaults (only the required parameters) and at one
  non-default set with layer gradients and filters;
- a small hand-built Llama whose task vectors hit mergekit's edge rules: exactly opposed task
  vectors (model_stock's singular t, nuslerp's colinear test) and densities where float rounding
  decides the count (0.29 · 400 = 115.99…).

DARE and DELLA draw their masks from torch's global generator in mergekit and from per-tensor
seeds here, so no seed makes the two agree. Their cases swap both sides' draws for one fixed
table of uniforms (mergekit's `torch.bernoulli(p)` becomes `u < p`, evomerge's
`ops.uniform_draws` returns `u`): everything but the randomness (keep probabilities, ranks,
rescaling, consensus) is then compared exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

pytest.importorskip("mergekit")

from safetensors.torch import load_file, save_file  # noqa: E402

from evomerge.cli import main as evomerge_main  # noqa: E402
from evomerge.merging import ops  # noqa: E402

TOLERANCE = 1e-6
_GOLDEN = (math.sqrt(5) - 1) / 2


def _models(*entries: tuple[str, Any]) -> list[dict[str, Any]]:
    return [{"model": m} if p is None else {"model": m, "parameters": p} for m, p in entries]


# Model names are placeholders, replaced by folder paths: base, e1, e2, e3.
CASES: dict[str, dict[str, Any]] = {
    "linear/default": dict(merge_method="linear", models=_models(("e1", {"weight": 0.3}), ("e2", {"weight": 0.5}))),
    "linear/custom": dict(
        merge_method="linear", parameters={"normalize": False},
        models=_models(("e1", {"weight": [0.2, 0.9]}), ("e2", {"weight": 0.5}),
                       ("e3", {"weight": [{"filter": "mlp", "value": 0.1}, {"value": 0.4}]}))),
    "slerp/default": dict(merge_method="slerp", base_model="base", models=_models(("base", None), ("e1", None)),
                          parameters={"t": 0.5}),
    "slerp/custom": dict(
        merge_method="slerp", base_model="e2", models=_models(("e1", None)), tokenizer_source="base",
        parameters={"t": [{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                          {"filter": "mlp", "value": [1.0, 0.5, 0.3, 0.7, 0.0]}, {"value": 0.35}]}),
    "nuslerp/default": dict(merge_method="nuslerp", models=_models(("e1", {"weight": 0.4}), ("e2", {"weight": 0.6}))),
    "nuslerp/custom": dict(
        merge_method="nuslerp", base_model="base", parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True},
        models=_models(("e1", {"weight": 0.7}), ("e2", {"weight": [0.2, 0.8]}))),
    "multislerp/default": dict(merge_method="multislerp", models=_models(
        ("e1", {"weight": 0.2}), ("e2", {"weight": 0.5}), ("e3", {"weight": 0.3}))),
    "multislerp/custom": dict(
        merge_method="multislerp", base_model="base", parameters={"normalize_weights": False, "eps": 1e-6},
        models=_models(("e1", {"weight": 0.2}), ("e2", {"weight": [0.1, 0.9]}), ("e3", {"weight": 0.3}))),
    "task_arithmetic/default": dict(merge_method="task_arithmetic", base_model="base",
                                    models=_models(("e1", {"weight": 0.6}), ("e2", {"weight": 0.3}))),
    "task_arithmetic/custom": dict(
        merge_method="task_arithmetic", base_model="base", parameters={"normalize": True, "lambda": 0.7},
        models=_models(("base", None), ("e1", {"weight": 0.6}), ("e2", {"weight": [0.3, -0.2]}),
                       ("e3", {"weight": 0.45}))),
    "ties/default": dict(merge_method="ties", base_model="base", models=_models(
        ("e1", {"weight": 0.6}), ("e2", {"weight": 0.3}), ("e3", {"weight": 0.45}))),
    "ties/custom": dict(
        merge_method="ties", base_model="base",
        parameters={"normalize": False, "rescale": True, "int8_mask": True, "density": 0.7, "lambda": 1.3},
        models=_models(("e1", {"weight": 0.6, "density": 0.3}), ("e2", {"weight": 0.3, "density": [0.2, 0.9]}),
                       ("e3", {"weight": -0.45}))),
    "breadcrumbs/default": dict(merge_method="breadcrumbs", base_model="base", models=_models(
        ("e1", {"weight": 0.6, "density": 0.8}), ("e2", {"weight": 0.3, "density": 0.8}))),
    "breadcrumbs/custom": dict(
        merge_method="breadcrumbs", base_model="base", parameters={"normalize": True, "rescale": True, "lambda": 0.8},
        models=_models(("e1", {"weight": 0.6, "density": 0.5, "gamma": 0.1}),
                       ("e2", {"weight": 0.3, "density": [0.3, 0.9], "gamma": 0.02}))),
    "breadcrumbs_ties/default": dict(merge_method="breadcrumbs_ties", base_model="base", models=_models(
        ("e1", {"weight": 0.6, "density": 0.8}), ("e2", {"weight": 0.3, "density": 0.8}),
        ("e3", {"weight": 0.45, "density": 0.8}))),
    "breadcrumbs_ties/custom": dict(
        merge_method="breadcrumbs_ties", base_model="base", parameters={"normalize": True, "rescale": True},
        models=_models(("e1", {"weight": 0.6, "density": 0.4, "gamma": 0.05}), ("e2", {"weight": 0.3, "density": 0.6}),
                       ("e3", {"weight": 0.45, "density": 0.5, "gamma": 0.0}))),
    "model_stock/default": dict(merge_method="model_stock", base_model="base", models=_models(("e1", None), ("e2", None))),
    "model_stock/custom": dict(merge_method="model_stock", base_model="base", parameters={"filter_wise": True},
                               models=_models(("e1", None), ("e2", None), ("e3", None))),
    "sce/default": dict(merge_method="sce", base_model="base", models=_models(("e1", None), ("e2", None), ("e3", None))),
    "sce/custom": dict(merge_method="sce", base_model="base", parameters={"select_topk": 0.3, "int8_mask": True},
                       models=_models(("e1", None), ("e2", None), ("e3", None))),
    "karcher/default": dict(merge_method="karcher", models=_models(("e1", None), ("e2", None), ("e3", None))),
    "karcher/custom": dict(merge_method="karcher", base_model="base", parameters={"max_iter": 3, "tol": 1e-3},
                           models=_models(("e1", None), ("e2", None))),
}

# With fixed draws (see the module docstring): mergekit's defaults, then one non-default set.
RANDOM_CASES: dict[str, dict[str, Any]] = {
    "dare_linear/default": dict(merge_method="dare_linear", base_model="base", models=_models(
        ("e1", {"weight": 0.6, "density": 0.5}), ("e2", {"weight": 0.3, "density": 0.5}))),
    "dare_linear/custom": dict(
        merge_method="dare_linear", base_model="base", parameters={"rescale": False, "normalize": True, "lambda": 0.9},
        models=_models(("e1", {"weight": 0.6, "density": 0.3}), ("e2", {"weight": [0.3, 0.1], "density": 0.7}))),
    "dare_ties/default": dict(merge_method="dare_ties", base_model="base", models=_models(
        ("e1", {"weight": 0.6, "density": 0.5}), ("e2", {"weight": 0.3, "density": 0.5}),
        ("e3", {"weight": 0.45, "density": 0.5}))),
    "dare_ties/custom": dict(
        merge_method="dare_ties", base_model="base", parameters={"normalize": True, "int8_mask": True},
        models=_models(("e1", {"weight": 0.6, "density": [0.2, 0.8]}), ("e2", {"weight": 0.3, "density": 0.6}),
                       ("e3", {"weight": -0.45, "density": 0.5}))),
    "della/default": dict(merge_method="della", base_model="base", models=_models(
        ("e1", {"weight": 0.6, "density": 0.5}), ("e2", {"weight": 0.3, "density": 0.5}),
        ("e3", {"weight": 0.45, "density": 0.5}))),
    "della/custom": dict(
        merge_method="della", base_model="base", parameters={"normalize": False, "rescale": False, "lambda": 1.1},
        models=_models(("e1", {"weight": 0.6, "density": 0.4, "epsilon": 0.3}),
                       ("e2", {"weight": 0.3, "density": 0.6, "epsilon": 0.05}), ("e3", {"weight": 0.45, "density": 0.5}))),
    "della_linear/default": dict(merge_method="della_linear", base_model="base", models=_models(
        ("e1", {"weight": 0.6, "density": 0.5}), ("e2", {"weight": 0.3, "density": 0.5}))),
    "della_linear/custom": dict(
        merge_method="della_linear", base_model="base", parameters={"normalize": True},
        models=_models(("e1", {"weight": 0.6, "density": [0.3, 0.7], "epsilon": 0.2}),
                       ("e2", {"weight": 0.3, "density": 0.5, "epsilon": 0.1}))),
}

# On the edge set: e2's task vector is exactly −e1's; e3 is independent. Dims 20/50/10 give
# tensors of 200 and 400 entries, where 0.29 · n falls a hair below an integer.
EDGE_CASES: dict[str, dict[str, Any]] = {
    "model_stock/opposed": dict(merge_method="model_stock", base_model="base", models=_models(("e1", None), ("e2", None))),
    "model_stock/opposed_filter_wise": dict(merge_method="model_stock", base_model="base",
                                            parameters={"filter_wise": True}, models=_models(("e1", None), ("e2", None))),
    "nuslerp/opposed": dict(merge_method="nuslerp", base_model="base",
                            models=_models(("e1", {"weight": 0.25}), ("e2", {"weight": 0.75}))),
    "ties/density_rounding": dict(merge_method="ties", base_model="base", parameters={"density": 0.29},
                                  models=_models(("e1", {"weight": 1.0}), ("e3", {"weight": 0.5}))),
    "breadcrumbs/density_rounding": dict(merge_method="breadcrumbs", base_model="base", models=_models(
        ("e1", {"weight": 1.0, "density": 0.29, "gamma": 0.0}), ("e3", {"weight": 0.5, "density": 0.57, "gamma": 0.0}))),
    "sce/topk_rounding": dict(merge_method="sce", base_model="base", parameters={"select_topk": 0.29},
                              models=_models(("e1", None), ("e3", None))),
}


# ---- model folders ----------------------------------------------------------------------------

def make_synthetic_set(out: Path) -> dict[str, Path]:
    """base, e1..e3: the 12-layer synthetic Llama (experts sharded, base one file)."""
    from evomerge.fixtures.synthetic_llama import make_synthetic_llama

    folders = make_synthetic_llama(out, params="100K", experts=3, dtype="float32", shard_size="100KB",
                                   layers=12, chat_template=False)
    return {"base": folders["base"], "e1": folders["expert_1"], "e2": folders["expert_2"], "e3": folders["expert_3"]}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, Path]:
    return make_synthetic_set(tmp_path_factory.mktemp("parity_llama"))


def _dyadic(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round to multiples of 2^-bits, so sums and differences of these weights are exact."""
    return torch.round(x * 2**bits) / 2**bits


def make_edge_set(out: Path) -> dict[str, Path]:
    """base, e1, e2 = base − (e1 − base) exactly, e3 independent: a 2-layer Llama of odd sizes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.fixtures.tiny_lm import make_tokenizer

    config = LlamaConfig(vocab_size=64, hidden_size=20, intermediate_size=50, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=10, max_position_embeddings=64,
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    base = {k: _dyadic(v.detach().float(), 8) for k, v in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    deltas = {}
    for name, value in base.items():
        if value.dim() == 1:  # norms: one entry moves, so the opposed vectors are exactly antipodal after normalising
            deltas[name] = torch.zeros_like(value)
            deltas[name][3] = 0.5
        else:
            deltas[name] = _dyadic(torch.randn(value.shape, generator=generator) * 0.01, 24)
    other = {k: _dyadic(torch.randn(v.shape, generator=generator) * 0.01, 24) for k, v in base.items()}
    weights = {"base": base, "e1": {k: base[k] + deltas[k] for k in base},
               "e2": {k: base[k] - deltas[k] for k in base}, "e3": {k: base[k] + other[k] for k in base}}
    tokenizer = make_tokenizer()
    folders = {}
    for name, tensors in weights.items():
        folder = out / name
        folder.mkdir(parents=True)
        config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        folders[name] = folder
    return folders


@pytest.fixture(scope="module")
def edge(tmp_path_factory) -> dict[str, Path]:
    return make_edge_set(tmp_path_factory.mktemp("parity_edge"))


# ---- running both -----------------------------------------------------------------------------

def _config(case: dict[str, Any], folders: dict[str, Path]) -> dict[str, Any]:
    """The case with its model names (base, e1, ...) replaced by folder paths."""
    config = json.loads(json.dumps(case))
    for entry in config["models"]:
        entry["model"] = str(folders[entry["model"]])
    if "base_model" in config:
        config["base_model"] = str(folders[config["base_model"]])
    return {**config, "dtype": "float32"}


def _fixed_uniforms(shape) -> torch.Tensor:
    """The same 'random' table on both sides: u_i = frac(i · golden ratio), flat index i."""
    n = math.prod(shape)
    return torch.frac(torch.arange(n, dtype=torch.float64) * _GOLDEN).to(torch.float32).reshape(tuple(shape))


def _load(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def run_both(config: dict[str, Any], tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(path.read_text())), str(tmp_path / "mergekit"),
              options=MergeOptions(device="cpu", lazy_unpickle=False, out_shard_size=200_000, copy_tokenizer=True,
                                   write_model_card=False, quiet=True))
    assert evomerge_main(["merge", str(path), str(tmp_path / "evomerge")]) == 0
    return _load(tmp_path / "mergekit"), _load(tmp_path / "evomerge")


def max_abs_diff(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest |mergekit − evomerge| over all tensors, and where; names and dtypes must match."""
    assert sorted(theirs) == sorted(ours)
    worst, where = 0.0, ""
    for name, expected in theirs.items():
        actual = ours[name]
        assert expected.dtype == actual.dtype == torch.float32, name
        assert expected.shape == actual.shape, name
        assert torch.isfinite(expected).all(), f"mergekit gave non-finite values in {name}"
        diff = float((expected.double() - actual.double()).abs().max()) if expected.numel() else 0.0
        if not diff <= worst:  # a NaN on our side counts as the worst
            worst, where = diff, name
    return worst, where


def check(config: dict[str, Any], tmp_path: Path) -> None:
    theirs, ours = run_both(config, tmp_path)
    worst, where = max_abs_diff(theirs, ours)
    assert worst <= TOLERANCE, f"max |mergekit − evomerge| = {worst:.3g} at {where}"


@pytest.mark.parametrize("case", list(CASES))
def test_deterministic_methods_match_mergekit(case, synthetic, tmp_path):
    check(_config(CASES[case], synthetic), tmp_path)


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_edge_rules_match_mergekit(case, edge, tmp_path):
    check(_config(EDGE_CASES[case], edge), tmp_path)


@pytest.mark.parametrize("case", list(RANDOM_CASES))
def test_random_methods_match_mergekit_given_the_same_draws(case, synthetic, tmp_path, monkeypatch):
    def bernoulli(p: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return (_fixed_uniforms(p.shape).to(p.device) < p).to(p.dtype)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    monkeypatch.setattr(ops, "uniform_draws", lambda shape, generator: _fixed_uniforms(shape))
    check(_config(RANDOM_CASES[case], synthetic), tmp_path)


def test_the_comparison_can_fail(synthetic, tmp_path):
    """A real difference (another weight) is reported, so the parity cases above can fail."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = _config(CASES["linear/default"], synthetic)
    theirs, _ = run_both(a, tmp_path / "a")
    b = _config(dict(merge_method="linear", models=_models(("e1", {"weight": 0.31}), ("e2", {"weight": 0.5}))), synthetic)
    _, ours = run_both(b, tmp_path / "b")
    worst, _ = max_abs_diff(theirs, ours)
    assert worst > 1e-4
