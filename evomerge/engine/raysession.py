"""Starting or joining Ray: embedded on a laptop by default, `address` joins a cluster."""

from __future__ import annotations

import logging
import os

import ray

from evomerge.config import SearchConfig
from evomerge.errors import ConfigError


class _DropTokenAuthNotice(logging.Filter):
    """Ray announces on every start that token authentication is on and how to turn it off. It
    stays on (the safe default); the notice only repeated itself in every search's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def quiet_token_auth_notice() -> None:
    token_logger = logging.getLogger(TOKEN_AUTH_LOGGER)
    if not any(isinstance(f, _DropTokenAuthNotice) for f in token_logger.filters):
        token_logger.addFilter(_DropTokenAuthNotice())


def connect(config: SearchConfig, address: str | None = None) -> bool:
    """Make sure Ray is up; returns True when this call started it (so the caller shuts it down)."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    quiet_token_auth_notice()
    address = address or config.ray.address
    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        else:
            ray.init(
                num_cpus=config.ray.num_cpus or os.cpu_count() or 1,
                include_dashboard=False,
                object_store_memory=config.ray.object_store_memory_mb * 1024 * 1024,
                logging_level=logging.WARNING,
            )
        started = True
    _check_capacity(config, embedded=not address)
    return started


def _check_capacity(config: SearchConfig, embedded: bool) -> None:
    """Workers that can never be scheduled would hang the search silently: refuse up front."""
    spec = config.workers
    resources = ray.cluster_resources()
    for name, per_worker, field in (("CPU", spec.num_cpus, "num_cpus"), ("GPU", spec.num_gpus, "num_gpus")):
        need = per_worker * spec.count
        have = resources.get(name, 0.0)
        if need > have + 1e-9:
            where = "this machine's embedded Ray" if embedded else "the Ray cluster"
            fix = "set ray.num_cpus or " if embedded and name == "CPU" else ""
            raise ConfigError(
                f"field `workers.count` x `workers.{field}` asks for {need:g} {name} but {where} has {have:g}; "
                f"{fix}lower workers.count or workers.{field}"
            )
