"""Checkpoint I/O against real (tiny) transformers checkpoints: mapping, layout, validation, export."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from evomerge.models import (CheckpointError, Layout, build_layout, open_checkpoint, open_seeds, read_flat,
                             save_model_folder)

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def _make(path: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """Models built once per module: creating and saving a tiny Llama takes ~50 ms each."""
    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    model.save_pretrained(root / "a")
    model.save_pretrained(root / "a_sharded", max_shard_size="20KB")
    (root / "a" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return {"a": root / "a", "a_sharded": root / "a_sharded", "b": _make(root / "b", seed=1),
            "vocab130": _make(root / "vocab130", vocab_size=130), "tied": _make(root / "tied", tie_word_embeddings=True)}


def _state(path: Path) -> dict[str, torch.Tensor]:
    return LlamaForCausalLM.from_pretrained(path).state_dict()


def _variant(src: Path, dst: Path, edit) -> Path:
    """A copy of src's weights after `edit(state_dict)`, as a single-file HF folder."""
    ckpt = open_checkpoint(src)
    state = {n: ckpt.view(n).clone() for n in ckpt.names()}
    edit(state)
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_layout_covers_float_tensors_and_views_match_transformers(zoo):
    ckpt = open_checkpoint(zoo["a"])
    layout = build_layout(ckpt)
    ref = _state(zoo["a"])
    assert set(ckpt.names()) == set(ref)
    assert layout.names() == [n for n in ckpt.names() if ckpt.spec(n)[1] in {"F16", "BF16", "F32", "F64"}]
    assert layout.size == sum(t.numel() for t in ref.values()) == sum(s.numel for s in layout.tensors)
    assert [s.offset for s in layout.tensors] == [sum(t.numel for t in layout.tensors[:i]) for i in range(len(layout))]
    for name in ckpt.names():
        assert torch.equal(ckpt.view(name), ref[name]), name
        assert ckpt.spec(name) == (tuple(ref[name].shape), "F32")
    assert layout.index("model.embed_tokens.weight").shape == (128, 32)
    assert ckpt.config()["vocab_size"] == 128


def test_views_are_zero_copy_over_the_file(zoo):
    ckpt = open_checkpoint(zoo["a"])
    file_size = (zoo["a"] / "model.safetensors").stat().st_size
    header_end = 8 + int.from_bytes((zoo["a"] / "model.safetensors").read_bytes()[:8], "little")
    views = [ckpt.view(n) for n in ckpt.names()]
    base = views[0].untyped_storage().data_ptr()
    for v in views:  # one storage spanning the whole mapped file, each view at its own byte offset
        assert v.untyped_storage().data_ptr() == base
        assert v.untyped_storage().nbytes() == file_size
        assert header_end <= v.data_ptr() - base <= file_size - v.numel() * v.element_size()
    assert len({v.data_ptr() for v in views}) == len(views)


def test_read_flat_round_trips(zoo):
    ckpt = open_checkpoint(zoo["a"])
    layout = build_layout(ckpt)
    flat = read_flat(ckpt, layout)
    assert flat.dtype == torch.float32 and flat.shape == (layout.size,)
    for spec in layout.tensors:
        assert torch.equal(flat[spec.offset:spec.end].view(spec.shape), ckpt.view(spec.name))
    out = torch.full((layout.size,), float("nan"))
    assert read_flat(ckpt, layout, out=out) is out and torch.equal(out, flat)
    with pytest.raises(CheckpointError, match="1-D floating tensor"):
        read_flat(ckpt, layout, out=torch.empty(layout.size - 1))


def test_layout_json_and_fingerprint(zoo):
    layout = build_layout(open_checkpoint(zoo["a"]))
    again = Layout.from_json(json.loads(json.dumps(layout.to_json())))
    assert again == layout and again.fingerprint() == layout.fingerprint()
    assert build_layout(open_checkpoint(zoo["b"])).fingerprint() == layout.fingerprint()  # same arch, other weights
    assert build_layout(open_checkpoint(zoo["vocab130"])).fingerprint() != layout.fingerprint()
    with pytest.raises(CheckpointError, match="fingerprint"):
        Layout.from_json({**layout.to_json(), "fingerprint": "0" * 64})


