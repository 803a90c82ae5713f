"""The one error type of checkpoint I/O, so the CLI can print a bad seed as a plain message."""

from __future__ import annotations

from evomerge.errors import EvomergeError


class CheckpointError(EvomergeError):
    """A checkpoint cannot be opened, does not match the other seeds, or cannot be saved.

    The message names the file or tensor at fault and what to do about it, because a seed
    problem found late (on a worker, mid-search) is far more expensive than one found at start.
    """
