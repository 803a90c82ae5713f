"""Exceptions that carry a message meant for the user, so the CLI can print them without a traceback."""


class EvomergeError(Exception):
    """Base of every error the CLI reports as a plain message."""


class ConfigError(EvomergeError):
    """A search definition is wrong; the message names the field and the fix."""


class FitnessError(EvomergeError):
    """A fitness task failed on a candidate, or returned unusable scores."""


class SnapshotError(EvomergeError):
    """No snapshot could be read or verified."""
