"""Static merge operators against hand-computed numbers, config errors, and `evomerge merge` end to end."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.errors import ConfigError
from evomerge.merging import MERGE_METHODS, MergeMethod
from evomerge.merging import ops
from evomerge.merging.mergekit_config import plan_from_dict
from evomerge.merging.params import ConditionalParameter, depth, evaluate_setting, resolve

T = torch.tensor


def run(name: str, base, tensors, weights=None, densities=None, key: str = "w", **params) -> torch.Tensor:
    method = MERGE_METHODS.get(name)
    per_model = method.model_params_list(weights or [1.0] * len(tensors), densities)
    return method(base, tensors, per_model, method.params(**params), key=key)


def close(actual: torch.Tensor, expected: list[float]) -> None:
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, T(expected, dtype=torch.float32), rtol=1e-6, atol=1e-6)


# ---- linear ---------------------------------------------------------------------------------

def test_linear_normalize_on_and_off():
    x1, x2 = T([1.0, 2.0, 3.0, 4.0]), T([3.0, 2.0, 1.0, 0.0])
    # w = (1, 3): 1*x1 + 3*x2 = [1+9, 2+6, 3+3, 4+0] = [10, 8, 6, 4]
    close(run("linear", None, [x1, x2], [1.0, 3.0], normalize=False), [10, 8, 6, 4])
    # normalize divides by Σw = 4: [2.5, 2, 1.5, 1]
    close(run("linear", None, [x1, x2], [1.0, 3.0]), [2.5, 2.0, 1.5, 1.0])  # normalize defaults to True


def test_linear_upcasts_half_precision_and_copies_integer_tensors():
    x1, x2 = T([1.0, 2.0], dtype=torch.bfloat16), T([2.0, 4.0], dtype=torch.float16)
    close(run("linear", None, [x1, x2]), [1.5, 3.0])
    ids = T([1, 2, 3])
    out = run("linear", None, [ids, T([7, 8, 9])])
    assert out.dtype == torch.int64 and out.tolist() == [1, 2, 3]  # the first model's, not averaged
    out = run("ties", T([4, 5, 6]), [T([7, 8, 9])])
    assert out.tolist() == [4, 5, 6]  # the base's


def test_linear_zero_weight_sum_cannot_be_normalised():
    with pytest.raises(ValueError, match="sum to 0"):
        run("linear", None, [T([1.0]), T([2.0])], [1.0, -1.0])


# ---- slerp ----------------------------------------------------------------------------------

def test_slerp_end_points_are_the_models():
    a, b = T([1.0, 2.0, -1.0, 0.5]), T([0.3, -2.0, 4.0, 1.0])
    close(run("slerp", a, [b], t=0.0), a.tolist())  # base model is the t = 0 end
    close(run("slerp", a, [b], t=1.0), b.tolist())


def test_slerp_midpoint_of_orthogonal_vectors():
    # a ⟂ b, so Ω = π/2 and sin Ω = 1; at t = 1/2 both coefficients are sin(π/4) = √2/2.
    a, b = T([2.0, 0.0, 0.0, 0.0]), T([0.0, 0.0, 3.0, 0.0])
    r = math.sqrt(0.5)
    close(run("slerp", a, [b], t=0.5), [2 * r, 0.0, 3 * r, 0.0])
    # at t = 1/3: sin(2π/6) = √3/2 on a, sin(π/6) = 1/2 on b
    close(run("slerp", a, [b], t=1 / 3), [2 * math.sqrt(3) / 2, 0.0, 1.5, 0.0])
    # the angle is over the whole flattened tensor, whatever the shape
    out = run("slerp", a.view(2, 2), [b.view(2, 2)], t=0.5)
    torch.testing.assert_close(out, T([[2 * r, 0.0], [3 * r, 0.0]]))


def test_slerp_parallel_falls_back_to_linear():
    # b = 2a: cos = 1 > 0.9995 (mergekit's threshold), so 0.75 a + 0.25 b = [1.25, 2.5]
    close(run("slerp", T([1.0, 2.0]), [T([2.0, 4.0])], t=0.25), [1.25, 2.5])
    # zero vector: mergekit does not normalise it, so cos = 0, Ω = π/2 and b gets sin(π/8)
    s = math.sin(math.pi / 8)
    close(run("slerp", T([0.0, 0.0]), [T([2.0, 4.0])], t=0.25), [2 * s, 4 * s])


# ---- task arithmetic -------------------------------------------------------------------------

def test_task_arithmetic_lambda_and_normalize():
    base = T([1.0, 1.0, 1.0, 1.0])
    m1, m2 = T([2.0, 0.0, 1.0, 3.0]), T([1.0, 3.0, 0.0, 1.0])
    # τ1 = [1, -1, 0, 2], τ2 = [0, 2, -1, 0]; w = (1, 0.5): Σ w τ = [1, 0, -0.5, 2]
    # λ = 2: base + 2 Σ = [3, 1, 0, 5]   (normalize is off by default, as in mergekit)
    close(run("task_arithmetic", base, [m1, m2], [1.0, 0.5], **{"lambda": 2.0}), [3, 1, 0, 5])
    # normalize: Σ / 1.5 = [2/3, 0, -1/3, 4/3]; λ = 1: [5/3, 1, 2/3, 7/3]
    close(run("task_arithmetic", base, [m1, m2], [1.0, 0.5], normalize=True), [5 / 3, 1, 2 / 3, 7 / 3])


# ---- TIES -----------------------------------------------------------------------------------

BASE = T([1.0, 0.0, -1.0, 2.0])
TAUS = [T([4.0, -1.0, 2.0, 0.5]), T([-3.0, 2.0, 1.0, -1.0]), T([1.0, -3.0, -2.0, 1.0])]
MODELS = [BASE + tau for tau in TAUS]


def test_ties_trim_elect_disjoint_mean_by_hand():
    # density 0.5 keeps k = 2 of 4 per task vector (largest |τ|):
    #   τ1 = [4, -1, 2, .5] -> [4, 0, 2, 0]
    #   τ2 = [-3, 2, 1, -1] -> [-3, 2, 0, 0]
    #   τ3 = [1, -3, -2, 1] -> [0, -3, -2, 0]
    # weights (1, 1, 2): w τ = [4, 0, 2, 0], [-3, 2, 0, 0], [0, -6, -4, 0]
    # Σ w τ = [1, -4, -2, 0] -> elected signs [+, -, -, +] (0 counts as +)
    # agreeing entries: e0: 4 (w 1); e1: -6 (w 2); e2: -4 (w 2; τ1's +2 disagrees); e3: none
    # normalize: [4/1, -6/2, -4/2, 0/1] = [4, -3, -2, 0]; + base = [5, -3, -3, 2]
    close(run("ties", BASE, MODELS, [1.0, 1.0, 2.0], [0.5] * 3), [5, -3, -3, 2])
    # no normalize, λ = 0.5: 0.5 * [4, -6, -4, 0] = [2, -3, -2, 0]; + base = [3, -3, -3, 2]
    close(run("ties", BASE, MODELS, [1.0, 1.0, 2.0], [0.5] * 3, normalize=False, **{"lambda": 0.5}),
          [3, -3, -3, 2])


def test_ties_full_density_only_elects_signs():
    # density 1: no trimming. w = 1: Σ τ = [2, -2, 1, 0.5] -> signs [+, -, +, +]
    # e0: 4, 1 agree -> 5/2; e1: -1, -3 -> -4/2; e2: 2, 1 -> 3/2; e3: .5, 1 -> 1.5/2
    close(run("ties", BASE, MODELS), [1 + 2.5, 0 - 2.0, -1 + 1.5, 2 + 0.75])


def test_magnitude_trim_keeps_exactly_k_and_breaks_ties_by_index():
    close(ops.magnitude_trim(T([1.0, -1.0, 1.0, -1.0]), 0.5), [1.0, -1.0, 0.0, 0.0])
    close(ops.magnitude_trim(T([0.1, -5.0, 3.0, 0.2]), 0.25), [0.0, -5.0, 0.0, 0.0])
    # mergekit's int(density·n): 0.29·100 is 28.999999999999996 in floats, so 28 are kept there
    assert ops.keep_count(0.29, 100) == 28 and ops.keep_count(0.01, 10) == 1


# ---- DARE -----------------------------------------------------------------------------------

def expected_mask(seed: int, key: str, index: int, shape, density: float) -> torch.Tensor:
    """Drawn independently of the code under test: sha256 → 63-bit seed → torch.rand < density."""
    digest = hashlib.sha256(f"{seed}:{key}:{index}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.rand(tuple(shape), generator=g) < density


def test_dare_linear_matches_independently_drawn_masks():
    base = torch.linspace(-1, 1, 16)
    models = [base + torch.arange(16.0), base - 2 * torch.arange(16.0)]
    taus = [m - base for m in models]
    masks = [expected_mask(7, "layer.w", i, (16,), d) for i, d in enumerate([0.5, 0.25])]
    # rescale (mergekit's rule, not the paper's 1/density): kept elements times
    # Σ|τ| / Σ|kept|, the L1 norm restored; weights (1, 0.5); λ = 1; no normalize
    scale = [sum(abs(v) for v in tau.tolist()) / sum(abs(v) for v in (tau * m).tolist())
             for tau, m in zip(taus, masks)]
    want = base + taus[0] * masks[0] * scale[0] + 0.5 * taus[1] * masks[1] * scale[1]
    got = run("dare_linear", base, models, [1.0, 0.5], [0.5, 0.25], key="layer.w", seed=7)
    torch.testing.assert_close(got, want)
    # rescale off: dropped but not scaled
    want = base + taus[0] * masks[0] + 0.5 * taus[1] * masks[1]
    got = run("dare_linear", base, models, [1.0, 0.5], [0.5, 0.25], key="layer.w", seed=7, rescale=False)
    torch.testing.assert_close(got, want)


def test_dare_ties_matches_hand_sign_election_on_known_masks():
    base = torch.zeros(12)
    taus = [torch.arange(12.0) - 5.0, 4.0 - torch.arange(12.0) * 0.5]
    masks = [expected_mask(0, "w", i, (12,), 0.5) for i in range(2)]
    # survivors scaled back to each task vector's L1 norm (mergekit's rescale)
    dropped = [(tau * m * (sum(abs(v) for v in tau.tolist()) / sum(abs(v) for v in (tau * m).tolist()))).tolist()
               for tau, m in zip(taus, masks)]
    want = []
    for e in range(12):  # plain-python TIES: elect sign of the sum, sum the agreeing entries
        a, b = dropped[0][e], dropped[1][e]
        sign = 1.0 if a + b >= 0 else -1.0
        want.append(sum(v for v in (a, b) if v != 0 and math.copysign(1.0, v) == sign))
    got = run("dare_ties", base, [base + t for t in taus], [1.0, 1.0], [0.5, 0.5])
    close(got, want)


def test_dare_is_reproducible_and_statistically_right():
    base, tau = torch.zeros(100_000), torch.ones(100_000)
    a = run("dare_linear", base, [tau], densities=[0.3], key="k", seed=1)
    b = run("dare_linear", base, [tau], densities=[0.3], key="k", seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, run("dare_linear", base, [tau], densities=[0.3], key="k", seed=2))
    assert not torch.equal(a, run("dare_linear", base, [tau], densities=[0.3], key="other", seed=1))
    kept = (a != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.01  # ~ 5 standard deviations
    # the L1 norm is restored exactly: each survivor is n / (number kept), about 1 / 0.3
    assert sorted(a.unique().tolist()) == [0.0, pytest.approx(1 / kept, rel=1e-5)]
    assert a.double().mean().item() == pytest.approx(1.0, rel=1e-5)


# ---- registry and per-group use --------------------------------------------------------------

def test_duplicate_registration_is_an_error():
    clash = MergeMethod("linear", lambda *a: None, MERGE_METHODS.get("linear").model_params,
                        MERGE_METHODS.get("linear").global_params, needs_base=False)
    with pytest.raises(ValueError, match="already registered"):
        MERGE_METHODS.add("linear", clash)
    MERGE_METHODS.add("linear", MERGE_METHODS.get("linear"))  # the same object again is fine


def test_per_group_coefficients_via_parameter_settings():
    grad = [0.0, 1.0, 0.5]  # a mergekit gradient: interpolated over depth
    assert evaluate_setting(grad, "x", 0.25) == pytest.approx(0.5)
    assert evaluate_setting(grad, "x", 0.75) == pytest.approx(0.75)
    cond = [ConditionalParameter(filter="self_attn", value=0.2), ConditionalParameter(value=[0.0, 1.0])]
    assert evaluate_setting(cond, "model.layers.1.self_attn.q_proj.weight", 0.5) == 0.2
    assert evaluate_setting(cond, "model.layers.1.mlp.up_proj.weight", 0.5) == 0.5
    # mergekit 0.1.5 reads every tensor outside the layers (head and final norm too) at t = 0
    assert depth("model.embed_tokens.weight", 4) == 0.0 and depth("lm_head.weight", 4) == 0.0
    assert depth("model.layers.2.mlp.up_proj.weight", 5) == 0.5
    ties = MERGE_METHODS.get("ties")
    own, shared = {"weight": 2.0}, {"density": 0.5, "weight": 1.0, "normalize": False}
    p = resolve(ties.model_params, [own, shared], "x", 0.0)
    assert (p.weight, p.density) == (2.0, 0.5)  # own weight wins, global density is the default
    assert resolve(ties.global_params, [shared], "x", 0.0).normalize is False


# ---- config validation ------------------------------------------------------------------------

@pytest.fixture()
def two_paths(tmp_path: Path) -> tuple[str, str, str]:
    paths = []
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        paths.append(str(tmp_path / name))
    return tuple(paths)


def config_error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        plan_from_dict(data, source="m.yml")
    return str(info.value)


def test_config_errors_name_the_field(two_paths):
    a, b, c = two_paths
    msg = config_error({"merge_method": "soup", "models": [{"model": a}]})
    assert "`merge_method`" in msg and "soup" in msg and "linear" in msg and "dare_ties" in msg
    msg = config_error({"merge_method": "linear", "modles": [], "models": [{"model": a}]})
    assert "`modles`" in msg and "allowed here:" in msg and "tokenizer_source" in msg
    msg = config_error({"merge_method": "linear", "models": [{"model": a, "paramters": {}}]})
    assert "`models.0.paramters`" in msg and "parameters" in msg
    msg = config_error({"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": b}, {"model": c}],
                        "parameters": {"t": 0.5}})
    assert "`models`" in msg and "exactly two" in msg
    for method in ("task_arithmetic", "ties", "dare_linear", "dare_ties"):
        msg = config_error({"merge_method": method, "models": [{"model": a}, {"model": b}]})
        assert "`base_model`" in msg and "missing" in msg
    msg = config_error({"merge_method": "ties", "base_model": a,
                        "models": [{"model": b, "parameters": {"density": 0.0, "wieght": 1}}]})
    assert "`models.0.parameters.density`" in msg and "greater than 0" in msg
    assert "`models.0.parameters.wieght`" in msg and "allowed here: weight, density" in msg
    msg = config_error({"merge_method": "dare_ties", "base_model": a, "models": [{"model": b}],
                        "parameters": {"density": [0.5, 1.5]}})
    assert "`parameters.density`" in msg and "1.5" in msg
    msg = config_error({"merge_method": "slerp", "base_model": a, "models": [{"model": b}]})
    assert "`parameters.t`" in msg and "required" in msg
    msg = config_error({"merge_method": "ties", "base_model": a, "models": [{"model": b}],
                        "parameters": {"lambda": "x", "density": [{"filter": "mlp", "value": 0.5}, {"valeu": 1}]}})
    assert "`parameters.lambda`" in msg and "gradient" in msg
    assert "`parameters.density`" in msg and "entry 1" in msg and "`valeu`" in msg
    msg = config_error({"merge_method": "linear", "models": [{"model": a + "/missing"}]})
    assert "`models.0.model`" in msg and "does not exist" in msg


def test_config_plans_roles(two_paths):
    a, b, _ = two_paths
    plan = plan_from_dict({"merge_method": "slerp", "base_model": b, "models": [{"model": a}, {"model": b}],
                           "parameters": {"t": 0.3}, "dtype": "bfloat16"})
    assert (plan.base, plan.others, plan.dtype) == (Path(b), [Path(a)], "bfloat16")
    plan = plan_from_dict({"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 2}},
                                                                {"model": b, "parameters": {"weight": 1}}]})
    assert plan.base is None and plan.others == [Path(a), Path(b)] and plan.tokenizer_source == Path(a)
    plan = plan_from_dict({"merge_method": "ties", "base_model": a, "tokenizer_source": b,
                           "models": [{"model": a}, {"model": b, "parameters": {"weight": 1, "density": 0.5}}]})
    assert plan.base == Path(a) and plan.others == [Path(b)] and plan.tokenizer_source == Path(b)


# ---- end to end: tiny Llama folders -------------------------------------------------------------

@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> tuple[Path, Path]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("llamas")
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    out = []
    for seed, name in ((0, "base"), (1, "other")):
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(root / name)
        out.append(root / name)
    vocab = {c: i for i, c in enumerate(["[UNK]", "[PAD]", *"abcdefgh "])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(out[0])
    return out[0], out[1]


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def test_merge_linear_round_trip(llamas, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from evomerge.merging import run_merge

    base, other = llamas
    cfg = write_config(tmp_path / "soup.yml", {
        "merge_method": "linear",
        "models": [{"model": str(base), "parameters": {"weight": 0.5}},
                   {"model": str(other), "parameters": {"weight": 0.5}}],
    })
    out = run_merge(cfg, tmp_path / "soup")
    merged = load_state(out)
    a, b = load_file(base / "model.safetensors"), load_file(other / "model.safetensors")
    assert set(a) <= set(merged)
    for name in a:
        torch.testing.assert_close(merged[name], 0.5 * a[name] + 0.5 * b[name])
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert AutoTokenizer.from_pretrained(out)("abc")["input_ids"] == [2, 3, 4]
    assert (out / "merge_config.yml").is_file()


@pytest.mark.parametrize("method,params,per_model", [
    ("ties", {"density": 0.5}, {"weight": 1.0}),
    ("dare_ties", {"density": 0.5, "seed": 3}, {"weight": [0.5, 1.0]}),
    ("slerp", {"t": [{"filter": "self_attn", "value": 0.3}, {"value": 0.6}]}, None),
    ("task_arithmetic", {"lambda": 0.5}, {"weight": 1.0}),
])
def test_merge_methods_write_loadable_folders(llamas, tmp_path, method, params, per_model):
    from evomerge.merging import run_merge

    base, other = llamas
    cfg = write_config(tmp_path / "m.yml", {
        "merge_method": method, "base_model": str(base), "dtype": "bfloat16", "parameters": params,
        "models": [{"model": str(other), **({"parameters": per_model} if per_model else {})}],
    })
    merged = load_state(run_merge(cfg, tmp_path / "out"))
    assert len(merged) == 21
    assert all(t.dtype == torch.bfloat16 and torch.isfinite(t.float()).all() for t in merged.values())
    if method == "task_arithmetic":  # θ_base + 0.5 (θ_other − θ_base) is the midpoint, up to bf16
        from safetensors.torch import load_file

        a, b = load_file(base / "model.safetensors"), load_file(other / "model.safetensors")
        name = "model.layers.1.mlp.up_proj.weight"
        torch.testing.assert_close(merged[name].float(), (0.5 * (a[name] + b[name])).to(torch.bfloat16).float())


def test_merge_tokenizer_source(llamas, tmp_path):
    from evomerge.merging import run_merge

    base, other = llamas
    # config.json comes from the first model (no base_model); the tokenizer from tokenizer_source
    cfg = write_config(tmp_path / "m.yml", {
        "merge_method": "linear", "tokenizer_source": str(base), "parameters": {"weight": 1.0},
        "models": [{"model": str(other)}, {"model": str(base)}]})
    out = run_merge(cfg, tmp_path / "out")
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    cfg = write_config(tmp_path / "m2.yml", {
        "merge_method": "linear", "parameters": {"weight": 1.0}, "models": [{"model": str(other)}, {"model": str(base)}]})
    out = run_merge(cfg, tmp_path / "out2")
    assert not (out / "tokenizer.json").exists()  # the first model has none, so none is copied
    assert (out / "config.json").is_file()
