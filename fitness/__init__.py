"""Built-in fitness tasks; importing the package registers them in `evomerge.tasks.TASKS`."""

from fitness import digits, lm_tasks, synthetic  # noqa: F401