def test_sharded_folder_reads_all_shards_in_order(zoo):
    single, sharded = open_checkpoint(zoo["a"]), open_checkpoint(zoo["a_sharded"])
    assert len(sharded.files) > 2
    assert sorted(single.names()) == sorted(sharded.names())
    for name in single.names():
        assert sharded.spec(name) == single.spec(name)
        assert torch.equal(sharded.view(name), single.view(name))
    order = [(sharded.files.index(sharded.file_of(n)), sharded.view(n).data_ptr()) for n in sharded.names()]
    assert order == sorted(order)  # shard order, then position in the file
    assert open_checkpoint(zoo["a_sharded"]).names() == sharded.names()  # deterministic
    seeds, layout = open_seeds([zoo["a_sharded"], zoo["a"]])
    assert torch.equal(read_flat(seeds[0], layout), read_flat(seeds[1], layout))


def test_bare_safetensors_file_and_reopen_by_path(zoo):
    ckpt = open_checkpoint(zoo["a"] / "model.safetensors")
    assert ckpt.config() is None and len(ckpt.names()) == len(open_checkpoint(zoo["a"]).names())
    clone = pickle.loads(pickle.dumps(ckpt))  # ships as a path (e.g. to a Ray worker), reopens mapped
    assert clone.path == ckpt.path and torch.equal(clone.view("lm_head.weight"), ckpt.view("lm_head.weight"))


def test_open_seeds_accepts_compatible_seeds(zoo):
    seeds, layout = open_seeds([zoo["a"], zoo["b"]])
    assert len(seeds) == 2 and layout == build_layout(seeds[1])


def test_different_vocab_size_names_first_tensor_and_both_seeds(zoo):
    a, v = open_checkpoint(zoo["a"]), open_checkpoint(zoo["vocab130"])
    first = next(n for n in a.names() if a.spec(n) != v.spec(n))
    with pytest.raises(CheckpointError) as err:
        open_seeds([zoo["a"], zoo["vocab130"]])
    msg = str(err.value)
    assert msg.startswith(f"{first}: ")
    assert f"(128, 32) in {zoo['a']}" in msg and f"(130, 32) in {zoo['vocab130']}" in msg
    with pytest.raises(CheckpointError, match=r"^model\.embed_tokens\.weight: \(128, 32\) in .* vs \(130, 32\) in "):
        open_seeds([zoo["a_sharded"], zoo["vocab130"]])  # embed_tokens is first in the sharded order


def test_mismatched_shape_and_dtype(zoo, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    odd = _variant(zoo["a"], tmp_path / "odd", lambda s: s.__setitem__(name, s[name].t().contiguous()))
    with pytest.raises(CheckpointError, match=rf"^{name}: \(64, 32\) in .* vs \(32, 64\) in .*odd"):
        open_seeds([zoo["a"], odd])
    half = _variant(zoo["a"], tmp_path / "half", lambda s: s.update({k: v.half() for k, v in s.items()}))
    with pytest.raises(CheckpointError, match=r"dtype F32 in .* vs F16 in .*half"):
        open_seeds([zoo["a"], half])


def test_missing_and_extra_tensor(zoo, tmp_path):
    name = "model.layers.0.post_attention_layernorm.weight"
    fewer = _variant(zoo["a"], tmp_path / "fewer", lambda s: s.pop(name))
    with pytest.raises(CheckpointError, match=rf"^{name}: present in .* but missing in .*fewer"):
        open_seeds([zoo["a"], fewer])
    with pytest.raises(CheckpointError, match=rf"^{name}: present in .*a but missing in .*fewer"):
        open_seeds([fewer, zoo["a"]])


def test_missing_shard(zoo, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(zoo["a_sharded"], broken)
    gone = sorted(broken.glob("model-*.safetensors"))[2]
    gone.unlink()
    with pytest.raises(CheckpointError, match=rf"{gone.name}: shard listed in model.safetensors.index.json does not exist"):
        open_seeds([zoo["a"], broken])


def test_truncated_files(zoo, tmp_path):
    data = (zoo["a"] / "model.safetensors").read_bytes()
    short = tmp_path / "short.safetensors"
    short.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"short\.safetensors: tensor .* ends at byte .*truncated.*re-download"):
        open_checkpoint(short)
    stub = tmp_path / "stub.safetensors"
    stub.write_bytes(data[:200])
    with pytest.raises(CheckpointError, match=r"stub\.safetensors: header length \d+ runs past the end"):
        open_checkpoint(stub)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="too short"):
        open_checkpoint(tiny)


