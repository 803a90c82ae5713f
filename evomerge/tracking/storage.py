"""Where a run's Optuna study lives.

The journal file is the default because it keeps up with a search that evaluates 100+
candidates per second; SQLite manages a few dozen trials per second on this class of machine.
"""

from __future__ import annotations

import os
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


def repair_journal_tail(url: str) -> int:
    """Drop a journal file's unfinished last line; returns the bytes dropped.

    The recorder appends each batch in one write, so `kill -9` can leave at most the tail of one
    batch without its newline. Optuna skips such a line when reading, but a line appended after
    it would be glued to it and make the journal unreadable: a resume cuts it off first (the
    trials it held were never complete, and are replayed or evaluated again like any other).
    """
    if "://" in url or not Path(url).is_file():
        return 0
    with open(url, "rb+") as f:
        size = f.seek(0, 2)
        if size == 0:
            return 0
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return 0
        keep, step = 0, 1 << 16
        position = size
        while position > 0:  # find the last newline, reading backwards
            start = max(0, position - step)
            f.seek(start)
            chunk = f.read(position - start)
            index = chunk.rfind(b"\n")
            if index >= 0:
                keep = start + index + 1
                break
            position = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep
