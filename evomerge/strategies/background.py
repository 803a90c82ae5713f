"""One piece of a strategy's own work (DAM's training chunk) on a daemon thread.

The population actor is single-threaded: while a strategy trains inside ask(), no child goes
out, the workers drain their queues, and the driver's next stretch (and so Ctrl-C) waits. On a
thread the dispatch goes on; torch releases the GIL in its kernels. A daemon thread, because a
search that ends or is killed mid-chunk must not wait for it.
"""

from __future__ import annotations

import threading
from typing import Callable


class BackgroundJob:
    def __init__(self, work: Callable[[], None], name: str) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), name=name, daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as exc:  # handed to the owner's thread by `result`
            self._error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def result(self) -> None:
        """Wait for the work; raise what it raised, in the caller's thread."""
        self._thread.join()
        if self._error is not None:
            raise self._error
