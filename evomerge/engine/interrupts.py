"""Ctrl-C and SIGTERM: the first asks for a snapshot and a clean exit, the second exits at once."""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import Any

EXIT_INTERRUPTED = 130


class Interrupted(Exception):
    """Raised by the driver after it has written the interrupt snapshot."""


class InterruptGuard:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "InterruptGuard":
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            print("\nsecond interrupt: exiting now without a snapshot", file=sys.stderr)
            os._exit(EXIT_INTERRUPTED)
        self.requested = True
        print("\ninterrupt: finishing the current step and writing a snapshot "
              "(interrupt again to exit at once)", file=sys.stderr)
