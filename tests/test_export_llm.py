"""`evomerge export` of a merge over bf16 Llama seeds: as the seeds are, by name, without the task."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file as torch_save_file

from evomerge.cli import main as cli_main
from evomerge.config import SearchConfig
from evomerge.engine.basis_spec import checkpoint_basis
from evomerge.engine.results import write_best
from evomerge.errors import EvomergeError
from evomerge.export import export_best
from evomerge.fixtures.synthetic_llama import make_synthetic_llama
from evomerge.genomes.recipe import Recipe
from evomerge.models import CheckpointError, build_layout, open_checkpoint
from evomerge.models.safetensors_format import read_header

COEFFS = np.array([[0.25, 0.75], [0.8, 0.3]])  # two segments, neither a plain average
FIRST_SEED_TEMPLATE = "{# first seed's own template #}{% for m in messages %}{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, Path]:
    """Base one file, experts sharded; the first expert's template and generation config made unique."""
    made = make_synthetic_llama(tmp_path_factory.mktemp("synth") / "out", params="3M", experts=2, dtype="bfloat16",
                                shard_size="1MB", layers=12, tie_embeddings=False, extra_buffer=True)
    first = made["expert_1"]
    (first / "chat_template.jinja").write_text(FIRST_SEED_TEMPLATE)
    gen = json.loads((first / "generation_config.json").read_text())
    gen["temperature"] = 0.42
    gen["do_sample"] = True
    (first / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return made


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _recipe(seed: Path) -> Recipe:
    """Two segments split at the start of a tensor in the middle of the layout."""
    with open_checkpoint(seed) as ckpt:
        layout = build_layout(ckpt)
    split = layout.tensors[len(layout.tensors) // 2].offset
    return Recipe(np.array([0, split, layout.size], dtype=np.int64), COEFFS.copy())


def _run(folder: Path, seed_paths: list[Path], base: Path, recipe, **options) -> Path:
    """A run folder as a finished search leaves it (config.json, best.safetensors, best.json)."""
    folder.mkdir(parents=True)
    config = SearchConfig.model_validate({
        "name": "export-test", "seeds": [str(p) for p in seed_paths],
        "fitness": {"task": "lm_exact_match", "options": {"model": str(base), "data": ["absent.jsonl"], **options}},
        "budget": {"evaluations": 10},
    })
    (folder / "config.json").write_text(json.dumps(config.model_dump(mode="json"), indent=2))
    write_best(folder, {"member_id": 7, "train_score": 0.5, "test_score": None, "generation": 1, "parents": [3, 4],
                        "genome": recipe}, config)
    return folder


def _expected(seed_paths: list[Path], recipe: Recipe, out_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """By name: sum of coefficient x seed tensor in float32, rounded once to the tensor's dtype
    (or to out_dtype); the coefficients are those of the segment the tensor lies in."""
    with open_checkpoint(seed_paths[0]) as ckpt:
        layout = build_layout(ckpt)
    a, b = _weights(seed_paths[0]), _weights(seed_paths[1])
    out = {}
    for name in a:
        spec = layout.index(name)
        seg = int(np.searchsorted(recipe.breaks, spec.offset, side="right")) - 1
        assert recipe.breaks[seg + 1] >= spec.end  # the split is on a tensor boundary
        c0, c1 = (float(c) for c in recipe.coeffs[seg])
        # each product rounded to float32, then summed: the materialising arithmetic
        acc = a[name].to(torch.float32) * c0 + b[name].to(torch.float32) * c1
        out[name] = acc.to(out_dtype or a[name].dtype)
    return out


def _no_task(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("export built the fitness task")

    import evomerge.engine.basis_spec
    import evomerge.export
    import evomerge.tasks

    for module in (evomerge.export, evomerge.tasks, evomerge.engine.basis_spec):
        monkeypatch.setattr(module, "build_task", refuse)


@pytest.fixture(scope="module")
def exported(seeds, tmp_path_factory) -> tuple[Path, Path, Recipe]:
    """One export, made under a 077 umask so the modes are ours and not the umask's."""
    root = tmp_path_factory.mktemp("export")
    experts = [seeds["expert_1"], seeds["expert_2"]]
    recipe = _recipe(experts[0])
    run = _run(root / "run", experts, seeds["base"], recipe)
    mp = pytest.MonkeyPatch()
    _no_task(mp)
    old = os.umask(0o077)
    try:
        assert cli_main(["export", str(run), str(root / "out")]) == 0
    finally:
        os.umask(old)
        mp.undo()
    return run, root / "out", recipe


def test_export_is_the_bf16_merge_by_name_and_reloads(seeds, exported):
    from transformers import AutoModelForCausalLM

    _, out, recipe = exported
    experts = [seeds["expert_1"], seeds["expert_2"]]
    expected = _expected(experts, recipe, None)
    written = _weights(out)
    assert set(written) == set(expected)
    for name, want in expected.items():
        got = written[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), name
    assert written["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert written["model.layers.0.self_attn.rotary_emb.inv_freq"].dtype == torch.float32  # stays as seeds have it
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.dtype == torch.bfloat16
    state = model.state_dict()
    checked = 0
    for name, t in state.items():
        if name in expected:
            assert torch.equal(t, expected[name]), name
            checked += 1
    assert checked == sum(1 for n in expected if not n.endswith("inv_freq"))


def test_export_files_dtype_size_modes_and_side_files(seeds, exported):
    _, out, _ = exported
    first = seeds["expert_1"]
    weight_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    seed_bytes = sum(p.stat().st_size for p in first.glob("*.safetensors"))
    assert abs(weight_bytes - seed_bytes) <= 0.01 * seed_bytes, (weight_bytes, seed_bytes)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg.get("torch_dtype", "bfloat16") == "bfloat16"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for path in out.iterdir():
        assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o644, path
    # from the first seed, not from fitness.options.model (the base has no template, another generation config)
    assert (out / "chat_template.jinja").read_text() == FIRST_SEED_TEMPLATE
    assert (out / "generation_config.json").read_bytes() == (first / "generation_config.json").read_bytes()
    assert (out / "tokenizer_config.json").read_bytes() == (first / "tokenizer_config.json").read_bytes()
    assert not (seeds["base"] / "chat_template.jinja").exists()
    meta = json.loads((out / "evomerge.json").read_text())
    assert meta["member_id"] == 7 and meta["genome"] == "recipe"


def test_export_float32_writes_float32_and_says_so(seeds, exported, tmp_path, monkeypatch):
    run, _, recipe = exported
    _no_task(monkeypatch)
    out = tmp_path / "f32"
    assert cli_main(["export", str(run), str(out), "--dtype", "float32"]) == 0
    headers = [read_header(p)[0] for p in out.glob("*.safetensors")]
    assert headers and all(e.dtype == "F32" for h in headers for e in h.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    expected = _expected([seeds["expert_1"], seeds["expert_2"]], recipe, torch.float32)
    written = _weights(out)
    for name, want in expected.items():  # computed straight into float32: no bf16 rounding on the way
        assert torch.equal(written[name], want), name


def test_export_shards_large_models_with_an_index(seeds, exported, tmp_path, monkeypatch):
    run, _, _ = exported
    _no_task(monkeypatch)
    out = tmp_path / "sharded"
    export_best(run, out, max_shard_bytes=1 << 20)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 1 and set(index["weight_map"].values()) == set(files)
    assert set(index["weight_map"]) == set(_weights(seeds["expert_1"]))


def test_default_shard_size_is_5gb():
    import inspect

    from evomerge.models.save import save_model_folder

    assert inspect.signature(save_model_folder).parameters["max_shard_bytes"].default == 5 * 10**9


def test_export_does_not_recheck_seeds_for_nan(seeds, tmp_path, monkeypatch):
    """The search refused non-finite seeds before it started; export does not read every seed again."""
    bad = tmp_path / "expert_2_nan"
    shutil.copytree(seeds["expert_2"], bad)
    shard = sorted(bad.glob("model-*.safetensors"))[0]
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    name = sorted(tensors)[0]
    tensors[name].view(-1)[3] = float("nan")
    torch_save_file(tensors, str(shard), metadata=metadata)
    experts = [seeds["expert_1"], bad]
    with pytest.raises(CheckpointError, match="not finite"):
        checkpoint_basis([str(p) for p in experts])  # what the search would have said
    recipe = _recipe(experts[0])
    run = _run(tmp_path / "run", experts, seeds["base"], recipe)
    _no_task(monkeypatch)
    export_best(run, tmp_path / "out")
    assert torch.isnan(_weights(tmp_path / "out")[name].view(-1)[3])


def test_export_names_a_missing_seed(seeds, tmp_path, capsys):
    gone = tmp_path / "expert_gone"
    shutil.copytree(seeds["expert_2"], gone)
    run = _run(tmp_path / "run", [seeds["expert_1"], gone], seeds["base"], _recipe(seeds["expert_1"]))
    shutil.rmtree(gone)
    with pytest.raises(EvomergeError, match="expert_gone.*does not exist"):
        export_best(run, tmp_path / "out")
    assert cli_main(["export", str(run), str(tmp_path / "out")]) != 0
    assert "expert_gone" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_trust_remote_code_takes_the_seeds_code(seeds, tmp_path, monkeypatch):
    first = tmp_path / "expert_1_code"
    shutil.copytree(seeds["expert_1"], first)
    (first / "modeling_custom.py").write_text("# the seed's own modelling code\n")
    experts = [first, seeds["expert_2"]]
    recipe = _recipe(first)
    _no_task(monkeypatch)
    plain = _run(tmp_path / "plain", experts, seeds["base"], recipe)
    export_best(plain, tmp_path / "out_plain")
    assert not (tmp_path / "out_plain" / "modeling_custom.py").exists()
    remote = _run(tmp_path / "remote", experts, seeds["base"], recipe, trust_remote_code=True)
    export_best(remote, tmp_path / "out_remote")
    assert (tmp_path / "out_remote" / "modeling_custom.py").read_text() == "# the seed's own modelling code\n"


def test_non_floating_tensors_come_from_the_first_seed(seeds, tmp_path, monkeypatch):
    experts = []
    for k, src in enumerate([seeds["expert_1"], seeds["expert_2"]]):
        dst = tmp_path / f"seed_{k}"
        shutil.copytree(src, dst)
        shard = sorted(dst.glob("model-*.safetensors"))[-1]
        with safe_open(str(shard), "pt") as f:
            tensors = {n: f.get_tensor(n) for n in f.keys()}
            metadata = f.metadata()
        tensors["extra.position_ids"] = torch.arange(5, dtype=torch.int64) + 100 * k
        torch_save_file(tensors, str(shard), metadata=metadata)
        index = dst / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        data["weight_map"]["extra.position_ids"] = shard.name
        index.write_text(json.dumps(data))
        experts.append(dst)
    run = _run(tmp_path / "run", experts, seeds["base"], _recipe(experts[0]))
    _no_task(monkeypatch)
    export_best(run, tmp_path / "out")
    got = _weights(tmp_path / "out")["extra.position_ids"]
    assert got.dtype == torch.int64 and torch.equal(got, torch.arange(5))


def test_a_recipe_exports_one_tensor_at_a_time(seeds, exported, tmp_path, monkeypatch, capsys):
    """No model-sized buffer: each tensor is merged when the writer reaches it (the whole merge's
    bits), and the progress bar counts the bytes written."""
    from evomerge.genomes.basis import Basis

    run, _, recipe = exported
    _no_task(monkeypatch)
    whole = _expected([seeds["expert_1"], seeds["expert_2"]], recipe, None)  # one whole materialise
    made: list[int] = []
    original_empty = torch.empty

    def empty(*size, **kwargs):
        t = original_empty(*size, **kwargs)
        made.append(t.numel())
        return t

    def no_buffer(self, *args, **kwargs):
        raise AssertionError("a model-sized buffer was allocated")

    monkeypatch.setattr(Basis, "new_buffer", no_buffer)
    monkeypatch.setattr(torch, "empty", empty)
    export_best(run, tmp_path / "out", progress=True)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "export" in err
    weights = _weights(tmp_path / "out")
    largest = max(t.numel() for t in weights.values())
    assert made and max(made) <= largest < sum(t.numel() for t in weights.values()) / 4
    assert weights.keys() == whole.keys() and all(torch.equal(weights[n], whole[n]) for n in whole)


def test_layerwise_ties_genome_exports_what_it_materialises(seeds, tmp_path, monkeypatch):
    """A non-linear genome: materialised into the one bf16 buffer; tensors of another dtype are cast back."""
    from evomerge.genomes.layerwise import LayerwiseGenome

    experts = [seeds["expert_1"], seeds["expert_2"]]
    split = _recipe(experts[0]).breaks
    genome = LayerwiseGenome("ties", weights=np.array([[1.0, 0.6], [1.0, 0.9]]),
                             densities=np.array([[1.0, 0.5], [1.0, 0.7]]), base=0, boundaries=split)
    run = _run(tmp_path / "run", experts, seeds["base"], genome)
    _no_task(monkeypatch)
    export_best(run, tmp_path / "out")
    basis = checkpoint_basis([str(p) for p in experts])
    want = genome.materialise(basis, out=basis.new_buffer())
    written = _weights(tmp_path / "out")
    assert set(written) == set(basis.layout.names())
    for spec in basis.layout.tensors:
        got = written[spec.name]
        assert got.dtype == (torch.float32 if spec.dtype == "F32" else torch.bfloat16), spec.name
        assert torch.equal(got, want[spec.offset:spec.end].view(spec.shape).to(got.dtype)), spec.name
