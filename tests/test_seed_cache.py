"""The seeds are read once per search: the finite check and the prefix Gram are remembered by fingerprint."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.config import config_from_dict
from evomerge.engine import seed_cache
from evomerge.engine.basis_spec import checkpoint_basis
from evomerge.engine.search import SearchOptions, resume_search, run_search
from evomerge.fixtures.tiny_lm import make_tiny_lm
from evomerge.genomes.basis import Basis
from evomerge.models import CheckpointError
from evomerge.models import seeds as seeds_module
from fitness import lm_binding


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("seedcache")
    return make_tiny_lm(root / "models", scale="test", seed=0, data_dir=root / "data")


def _paths(tiny) -> list[str]:
    return [tiny["models"]["expert_add"], tiny["models"]["expert_rev"]]


def _count(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_the_finite_check_runs_once_per_seed_files(tiny, tmp_path, monkeypatch):
    checks = _count(monkeypatch, seeds_module, "assert_finite")
    paths = _paths(tiny)
    assert seed_cache.check_seeds_once(paths, tmp_path) is True and len(checks) == 2
    assert seed_cache.check_seeds_once(paths, tmp_path) is False and len(checks) == 2
    # A seed replaced in place (new bytes, new mtime) is checked again.
    copy = tmp_path / "copy"
    shutil.copytree(paths[1], copy)
    paths2 = [paths[0], str(copy)]
    assert seed_cache.check_seeds_once(paths2, tmp_path) is True
    assert seed_cache.check_seeds_once(paths2, tmp_path) is False
    weights = next(copy.glob("*.safetensors"))
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert seed_cache.check_seeds_once(paths2, tmp_path) is True


def test_a_non_finite_seed_is_refused_and_not_remembered(tiny, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny["models"]["expert_rev"], bad)
    weights = next(bad.glob("*.safetensors"))
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="not finite"):
        seed_cache.check_seeds_once([tiny["models"]["expert_add"], str(bad)], run)
    assert not (run / seed_cache.FINITE_RECORD).exists()


def test_the_prefix_gram_is_cached_and_read_back_bit_for_bit(tiny, tmp_path, monkeypatch):
    paths = _paths(tiny)
    basis = checkpoint_basis(paths, check_finite=False)
    computed = _count(monkeypatch, Basis, "prefix_gram")
    gram, fresh = seed_cache.cached_prefix_gram(basis, paths, 512, tmp_path)
    assert fresh and len(computed) == 1
    again, fresh = seed_cache.cached_prefix_gram(basis, paths, 512, tmp_path)
    assert not fresh and len(computed) == 1
    np.testing.assert_array_equal(gram.grid, again.grid)
    np.testing.assert_array_equal(gram.prefix, again.prefix)
    # Another grid is another key; a corrupt cache is recomputed, never trusted.
    other, fresh = seed_cache.cached_prefix_gram(basis, paths, 256, tmp_path)
    assert fresh and other.grid.size != gram.grid.size
    (tmp_path / seed_cache.GRAM_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    rebuilt, fresh = seed_cache.cached_prefix_gram(basis, paths, 512, tmp_path)
    assert fresh
    np.testing.assert_array_equal(rebuilt.prefix, gram.prefix)


def test_a_resumed_search_reads_the_cached_gram_and_checks_nothing_again(ray_session, tiny, tmp_path, monkeypatch):
    options = {"data": [tiny["data"]["add_train"], tiny["data"]["rev_train"]], "limit": 8,
               "max_new_tokens": 6, "batch_size": 16}  # no `model`: the first seed gives the architecture
    spec = {
        "name": "cache", "seed": 0, "seeds": _paths(tiny),
        "fitness": {"task": "lm_exact_match", "options": options},
        "strategy": {"name": "m2n2", "options": {"mutation_sigma": 0.0}},
        "budget": {"evaluations": 12}, "workers": {"count": 1, "batch": 1}, "sync": True,
        "snapshots": {"every": 6},
    }
    out = tmp_path / "run"
    first = run_search(config_from_dict(spec), SearchOptions(out_dir=out, progress=False))
    assert first["failed"] == 0 and (out / seed_cache.GRAM_FILE).is_file()
    straight = run_search(config_from_dict({**spec, "budget": {"evaluations": 16}}),
                          SearchOptions(out_dir=tmp_path / "straight", progress=False))

    grams = _count(monkeypatch, Basis, "prefix_gram")
    checks = _count(monkeypatch, seeds_module, "assert_finite")
    builds = lm_binding.SKELETON_BUILDS
    more = resume_search(out, SearchOptions(out_dir=out, progress=False), budget=16)
    assert more["evaluations"] == 16 and more["failed"] == 0
    assert grams == [] and checks == []  # in the driver: nothing recomputed
    assert lm_binding.SKELETON_BUILDS == builds  # and the driver built no model, exporting included
    assert more["best"]["train_score"] == straight["best"]["train_score"]
    assert more["best"]["member_id"] == straight["best"]["member_id"]


def test_workers_start_during_the_seed_check_and_die_with_a_failed_one(ray_session, tiny, tmp_path, monkeypatch):
    """The workers start while the driver checks the seeds (no data merges to wait for); a seed
    that fails the check stops the search with its error and kills the workers already started."""
    import ray

    from evomerge.engine import search as search_module

    bad = tmp_path / "bad"
    shutil.copytree(tiny["models"]["expert_rev"], bad)
    weights = next(bad.glob("*.safetensors"))
    tensors = load_file(str(weights))
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("inf")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    started = []
    real_start, real_check = search_module.start_workers, search_module.prepare_seeds
    order = []

    def start(config, seeds_checked=False):
        order.append(("workers", seeds_checked))
        started.extend(real_start(config, seeds_checked))
        return started

    def check(config, run_dir):
        order.append(("check", None))
        return real_check(config, run_dir)

    monkeypatch.setattr(search_module, "start_workers", start)
    monkeypatch.setattr(search_module, "prepare_seeds", check)
    spec = {"name": "bad", "seed": 0, "seeds": [tiny["models"]["expert_add"], str(bad)],
            "fitness": {"task": "lm_exact_match", "options": {"data": [tiny["data"]["add_train"]], "limit": 4}},
            "strategy": {"name": "m2n2", "options": {}}, "budget": {"evaluations": 4},
            "workers": {"count": 2, "batch": 1}, "sync": True}
    with pytest.raises(CheckpointError, match="not finite"):
        run_search(config_from_dict(spec), SearchOptions(out_dir=tmp_path / "run", progress=False))
    assert order == [("workers", True), ("check", None)] and len(started) == 2
    for worker in started:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(worker.pid.remote(), timeout=60)


def _bf16_pieces_basis():
    from evomerge.genomes.basis import Basis, Piece

    rng = np.random.default_rng(7)
    seeds = [torch.from_numpy(rng.normal(size=1000).astype(np.float32)).to(torch.bfloat16) for _ in range(3)]
    cuts = [0, 130, 611, 1000]  # three pieces, as three tensors of a checkpoint
    return Basis([Piece(a, b, [s[a:b] for s in seeds]) for a, b in zip(cuts, cuts[1:])], 1000, 3), seeds


def test_prefix_gram_on_a_device_agrees_with_the_host_path():
    """The device path (here run with the CPU as the device) gives the host path's numbers to
    float64 rounding, and the first prefix entry past a piece start is that piece's own Gram."""
    basis, seeds = _bf16_pieces_basis()
    host = basis.prefix_gram(max_boundaries=16)
    dev = basis.prefix_gram(max_boundaries=16, device="cpu")
    np.testing.assert_array_equal(dev.grid, host.grid)
    np.testing.assert_allclose(dev.prefix, host.prefix, rtol=1e-12, atol=1e-9)
    full = torch.stack([s.double() for s in seeds])
    np.testing.assert_allclose(dev.prefix[-1], (full @ full.T).numpy(), rtol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prefix_gram_on_cuda_agrees_with_the_host_path():
    basis, _ = _bf16_pieces_basis()
    np.testing.assert_allclose(basis.prefix_gram(16, device="cuda").prefix, basis.prefix_gram(16).prefix,
                               rtol=1e-12, atol=1e-9)


def test_gram_device_is_the_host_without_gpu_workers(tmp_path):
    from types import SimpleNamespace

    from evomerge.engine.seed_cache import gram_device

    assert gram_device(SimpleNamespace(workers=SimpleNamespace(num_gpus=0))) is None
    expected = "cuda" if torch.cuda.is_available() else None
    assert gram_device(SimpleNamespace(workers=SimpleNamespace(num_gpus=1))) == expected
