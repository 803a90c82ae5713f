"""The tiny-LM fixture: three loadable, mergeable HF folders, made deterministically in seconds."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.fixtures import skills
from evomerge.fixtures.tiny_lm import MODEL_NAMES, main, make_tiny_lm

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-lm")
    info = make_tiny_lm(root / "models", scale="test", seed=0, data_dir=root / "data")
    return root, info


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_folders_open_offline(made):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    root, info = made
    for name in MODEL_NAMES:
        folder = root / "models" / name
        assert Path(info["models"][name]) == folder
        assert (folder / "model.safetensors").is_file()
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        assert isinstance(model, LlamaForCausalLM)
        assert tok.padding_side == "left"
        assert None not in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id)
        ids = tok("rev:abc=")["input_ids"]
        assert ids[0] == tok.bos_token_id and len(ids) == 1 + len("rev:abc=")  # one token per character
        assert tok.decode(ids, skip_special_tokens=True) == "rev:abc="
        assert tok.unk_token_id not in tok("0123456789+=:abcxyz")["input_ids"]


def test_same_architecture_and_tokenizer(made):
    from evomerge.models import build_layout, open_checkpoint

    root, _ = made
    folders = [root / "models" / n for n in MODEL_NAMES]
    configs = [json.loads((f / "config.json").read_text()) for f in folders]
    assert all(c == configs[0] for c in configs)
    assert configs[0]["model_type"] == "llama" and configs[0]["tie_word_embeddings"] is False
    tokenizers = [(f / "tokenizer.json").read_bytes() for f in folders]
    assert all(t == tokenizers[0] for t in tokenizers)
    fingerprints = set()
    for f in folders:
        with open_checkpoint(f) as ckpt:
            fingerprints.add(build_layout(ckpt).fingerprint())
    assert len(fingerprints) == 1
    base, add, rev = (_weights(f) for f in folders)
    # Each expert moved away from the base, and not in the same way.
    assert any(not torch.equal(base[k], add[k]) for k in base)
    assert any(not torch.equal(add[k], rev[k]) for k in base)


def test_same_seed_same_weights(made, tmp_path):
    root, _ = made
    threads = torch.get_num_threads()
    make_tiny_lm(tmp_path / "again", scale="test", seed=0, data_dir=tmp_path / "data")
    make_tiny_lm(tmp_path / "other", scale="test", seed=1, data_dir=tmp_path / "data")
    assert torch.get_num_threads() == threads  # the single-thread training restores the setting
    for name in MODEL_NAMES:
        first, again = _weights(root / "models" / name), _weights(tmp_path / "again" / name)
        assert first.keys() == again.keys()
        assert all(torch.equal(first[k], again[k]) for k in first), name
        other = _weights(tmp_path / "other" / name)
        assert any(not torch.equal(first[k], other[k]) for k in first), name


def test_data_files(made):
    root, info = made
    rows = {}
    for skill in ("add", "rev"):
        for split in ("train", "test"):
            path = root / "data" / f"{skill}_{split}.jsonl"
            assert Path(info["data"][f"{skill}_{split}"]) == path
            lines = [json.loads(line) for line in path.read_text().splitlines()]
            assert len(lines) == 200 and all(set(r) == {"prompt", "answer"} for r in lines)
            rows[skill, split] = lines
        train = {r["prompt"] for r in rows[skill, "train"]}
        test = {r["prompt"] for r in rows[skill, "test"]}
        assert len(train) == 200 and len(test) == 200 and not train & test
    for r in rows["add", "test"]:
        a, b = r["prompt"][:-1].split("+")
        assert int(a) + int(b) == int(r["answer"])
    for r in rows["rev", "test"]:
        assert r["prompt"] == f"rev:{r['answer'][::-1]}="


def test_data_is_idempotent_and_matches_the_repo(made):
    root, _ = made
    before = {p.name: p.stat().st_mtime_ns for p in (root / "data").glob("*.jsonl")}
    skills.write_data(root / "data")
    assert {p.name: p.stat().st_mtime_ns for p in (root / "data").glob("*.jsonl")} == before
    shipped = REPO / "fitness" / "data"
    for name in before:
        if (shipped / name).is_file():  # the committed copies are what the generator writes
            assert (shipped / name).read_text() == (root / "data" / name).read_text(), name


def test_training_streams_avoid_reserved_questions():
    reserved = skills.reserved_prompts()
    assert len(reserved) == 800
    makers = [skills.SKILLS["add"], skills.SKILLS["rev"], skills.sum_words, skills.flip]
    for i, make in enumerate(makers):
        gen = skills.stream(make, random.Random(i), reserved)
        for _ in range(3000):
            prompt, _ = next(gen)
            assert skills.canonical(prompt) not in reserved
    assert skills.canonical("sum:47,85=") == "47+85=" and skills.canonical("flip:abc=") == "rev:abc="


def test_cli_entry_point(tmp_path, capsys):
    assert main([str(tmp_path / "m"), "--scale", "test", "--data-dir", str(tmp_path / "d"), "--no-eval"]) == 0
    assert all((tmp_path / "m" / n / "config.json").is_file() for n in MODEL_NAMES)
    assert "trained in" in capsys.readouterr().out


def test_mounts_as_a_subcommand():
    """`evomerge fixtures tiny-lm ...` reuses add_arguments/run; parsing alone must work there."""
    import argparse

    from evomerge.fixtures import tiny_lm

    parser = argparse.ArgumentParser(prog="evomerge")
    fixtures = parser.add_subparsers(dest="command").add_parser("fixtures").add_subparsers(dest="fixture")
    tiny_lm.add_arguments(fixtures.add_parser("tiny-lm")).set_defaults(func=tiny_lm.run)
    args = parser.parse_args(["fixtures", "tiny-lm", "--scale", "test", "--seed", "3"])
    assert (args.func, args.out, args.scale, args.seed, args.no_eval) == (tiny_lm.run, "models/tiny-lm", "test", 3, False)
