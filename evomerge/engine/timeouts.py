"""Time limits on fitness evaluations (`workers.timeout_seconds`), at two levels.

- In the worker, an alarm stops an evaluation that runs too long. The child becomes a FAIL, and
  the worker and its other children are untouched. This works for a hang in Python code or in a
  blocking call that lets signal handlers run (sleep, socket and file reads), which covers most
  hangs.
- In the dispatcher, a worker call that outlives its children's limits by `grace` is taken as a
  worker stuck in native code. The worker is killed, Ray restarts it, and its children go out
  again; a child that keeps hanging is recorded as failed. See `Dispatcher`.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType


class EvaluationTimeout(BaseException):
    """Raised into a fitness task by the alarm. A BaseException, so that a task's own
    `except Exception` (a retry loop, say) cannot swallow it and hang on."""


def grace(timeout: float) -> float:
    """How long past its children's limits a worker call may run before the worker counts as
    stuck. Generous: the limits cover the evaluations, not what else a call may do (such as
    materialising a new basis element of a large model)."""
    return max(60.0, timeout)


class Alarm:
    """`with Alarm(seconds):` raises EvaluationTimeout in the block after `seconds`.

    Only in the main thread, where Python delivers signals (a Ray actor's methods run there);
    elsewhere, and with `seconds` None, it does nothing, and the dispatcher's limit remains.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.armed = bool(seconds) and threading.current_thread() is threading.main_thread()
        self._previous: object = None

    def _ring(self, signum: int, frame: FrameType | None) -> None:
        raise EvaluationTimeout(f"the evaluation ran longer than workers.timeout_seconds={self.seconds:g} s")

    def __enter__(self) -> "Alarm":
        if self.armed:
            assert self.seconds is not None
            self._previous = signal.signal(signal.SIGALRM, self._ring)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.armed:
            try:
                signal.setitimer(signal.ITIMER_REAL, 0)
            finally:  # even if the alarm rang just now, in here
                signal.signal(signal.SIGALRM, self._previous)  # type: ignore[arg-type]
