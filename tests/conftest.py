"""Shared fixtures: one small local Ray for the whole session (2 CPUs, no dashboard)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).parent
REPO = TESTS_DIR.parent
sys.path.insert(0, str(TESTS_DIR))  # so Ray workers can import test-only fitness tasks too
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from evomerge.engine.raysession import quiet_token_auth_notice

    quiet_token_auth_notice()
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 * 1024,
                 logging_level="WARNING", runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(REPO)])}})
    yield ray
    ray.shutdown()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def digits_config(name: str = "t", **overrides):
    """A small, fast digits search definition for tests."""
    from evomerge.config import config_from_dict

    data = {
        "name": name,
        "seed": 0,
        "fitness": {"task": "digits", "options": {"train_size": 300}},
        "strategy": {"name": "m2n2"},
        "budget": {"evaluations": 120},
        "workers": {"count": 2, "batch": 2},
    }
    for key, value in overrides.items():
        node = data
        parts = key.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return config_from_dict(data)


def save_tiny_llamas(root: Path, num_layers: int, seeds: tuple[int, ...] = (0, 1)) -> list[Path]:
    """Random tiny Llama folders (fixture tokenizer, untied head), one per torch seed: models a
    data-based merge can run on in a second."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.fixtures.tiny_lm import make_tokenizer

    tokenizer = make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=num_layers,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(root / f"m{seed}")
        tokenizer.save_pretrained(root / f"m{seed}")
        out.append(root / f"m{seed}")
    return out


# Engine tests that each take 20 s or more of wall time on 2 cores and whose behaviour another
# default test covers too (the other dispatch mode, a shorter kill, the same path on another
# storage). They are `slow` so that CI's `make test` stays within its time budget; `make
# test-slow` runs them. Measured with `pytest --durations=40` on a 2-core machine.
SLOW_ENGINE_TESTS = {
    "tests/test_timeouts.py::test_a_worker_stuck_out_of_the_alarms_reach_is_restarted[sync]",
    "tests/test_faults.py::test_child_that_keeps_killing_its_worker_is_marked_failed",
    "tests/test_resume.py::test_ctrl_c_snapshots_and_exits_130",
    "tests/test_engine.py::test_sync_mode_is_reproducible",
    "tests/test_tiny_lm_search.py::test_dam_guided_search_over_checkpoints_adds_a_basis_element",
    "tests/test_compare.py::test_compare_writes_all_three_files",
    "tests/test_seed_cache.py::test_a_resumed_search_reads_the_cached_gram_and_checks_nothing_again",
    "tests/test_engine.py::test_a_dam_search_ends_when_its_trained_merge_is_back[sync]",
    "tests/test_multi_objective.py::test_resume_continues_the_multi_objective_study[sqlite]",
    "tests/test_offspring.py::test_a_search_is_the_same_whoever_breeds",
    "tests/test_engine.py::test_run_folder_is_not_silently_overwritten",
    "tests/test_test_every.py::test_resuming_a_run_written_before_test_every_needs_no_force",
    "tests/test_lm_eval_task.py::test_unknown_task_and_unbounded_metric_are_refused",
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.nodeid in SLOW_ENGINE_TESTS:
            item.add_marker(pytest.mark.slow)
