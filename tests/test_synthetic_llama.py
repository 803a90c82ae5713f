"""Synthetic Llama checkpoints: loadable, sharded unlike their base, bf16, deterministic, small deltas."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from evomerge.cli import main as cli_main
from evomerge.fixtures.synthetic_llama import (
    make_synthetic_llama,
    parse_params,
    parse_size,
    plan_shape,
    tensor_specs,
)
from evomerge.models.safetensors_format import read_header

SMALL = dict(params="3M", shard_size="1MB")


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    return make_synthetic_llama(tmp_path_factory.mktemp("synth") / "out", **SMALL)


@pytest.fixture(scope="module")
def variant(tmp_path_factory) -> dict[str, Path]:
    """Tied embeddings and the old per-layer inv_freq buffers, one expert, no chat template."""
    return make_synthetic_llama(tmp_path_factory.mktemp("synth-var") / "out", experts=1, tie_embeddings=True,
                                extra_buffer=True, chat_template=False, **SMALL)


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in _files(folder):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _headers(folder: Path) -> dict[str, dict]:
    return {p.name: read_header(p)[0] for p in _files(folder)}


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_folders_load_in_bf16_with_the_files_weights_and_finite_logits(made):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert list(made) == ["base", "expert_1", "expert_2"]
    for name, folder in made.items():
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        assert model.dtype == torch.bfloat16
        state = model.state_dict()
        for key, t in _tensors(folder).items():  # every tensor in the files reaches the parameter of its name
            assert torch.equal(state[key], t), (name, key)
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        batch = tok(["12+34=", "rev:abc="], return_tensors="pt", padding=True)
        with torch.inference_mode():
            logits = model(**batch).logits
        assert logits.dtype == torch.bfloat16 and logits.shape[-1] == _config(folder)["vocab_size"]
        assert torch.isfinite(logits).all()


def test_experts_are_sharded_with_a_matching_index_and_the_base_is_one_file(made):
    base_files = _files(made["base"])
    assert [p.name for p in base_files] == ["model.safetensors"]
    assert not (made["base"] / "model.safetensors.index.json").exists()
    order = [name for name, _, _ in tensor_specs(plan_shape("3M"))]
    for expert in ("expert_1", "expert_2"):
        folder = made[expert]
        headers = _headers(folder)
        assert len(headers) > 1
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == {k: file for file, entries in headers.items() for k in entries}
        data = {file: sum(e.end - e.start for e in entries.values()) for file, entries in headers.items()}
        assert index["metadata"]["total_size"] == sum(data.values())
        assert all(size <= parse_size("1MB") for size in data.values())
        # Shards follow the model's own (layer) order: walking the state_dict, the file number never goes back.
        assert sorted(index["weight_map"]) == sorted(order)
        numbers = [sorted(headers).index(index["weight_map"][k]) for k in order]
        assert numbers == sorted(numbers) and numbers[-1] == len(headers) - 1


def test_bf16_everywhere_and_more_than_ten_layers_sorted_by_name_in_one_file(made):
    for folder in made.values():
        config = _config(folder)
        assert config["dtype"] == "bfloat16"
        assert config["num_hidden_layers"] > 10
        for entries in _headers(folder).values():
            assert {e.dtype for e in entries.values()} == {"BF16"}
    entries = _headers(made["base"])["model.safetensors"]
    by_offset = sorted(entries, key=lambda k: entries[k].start)
    ten, two = "model.layers.10.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"
    assert by_offset.index(ten) < by_offset.index(two)  # the trap a by-position binding falls into


def test_big_sizes_use_grouped_query_attention_within_ten_percent():
    for target in ("500M", "1B", "1.5B", "7B", 3_000_000, "20M", "100M"):
        for tied in (False, True):
            shape = plan_shape(target, tie_embeddings=tied)
            assert abs(shape.params - parse_params(target)) <= 0.1 * parse_params(target), (target, tied)
            assert shape.layers > 10
            assert shape.heads * shape.head_dim == shape.hidden and shape.heads % shape.kv_heads == 0
            if parse_params(target) >= 500_000_000:
                assert shape.kv_heads < shape.heads and shape.vocab >= 32000
    assert plan_shape("1B").layers == 16 and plan_shape("3M").layers == 12
    assert plan_shape("3M", layers=20).layers == 20
    # the counted parameters are the ones the model really has
    specs = tensor_specs(plan_shape("3M"))
    assert sum(math.prod(dims) for _, dims, _ in specs) == plan_shape("3M").params


def test_experts_are_base_plus_small_distinct_deltas(made):
    base = _tensors(made["base"])
    experts = [_tensors(made[k]) for k in ("expert_1", "expert_2")]
    assert all(set(e) == set(base) for e in experts)
    weights = [k for k in base if not k.endswith("norm.weight")]
    for expert in experts:
        deltas = {k: expert[k].float() - base[k].float() for k in base}
        # weights move by ~1e-3 (std 0.02), norms by ~1e-2 (at 1.0): a fine-tune's size, not a new model
        assert all(d.abs().max() < (0.01 if k in weights else 0.1) for k, d in deltas.items())
        assert all(d.abs().max() > 0 for k, d in deltas.items() if k in weights)
        norm = torch.cat([d.flatten() for k, d in deltas.items() if k in weights]).std()
        spread = torch.cat([base[k].float().flatten() for k in weights]).std()
        assert 0 < norm < 0.2 * spread
    assert not torch.equal(experts[0]["model.layers.3.mlp.up_proj.weight"], experts[1]["model.layers.3.mlp.up_proj.weight"])


def _bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_weights(made, tmp_path):
    again = make_synthetic_llama(tmp_path / "again", **SMALL)
    root = made["base"].parent
    assert _bytes(again["base"].parent).keys() == _bytes(root).keys()
    for name, folder in made.items():
        assert _bytes(again[name]) == _bytes(folder), name
    other = make_synthetic_llama(tmp_path / "other", experts=1, seed=1, **SMALL)
    for name in ("base", "expert_1"):
        a, b = _tensors(made[name]), _tensors(other[name])
        assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_weights_depend_on_name_not_on_sharding(made, tmp_path):
    sharded = make_synthetic_llama(tmp_path / "sharded", experts=1, base_shard_size="2MB", **SMALL)
    assert len(_files(sharded["base"])) > 1 and (sharded["base"] / "model.safetensors.index.json").is_file()
    one, many = _tensors(made["base"]), _tensors(sharded["base"])
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)


def test_tied_embeddings_have_no_lm_head_and_extra_buffers_are_float32(variant):
    from transformers import AutoModelForCausalLM

    assert list(variant) == ["base", "expert_1"]
    for folder in variant.values():
        assert _config(folder)["tie_word_embeddings"] is True
        tensors = _tensors(folder)
        assert "lm_head.weight" not in tensors
        layers = _config(folder)["num_hidden_layers"]
        buffers = {k: v for k, v in tensors.items() if k.endswith("rotary_emb.inv_freq")}
        assert set(buffers) == {f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(layers)}
        head_dim = _config(folder)["head_dim"]
        expected = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        assert all(v.dtype == torch.float32 and torch.allclose(v, expected) for v in buffers.values())
        assert all(v.dtype == torch.bfloat16 for k, v in tensors.items() if k not in buffers)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)  # transformers skips the buffers
        assert torch.equal(model.lm_head.weight, tensors["model.embed_tokens.weight"])


def test_chat_template_in_experts_only(made, variant):
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(made["base"], local_files_only=True)
    assert base.chat_template is None
    assert "chat_template" not in json.loads((made["base"] / "tokenizer_config.json").read_text())
    for name in ("expert_1", "expert_2"):
        tok = AutoTokenizer.from_pretrained(made[name], local_files_only=True)
        assert tok.chat_template
        assert json.loads((made[name] / "tokenizer_config.json").read_text())["chat_template"] == tok.chat_template
        text = tok.apply_chat_template([{"role": "user", "content": "12+34="}], tokenize=False,
                                       add_generation_prompt=True)
        assert text == "user: 12+34=\nassistant: "
    assert AutoTokenizer.from_pretrained(variant["expert_1"], local_files_only=True).chat_template is None


def test_size_and_param_parsing():
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5MiB") == 3 * 2**19
    assert parse_size(4096) == 4096 and parse_size("4096") == 4096
    assert parse_params("3M") == 3 * 10**6 and parse_params("1.5B") == 1_500_000_000 and parse_params(77) == 77
    for bad in ("5XB", "-1MB", "", "MB", "0", "1e9", True):
        with pytest.raises(ValueError, match="shard_size") as info:
            parse_size(bad)
        assert "500MB" in str(info.value)  # says what it accepts
    with pytest.raises(ValueError, match="params"):
        parse_params("1T")
    with pytest.raises(ValueError, match="too few"):
        plan_shape("10K")


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="base_shard_size"):
        make_synthetic_llama(tmp_path / "x", params="3M", base_shard_size="big")
    with pytest.raises(ValueError, match="dtype"):
        make_synthetic_llama(tmp_path / "x", params="3M", dtype="int8")
    with pytest.raises(ValueError, match="experts"):
        make_synthetic_llama(tmp_path / "x", params="3M", experts=0)
    assert not (tmp_path / "x").exists()


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli_main(["fixtures", "synthetic-llama", str(out), "--params", "3M", "--experts", "1", "--dtype", "bfloat16",
                   "--shard-size", "1MB", "--seed", "3", "--quiet"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["base", "expert_1", "synthetic_llama.json"]
    assert len(_files(out / "expert_1")) > 1 and len(_files(out / "base")) == 1
    info = json.loads((out / "synthetic_llama.json").read_text())
    assert info["seed"] == 3 and f"{info['params']:,} params" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fixtures", "synthetic-llama", str(tmp_path / "bad"), "--shard-size", "500 megs"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--shard-size" in err and "2GiB" in err


def test_other_dtypes_are_written_as_asked(tmp_path):
    from transformers import AutoModelForCausalLM

    folders = make_synthetic_llama(tmp_path / "fp16", experts=1, dtype="fp16", **SMALL)
    for folder in folders.values():
        assert _config(folder)["dtype"] == "float16"
        assert {e.dtype for entries in _headers(folder).values() for e in entries.values()} == {"F16"}
    assert AutoModelForCausalLM.from_pretrained(folders["expert_1"], local_files_only=True).dtype == torch.float16
