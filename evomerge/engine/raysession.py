"""Starting or joining Ray: embedded on a laptop by default, `address` joins a cluster."""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path

import ray

from evomerge.config import SearchConfig
from evomerge.errors import ConfigError, EvomergeError


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


TOKEN_SOURCES = "~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"


def token_available() -> bool:
    """A Ray auth token in one of the places Ray reads it from."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    candidates = [Path(path).expanduser()] if path else []
    candidates.append(Path.home() / ".ray" / "auth_token")
    return any(c.is_file() and c.stat().st_size > 0 for c in candidates)


def use_token_if_present() -> bool:
    """Token mode for an explicit `HOST:PORT`, as Ray turns it on for `auto` by itself.

    Ray 2.60 enables token authentication when it starts a cluster (`ray start`), and a driver
    that joins with `address="auto"` picks the token up; one given an explicit address does not,
    and fails with `InvalidAuthToken`. An explicit RAY_AUTH_MODE is left alone."""
    if os.environ.get("RAY_AUTH_MODE") is not None or not token_available():
        return False
    try:  # Ray's own switch: sets RAY_AUTH_MODE and refreshes its cached config
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError:  # an older Ray without token authentication
        return False
    _enable_token_auth()
    return True


def _is_auth_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in ("authtoken", "auth token", "authentication", "unauthenticated"))


def _auth_error(address: str) -> EvomergeError:
    have = "the token found is not the cluster's" if token_available() else f"no token was found ({TOKEN_SOURCES})"
    return EvomergeError(
        f"the Ray cluster at {address} requires token authentication and {have}; copy the head node's "
        "~/.ray/auth_token to this machine (or set RAY_AUTH_TOKEN to it: `ray get-auth-token` on the head "
        "prints it), then run the search again")


def _unreachable_error(address: str, detail: str) -> EvomergeError:
    return EvomergeError(
        f"could not reach a Ray cluster at {address} ({detail}); check that `ray start --head` runs there "
        "(`ray status` on the head), that HOST:PORT is the head's GCS address (port 6379 by default), and "
        "that no firewall blocks the port")


PROBE_SECONDS = 5.0


def probe(address: str, timeout: float = PROBE_SECONDS) -> None:
    """Two cheap checks before `ray.init`, which, given no cluster or a wrong token, logs a retry
    a second for 20-40 s and then raises a bare ConnectionError: a TCP connect to HOST:PORT, then
    one GCS client (it answers a missing or wrong token at once). Raises the error that names the
    fix; returns when both pass (or cannot be made: then ray.init speaks for itself)."""
    match = re.fullmatch(r"\[?([\w.\-:]+?)\]?:(\d+)", address)
    if match is None:
        return
    try:
        socket.create_connection((match.group(1), int(match.group(2))), timeout=timeout).close()
    except OSError as exc:
        raise _unreachable_error(address, exc.strerror or type(exc).__name__) from None
    try:
        from ray._raylet import GcsClient
        from ray.exceptions import AuthenticationError
    except ImportError:  # another Ray
        return
    try:
        GcsClient(address=address, cluster_id=None)
    except AuthenticationError:
        raise _auth_error(address) from None
    except Exception:
        return


def join_cluster(address: str) -> None:
    """`ray.init(address=...)`, with errors that say what to fix instead of a traceback."""
    if address != "auto":
        use_token_if_present()
        probe(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    except Exception as exc:
        _shutdown_quietly()
        if _is_auth_error(exc):
            raise _auth_error(address) from None
        text = str(exc)
        if isinstance(exc, (ConnectionError, TimeoutError)) or "connect" in text.lower():
            raise _unreachable_error(address, f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}") \
                from None
        raise


def _shutdown_quietly() -> None:
    try:
        ray.shutdown()
    except Exception:
        pass


def connect(config: SearchConfig, address: str | None = None) -> bool:
    """Make sure Ray is up; returns True when this call started it (so the caller shuts it down)."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    quiet_token_auth_notice()
    address = address or config.ray.address
    started = False
    if not ray.is_initialized():
        if address:
            join_cluster(address)
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
