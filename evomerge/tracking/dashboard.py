"""Serve optuna-dashboard for a run's storage, on loopback unless the user asks otherwise."""

from __future__ import annotations

import json
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.tracking.storage import JOURNAL_NAME, open_storage


def run_storage_url(run_dir: Path) -> str:
    """The storage a run recorded into: from its summary/config, else the default journal."""
    for name in ("summary.json",):
        path = run_dir / name
        if path.is_file():
            return json.loads(path.read_text())["storage"]
    config_path = run_dir / "config.json"
    if config_path.is_file():
        configured = json.loads(config_path.read_text()).get("optuna", {}).get("storage")
        if configured:
            return configured
    journal = run_dir / JOURNAL_NAME
    if journal.is_file():
        return str(journal)
    raise EvomergeError(f"{run_dir} holds no Optuna storage (no {JOURNAL_NAME}, summary.json or config.json); "
                        "give the run folder a search wrote")


def serve(run_dir: Path, host: str = "127.0.0.1", port: int = 8080) -> None:
    from optuna_dashboard import run_server

    from evomerge.tracking.plots import ARTIFACT_DIR_NAME, artifact_store

    url = run_storage_url(run_dir)
    print(f"optuna-dashboard for {url} on http://{host}:{port}/ (Ctrl-C to stop)")
    run_server(open_storage(url), host=host, port=port, artifact_store=artifact_store(run_dir / ARTIFACT_DIR_NAME))
