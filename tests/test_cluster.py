"""Joining a separate Ray cluster with `evomerge search --address`, and the cluster-launcher file.

The cluster is a `ray start --head --block` subprocess with its own temp dir and its own token
(Ray's token authentication is on by default for `ray start`). The search runs as another
subprocess, like a user would run it on the head node. `ray stop` is never used: it would stop
every Ray on the machine, the test session's included. The `--block` process is terminated
instead, and anything of its session still alive afterwards is killed by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import REPO, free_port
from evomerge.tracking.storage import open_storage

BIN = Path(sys.executable).parent
CLUSTER_YAML = REPO / "ray_cluster.yaml"
START_TIMEOUT_S = 45


def _session_pids(marker: str) -> list[int]:
    """Pids of live processes whose command line mentions `marker` (the cluster's temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


class _Cluster:
    def __init__(self, address: str, env: dict[str, str], session_root: Path, log: Path) -> None:
        self.address, self.env, self.session_root, self.log = address, env, session_root, log
        self.home: Path | None = None


@contextlib.contextmanager
def _cluster(env_changes: dict[str, str], drop: tuple[str, ...] = ()):
    """A one-node Ray cluster on a free port; torn down (and checked gone) even if the test fails."""
    port = free_port()
    # A short path: Ray's unix sockets live under it and socket paths are limited to ~107 bytes.
    root = Path(tempfile.mkdtemp(prefix="evr-", dir="/tmp"))
    log = root / "ray-start.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *drop)}
    env.update({
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM: stop now, no 30 s drain
        "RAY_USAGE_STATS_ENABLED": "0",
        **env_changes,
    })
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
           "--include-dashboard=false", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
           "--object-store-memory=100000000", f"--temp-dir={root}"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if proc.poll() is not None:
                pytest.fail(f"`ray start` exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"`ray start` not up after {START_TIMEOUT_S} s:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.25)
        yield _Cluster(f"127.0.0.1:{port}", env, root, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        # Workers the raylet started may outlive it for a moment; kill what is left, by pid.
        deadline = time.monotonic() + 10
        while _session_pids(str(root)) and time.monotonic() < deadline:
            time.sleep(0.25)
        for pid in _session_pids(str(root)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def ray_cluster():
    """Token authentication set explicitly, with this cluster's own token (not ~/.ray's)."""
    with _cluster({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}) as cluster:
        yield cluster


AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@pytest.fixture
def default_auth_cluster(tmp_path):
    """`ray start --head` as docs/cluster.md has users run it: a token made once in
    ~/.ray/auth_token (`ray get-auth-token --generate`; HOME is a temp dir here) and no RAY_AUTH_*
    in the environment, so `ray start` turns token authentication on because the token is there."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    with _cluster({"HOME": str(home)}, drop=AUTH_VARS) as cluster:
        cluster.home = home
        yield cluster


def test_search_joins_a_running_cluster(ray_cluster, tmp_path):
    config = {
        "name": "cluster",
        "seed": 0,
        "fitness": {"task": "digits", "options": {"train_size": 300}},
        "strategy": {"name": "m2n2"},
        "budget": {"evaluations": 1000},  # the CLI's --budget overrides it
        "workers": {"count": 2, "num_cpus": 1},
    }
    config_path = tmp_path / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    started = time.monotonic()
    result = subprocess.run(
        [str(BIN / "evomerge"), "search", str(config_path), "--address", ray_cluster.address,
         "--out", str(out), "--quiet", "--budget", "60"],
        env=ray_cluster.env, cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    assert time.monotonic() - started < 60

    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluations"] == summary["budget"] == 60
    assert summary["failed"] == 0
    study = optuna.load_study(study_name=summary["study_name"], storage=open_storage(summary["storage"]))
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 60
    assert [t.number for t in trials] == list(range(60))
    assert (out / "best.safetensors").is_file()

    # The search ran on this cluster, not on a Ray of its own: its driver is in the cluster's logs.
    logs = list(ray_cluster.session_root.glob("session_*/logs/python-core-driver-*.log"))
    assert logs, f"no driver connected to the cluster under {ray_cluster.session_root}"


def _cli_search(cluster: _Cluster, tmp_path: Path, budget: int = 30) -> subprocess.CompletedProcess:
    config = {"name": "joined", "seed": 0, "fitness": {"task": "digits", "options": {"train_size": 200}},
              "budget": {"evaluations": budget}, "workers": {"count": 1, "num_cpus": 1}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    config_path = tmp_path / "joined.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [str(BIN / "evomerge"), "search", str(config_path), "--address", cluster.address,
         "--out", str(tmp_path / "run"), "--quiet"],
        env=cluster.env, cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)


def test_explicit_address_uses_the_token_like_auto(default_auth_cluster, tmp_path):
    cluster = default_auth_cluster
    token = cluster.home / ".ray" / "auth_token"
    assert not any(k in cluster.env for k in AUTH_VARS)
    result = _cli_search(cluster, tmp_path)
    assert result.returncode == 0, f"stderr:\n{result.stderr[-4000:]}"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["evaluations"] == 30

    token.rename(token.with_name("moved_away"))  # the token file moved away: the named fix, no traceback
    result = _cli_search(cluster, tmp_path / "again")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    assert f"the Ray cluster at {cluster.address} requires token authentication" in result.stderr, result.stderr
    assert "~/.ray/auth_token" in result.stderr and "RAY_AUTH_TOKEN" in result.stderr


@pytest.mark.slow
def test_unreachable_address_names_it_without_a_traceback(tmp_path):
    port = free_port()  # nothing listens there
    cluster = _Cluster(f"127.0.0.1:{port}", {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                       tmp_path, tmp_path / "none.log")
    result = _cli_search(cluster, tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    assert f"could not reach a Ray cluster at 127.0.0.1:{port}" in result.stderr, result.stderr[-2000:]
    assert "ray start --head" in result.stderr


# ----------------------------------------------------------------------------- ray_cluster.yaml

def _cluster_file() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_is_a_valid_cloud_launcher_file():
    cfg = _cluster_file()
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type",
                "file_mounts", "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, key
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types
    workers = [name for name in types if name != head]
    assert workers, "no worker node type"
    for name in workers:
        assert types[name]["max_workers"] >= types[name].get("min_workers", 0)
        assert "InstanceType" in types[name]["node_config"]
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cfg["max_workers"]
    assert "gpu-worker:" in CLUSTER_YAML.read_text()  # the commented GPU type

    # Ray's own schema for cluster files, and its checks after filling in the defaults.
    import jsonschema
    import ray

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(prepare_config(cfg))


def test_cluster_yaml_installs_evomerge_and_starts_ray():
    cfg = _cluster_file()
    setup = cfg["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "install" in c and "torch" in c)
    assert "download.pytorch.org/whl/cpu" in setup[torch_at]
    evomerge_at = next(i for i, c in enumerate(setup) if "pip install" in c and "evomerge" in c)
    assert torch_at < evomerge_at, "torch (CPU wheel) must be installed before evomerge"
    # the package comes from the folder file_mounts syncs
    assert any(remote.rstrip("/").endswith("evomerge") and local == "." for remote, local in cfg["file_mounts"].items())

    head = cfg["head_start_ray_commands"]
    assert head[0] == "ray stop"
    start = " ".join(head[1:])
    assert "ray start --head" in start and "--port=6379" in start
    assert "--dashboard-host=127.0.0.1" in start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start
    worker = cfg["worker_start_ray_commands"]
    assert worker[0] == "ray stop"
    assert "ray start --address=$RAY_HEAD_IP:6379" in " ".join(worker[1:])


def _local_block() -> dict:
    text = CLUSTER_YAML.read_text()
    block = text.split("# --- local provider (begin) ---\n", 1)[1].split("# --- local provider (end) ---", 1)[0]
    lines = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in block.splitlines()]
    return yaml.safe_load("\n".join(lines))


def test_cluster_yaml_local_provider_example():
    cfg = _local_block()
    provider = cfg["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and provider["worker_ips"]
    assert "available_node_types" not in cfg and "head_node_type" not in cfg
    assert any("evomerge" in c for c in cfg["setup_commands"])

    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(prepare_config(cfg))  # what `ray up` does with it
    # ... and the reason the example has no node types: the local provider refuses them.
    with pytest.raises(Exception, match="available_node_types is not supported"):
        prepare_config({**cfg, "available_node_types": {"x": {"node_config": {}, "resources": {}}},
                        "head_node_type": "x"})


def test_token_auth_notice_is_dropped_and_other_warnings_are_kept() -> None:
    import logging

    from evomerge.engine.raysession import TOKEN_AUTH_LOGGER, quiet_token_auth_notice

    quiet_token_auth_notice()
    quiet_token_auth_notice()  # idempotent: one filter, however many searches start
    token_logger = logging.getLogger(TOKEN_AUTH_LOGGER)
    assert sum(type(f).__name__ == "_DropTokenAuthNotice" for f in token_logger.filters) == 1
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    token_logger.addHandler(handler)  # Ray's loggers do not propagate to pytest's capture
    try:
        token_logger.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled")
        token_logger.warning("Token authentication is disabled for this Ray cluster. Anyone with access ...")
    finally:
        token_logger.removeHandler(handler)
    messages = [r.getMessage() for r in seen]
    assert messages == ["Token authentication is disabled for this Ray cluster. Anyone with access ..."]
