"""Built-in fitness tasks; importing the package registers them in `evomerge.tasks.TASKS`.

`lm_eval_task` imports lm-evaluation-harness only when an `lm_eval` task is built (optional extra).
"""

from fitness import digits, lm_eval_task, lm_tasks, synthetic  # noqa: F401
