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
import time
from collections import deque
from types import FrameType, TracebackType
from typing import Any, Callable


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


class HangWatch:
    """The dispatcher's side: each worker's calls in flight, in order, and since when the oldest
    has run (a worker runs its calls one at a time, so only the oldest can be stuck).

    A call may run `timeout` seconds per child plus the grace. The worker of a call that runs longer
    is killed (by the dispatcher). The calls queued behind the stuck one died through no fault
    of their own, and the stuck call's children become suspects, which go out alone.
    """

    def __init__(self, workers: int, timeout: float | None, grace_seconds: float | None = None) -> None:
        self.timeout = timeout
        self.grace = grace(timeout) if timeout is not None and grace_seconds is None else grace_seconds
        self.calls: list[deque[tuple[Any, int]]] = [deque() for _ in range(workers)]  # (ref, children)
        self.head_since: dict[int, float] = {}
        self.hung: set[Any] = set()  # calls whose worker was killed for them
        self.queued_behind: set[Any] = set()  # calls that died with a hung one
        self.suspects: set[int] = set()  # member ids: children of a hung call

    def started(self, worker: int, ref: Any, children: int) -> None:
        self.calls[worker].append((ref, children))
        if len(self.calls[worker]) == 1:
            self.head_since[worker] = time.monotonic()

    def finished(self, worker: int, ref: Any) -> None:
        """A call came back or failed; the worker's next call starts now."""
        calls = self.calls[worker]
        calls.remove(next(c for c in calls if c[0] is ref))
        if calls:
            self.head_since[worker] = time.monotonic()
        else:
            self.head_since.pop(worker, None)

    def _overdue_in(self, worker: int, now: float) -> float | None:
        ref, children = self.calls[worker][0]
        if self.timeout is None or self.grace is None or ref in self.hung:
            return None
        return self.head_since[worker] + self.timeout * children + self.grace - now

    def until_hang(self) -> float | None:
        """Seconds until the first call outlives its limit; None without a limit."""
        if self.timeout is None:
            return None
        now = time.monotonic()
        waits = [w for w in (self._overdue_in(worker, now) for worker in self.head_since) if w is not None]
        return min(waits) if waits else None

    def overdue(self, done: Callable[[Any], bool] | None = None) -> list[int]:
        """Workers whose oldest call has outlived its limit, each marked killed: its caller kills it.

        `done(ref)`: whether a call is in fact back (not yet taken); such a call is not stuck."""
        if self.timeout is None:
            return []
        now = time.monotonic()
        lefts = {worker: self._overdue_in(worker, now) for worker in self.head_since}
        stuck = [worker for worker, left in lefts.items() if left is not None and left < 0
                 and not (done is not None and done(self.calls[worker][0][0]))]
        for worker in stuck:
            self._killed(worker)
        return stuck

    def _killed(self, worker: int) -> None:
        refs = [ref for ref, _ in self.calls[worker]]
        self.hung.add(refs[0])
        self.queued_behind.update(refs[1:])

    def verdict(self, ref: Any) -> tuple[bool, bool]:
        """For a call that failed: (its worker was killed for it, it died behind a hung call)."""
        hung, behind = ref in self.hung, ref in self.queued_behind
        self.hung.discard(ref)
        self.queued_behind.discard(ref)
        return hung, behind
