"""fisher and regmean: hand-worked merges, hand-worked statistics on toy models, and `evomerge merge` with `data:`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import save_tiny_llamas
from evomerge.errors import ConfigError
from evomerge.merging import MERGE_METHODS
from evomerge.merging.mergekit_config import plan_from_dict
from evomerge.merging.methods_data import fisher_average, regmean
from evomerge.merging.statistics import fisher_diagonal, input_grams

T = torch.tensor


def test_fisher_average_by_hand():
    # entry 0: F = (3, 1), w = (1, 1): (3·2 + 1·6)/4 = 3; entry 1: F = (0, 0) + floor: plain mean 4
    out = fisher_average([T([2.0, 2.0]), T([6.0, 6.0])], [T([3.0, 0.0]), T([1.0, 0.0])], [1.0, 1.0], 1e-6)
    torch.testing.assert_close(out, T([3.0, 4.0]))
    # weights multiply the Fisher: w = (1, 3): (3·2 + 3·6)/(3 + 3) = 4 on entry 0
    out = fisher_average([T([2.0, 2.0]), T([6.0, 6.0])], [T([3.0, 0.0]), T([1.0, 0.0])], [1.0, 3.0], 1e-6)
    torch.testing.assert_close(out, T([4.0, 5.0]))
    op = MERGE_METHODS.get("fisher")
    with pytest.raises(ValueError, match="fisher statistic"):
        op(None, [T([1.0]), T([2.0])], op.model_params_list([1, 1]), op.params())


def test_regmean_closed_form_by_hand():
    w1, w2 = T([[1.0, 0.0]]), T([[0.0, 1.0]])
    # diagonal Grams diag(3, 1), diag(1, 3): W = (W1 G1 + W2 G2)(G1 + G2)⁻¹ = [3, 3]/4
    torch.testing.assert_close(regmean([w1, w2], [torch.diag(T([3.0, 1.0])), torch.diag(T([1.0, 3.0]))], 0.9),
                               T([[0.75, 0.75]]))
    g1, g2 = T([[2.0, 1.0], [1.0, 2.0]]), T([[2.0, -1.0], [-1.0, 2.0]])
    # α = 1: Σ G = 4 I; W1 G1 + W2 G2 = [2, 1] + [-1, 2] = [1, 3] -> [.25, .75]
    torch.testing.assert_close(regmean([w1, w2], [g1, g2], 1.0), T([[0.25, 0.75]]))
    # α = .5 halves the off-diagonals: [2, .5] + [-.5, 2] = [1.5, 2.5] -> [.375, .625]
    torch.testing.assert_close(regmean([w1, w2], [g1, g2], 0.5), T([[0.375, 0.625]]))
    # vectors (norms, biases) are averaged
    torch.testing.assert_close(regmean([T([1.0, 3.0]), T([3.0, 5.0])], [None, None], 0.9), T([2.0, 4.0]))


def test_regmean_minimises_the_summed_regression_loss():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(40, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    ws = [torch.randn(4, 5, generator=g) for _ in range(3)]
    merged = regmean(ws, [x.T @ x / 40 for x in xs], 1.0).double()
    # gradient of Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖² at the merge is zero
    grad = sum(x.T @ x @ (merged - w.double()).T for x, w in zip(xs, ws))
    assert grad.abs().max().item() < 1e-4


class _Toy(torch.nn.Module):
    """input_ids -> embedding -> linear; or, with `bias_only`, logits = b at every position."""

    def __init__(self, bias_only: bool = False) -> None:
        super().__init__()
        self.bias_only = bias_only
        self.emb = torch.nn.Embedding(2, 2)
        self.proj = torch.nn.Linear(2, 2, bias=False)
        self.b = torch.nn.Parameter(torch.zeros(2))
        with torch.no_grad():
            self.emb.weight.copy_(T([[1.0, 0.0], [0.0, 2.0]]))

    def forward(self, input_ids):
        if self.bias_only:
            return SimpleNamespace(logits=self.b.expand(input_ids.shape[0], input_ids.shape[1], 2) + 0 * self.proj.weight.sum())
        return SimpleNamespace(logits=self.proj(self.emb(input_ids)))


def test_input_grams_are_mean_outer_products_of_layer_inputs():
    # ids [0, 1] embed to rows [1, 0] and [0, 2]: mean x xᵀ = diag(1, 4)/2
    grams = input_grams(_Toy(), [([0, 1], 1)])
    torch.testing.assert_close(grams["proj.weight"].float(), T([[0.5, 0.0], [0.0, 2.0]]))


def test_fisher_diagonal_by_hand():
    # logits = b = 0: ∂ log p(a)/∂b = onehot(a) − softmax(b) = ±(.5, -.5) per answer token
    # example 1: one answer token (1): grad (-.5, .5), squared (.25, .25)
    # example 2: two answer tokens (1, 1): grad 2·(-.5, .5), squared (1, 1); mean (.625, .625)
    fisher = fisher_diagonal(_Toy(bias_only=True), [([0, 1], 1), ([0, 1, 1], 2)])
    torch.testing.assert_close(fisher["b"], T([0.625, 0.625]))
    assert fisher["proj.weight"].abs().max() == 0  # it does not move the log-likelihood


# ---- evomerge merge with data: -------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm_folders(tmp_path_factory) -> list[Path]:
    return save_tiny_llamas(tmp_path_factory.mktemp("lm"), num_layers=1)


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_merge_with_data_round_trip(lm_folders, tmp_path, method):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.cli import main
    from evomerge.merging.statistics import load_model, read_rows

    a, b = lm_folders
    config = {"merge_method": method, "parameters": {"num_examples": 6},
              "models": [{"model": str(a)}, {"model": str(b)}], "data": ["add_train.jsonl", "rev_train.jsonl"]}
    (tmp_path / "m.yml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "m.yml"), str(tmp_path / "out")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    tok = AutoTokenizer.from_pretrained(a)
    rows = [read_rows(Path("fitness/data") / f, tok, 6) for f in ("add_train.jsonl", "rev_train.jsonl")]
    models = [load_model(p) for p in (a, b)]
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    if method == "regmean":
        grams = [input_grams(m, r) for m, r in zip(models, rows)]
        want = regmean([ta[name], tb[name]], [g[name] for g in grams], 0.9)
    else:
        fishers = [fisher_diagonal(m, r) for m, r in zip(models, rows)]
        want = fisher_average([ta[name], tb[name]], [f[name] for f in fishers], [1.0, 1.0], 1e-6)
    torch.testing.assert_close(merged[name], want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(merged[name], (ta[name] + tb[name]) / 2, atol=1e-4)  # not a plain average
    norm = "model.norm.weight"
    if method == "regmean":
        torch.testing.assert_close(merged[norm], (ta[norm] + tb[norm]) / 2)


def test_data_field_errors_name_it(lm_folders):
    a, b = (str(p) for p in lm_folders)
    with pytest.raises(ConfigError, match="field `data`: required by fisher"):
        plan_from_dict({"merge_method": "fisher", "models": [{"model": a}, {"model": b}]})
    with pytest.raises(ConfigError, match="field `data`: fisher needs one data file per merged model"):
        plan_from_dict({"merge_method": "fisher", "models": [{"model": a}, {"model": b}], "data": ["add_train.jsonl"]})
    with pytest.raises(ConfigError, match="field `data.1`: data file 'nope.jsonl' does not exist"):
        plan_from_dict({"merge_method": "regmean", "models": [{"model": a}, {"model": b}],
                        "data": ["add_train.jsonl", "nope.jsonl"]})
    with pytest.raises(ConfigError, match="field `data`: ties reads no data"):
        plan_from_dict({"merge_method": "ties", "base_model": a, "models": [{"model": b}], "data": ["x"]})
