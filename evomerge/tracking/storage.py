"""Where a run's Optuna study lives.

The journal file is the default because it keeps up with a search that evaluates 100+
candidates per second; SQLite manages a few dozen trials per second on this class of machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage

JOURNAL_NAME = "optuna.journal"


def storage_url(configured: str | None, run_dir: Path) -> str:
    """The storage as a user would pass it to optuna-dashboard: a journal path or a URL."""
    return configured or str(Path(run_dir) / JOURNAL_NAME)


def open_storage(url: str) -> Any:
    if "://" in url:
        if url.startswith("sqlite"):
            # SQLite under concurrent readers (the dashboard) needs a patient lock.
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 30}})
        return optuna.storages.RDBStorage(url)
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(url))
