"""Plain-text tables for the terminal (no extra dependency for a few aligned columns)."""

from __future__ import annotations

from typing import Any, Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([line, rule, *body])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def summary_table(summary: dict[str, Any]) -> str:
    best = summary.get("best") or {}
    rows = [
        ("search", summary["name"]),
        ("strategy", summary["strategy"]),
        ("evaluations", evaluations_cell(summary["evaluations"], summary.get("budget"), summary.get("finished_early"))),
        ("failed", summary["failed"]),
        ("best member", best.get("member_id")),
        ("best train score", best.get("train_score")),
        ("best test score", held_out_cell(best.get("test_score"), bool(best))),
        *group_rows(best.get("train_scores"), best.get("test_scores")),
        ("held-out tests", held_out_tests_cell(summary.get("held_out"), (summary.get("held_out") or {}).get("test_every"))),
        ("wall seconds", summary["wall_seconds"]),
        ("evaluations / s", summary.get("evals_per_second")),
        ("optuna storage", summary["storage"]),
    ]
    return format_table(("", "value"), rows)


def group_rows(train: dict[str, float] | None, test: dict[str, float] | None) -> list[tuple[str, str]]:
    """One row per group (skill) of a task with groups: the best member's train / test score."""
    if not train:
        return []
    test = test or {}
    return [(f"  {name}: train / test", f"{_cell(score)} / {_cell(test.get(name))}") for name, score in train.items()]


def held_out_cell(score: float | None, has_best: bool) -> Any:
    """A best member's held-out score; "not measured" when it has none (with `fitness.test_every:
    best` a member is tested only when it becomes the best; some tasks have no test set)."""
    return "not measured" if score is None and has_best else score


def held_out_tests_cell(counts: dict[str, Any] | None, test_every: str | None) -> str | None:
    """How many members have a held-out score, and which ones `fitness.test_every` asked for."""
    if counts is None:
        return None
    failed = f", {counts['failed']} failed" if counts.get("failed") else ""
    return f"{counts['measured']} measured{failed} (test_every: {test_every or 'best'})"


def evaluations_cell(evaluations: int, budget: int | None, finished_early: bool | None = False) -> str:
    """"N / budget", and why a finished search stopped short of its budget."""
    cell = f"{evaluations}" + (f" / {budget}" if budget else "")
    return cell + (" (strategy finished)" if finished_early else "")