def test_nan_weights_name_seed_and_tensor(zoo, tmp_path):
    name = "model.layers.1.self_attn.v_proj.weight"

    def poison(s):
        s[name][3, 5] = float("nan")
        s[name][4, 0] = float("inf")

    bad = _variant(zoo["a"], tmp_path / "bad", poison)
    with pytest.raises(CheckpointError, match=rf"seed .*bad: tensor {name} is not finite \(1 NaN, 1 inf"):
        open_seeds([zoo["a"], bad])
    seeds, _ = open_seeds([zoo["a"], bad], check_finite=False)
    assert torch.isnan(seeds[1].view(name)).any()


def test_pickle_checkpoint_refused_then_loaded_when_allowed(zoo, tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(zoo["a"] / "config.json", legacy / "config.json")
    ref = _state(zoo["a"])
    torch.save(ref, legacy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*can run arbitrary code.*save_pretrained.*allow_pickle: true"):
        open_seeds([zoo["a"], legacy])
    seeds, layout = open_seeds([zoo["a"], legacy], allow_pickle=True)
    assert layout.size == build_layout(seeds[1]).size
    assert torch.equal(read_flat(seeds[0], layout), read_flat(seeds[1], layout))
    for name, t in ref.items():
        assert torch.equal(seeds[1].view(name), t)


def _logits(path: Path, dtype=None) -> torch.Tensor:
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=dtype)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        return model(torch.arange(20).reshape(2, 10)).logits.float()


def test_save_round_trip_loads_with_identical_logits(zoo, tmp_path):
    ckpt = open_checkpoint(zoo["a"])
    views = {n: ckpt.view(n) for n in ckpt.names()}  # zero-copy views sharing one storage
    out = save_model_folder(views, tmp_path / "deep" / "out", source=zoo["a"])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "tokenizer_config.json"]
    assert not list(out.parent.glob(".*tmp*"))
    raw = (out / "model.safetensors").read_bytes()
    assert json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"] == {"format": "pt"}
    assert torch.equal(_logits(out), _logits(zoo["a"]))


def test_sharded_save_writes_index_and_replaces_in_place(zoo, tmp_path):
    ckpt = open_checkpoint(zoo["a"])
    tensors = {n: ckpt.view(n) for n in ckpt.names()}
    out = save_model_folder(tensors, tmp_path / "out", source=zoo["a"], max_shard_bytes=30_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors.values())
    assert torch.equal(_logits(out), _logits(zoo["a"]))
    save_model_folder(tensors, out, source=zoo["a"])  # now unsharded into the same folder
    assert not list(out.glob("model-*")) and not (out / "model.safetensors.index.json").exists()
    assert torch.equal(_logits(out), _logits(zoo["a"]))


def test_bfloat16_save_updates_config(zoo, tmp_path):
    ckpt = open_checkpoint(zoo["a"])
    out = save_model_folder({n: ckpt.view(n) for n in ckpt.names()}, tmp_path / "bf16", source=zoo["a"],
                            dtype="bfloat16")
    saved = open_checkpoint(out)
    assert {saved.spec(n)[1] for n in saved.names()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(saved.view(name), ckpt.view(name).bfloat16())
    expected = _logits(zoo["a"])
    assert torch.allclose(_logits(out, dtype=torch.float32), expected, atol=0.05)
    with pytest.raises(CheckpointError, match="float32, bfloat16, float16"):
        save_model_folder({name: ckpt.view(name)}, tmp_path / "x", dtype="int8")


def test_tied_embeddings_are_not_invented(zoo, tmp_path):
    ckpt = open_checkpoint(zoo["tied"])
    assert "lm_head.weight" not in ckpt.names()
    out = save_model_folder({n: ckpt.view(n) for n in ckpt.names()}, tmp_path / "tied", source=zoo["tied"])
    assert "lm_head.weight" not in open_checkpoint(out).names()
    assert torch.equal(_logits(out), _logits(zoo["tied"]))


def test_writer_interoperates_with_safetensors_for_odd_tensors(tmp_path):
    from safetensors.torch import load_file

    tensors = {"w": torch.randn(3, 5).t(), "scalar": torch.tensor(2.5, dtype=torch.float64), "empty": torch.empty(0, 4),
               "ids": torch.arange(7), "mask": torch.tensor([True, False, True]), "h": torch.randn(3).half()}
    out = save_model_folder(tensors, tmp_path / "odd")
    loaded = load_file(str(out / "model.safetensors"))
    ckpt = open_checkpoint(out)
    assert [s.name for s in build_layout(ckpt).tensors] == ["scalar", "empty", "w", "h"]  # floats only, file order
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t) and torch.equal(ckpt.view(name), t), name
