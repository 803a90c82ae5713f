"""Built-in fitness tasks; importing the package registers them in `evomerge.tasks.TASKS`."""

from fitness import digits, synthetic  # noqa: F401
