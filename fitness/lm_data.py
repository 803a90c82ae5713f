"""Prompt/answer JSONL files and the paths that name them.

Configs are read by the driver and by Ray workers whose working directory need not be the repo,
so a relative path is tried as given, then against the repo root, the `fitness/` package and
`fitness/data/`: `fitness/data/add_train.jsonl`, `data/add_train.jsonl` and `add_train.jsonl`
all find the shipped file from anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

FITNESS_DIR = Path(__file__).resolve().parent
REPO_ROOT = FITNESS_DIR.parent

Example = tuple[str, str]


def candidates(path: str | Path) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_absolute():
        return [p]
    return [p, REPO_ROOT / p, FITNESS_DIR / p, FITNESS_DIR / "data" / p]


def resolve(path: str | Path, *, kind: str = "file") -> Path:
    """The first existing candidate; the error lists every place looked in."""
    tried = candidates(path)
    for p in tried:
        if (p.is_dir() if kind == "dir" else p.is_file()):
            return p.resolve()
    what = "model folder" if kind == "dir" else "data file"
    raise FileNotFoundError(
        f"{what} {str(path)!r} not found; looked in: {', '.join(str(p) for p in tried)}. "
        "Give an absolute path or one relative to the repo root"
        + (" (make the tiny models with `evomerge fixtures tiny-lm`)" if kind == "dir" else ""))


def read_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    """`{"prompt": ..., "answer": ...}` per line; blank lines are skipped, anything else is an error."""
    file = resolve(path)
    rows: list[Example] = []
    with file.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                prompt, answer = obj["prompt"], obj["answer"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{file}:{lineno}: expected {{\"prompt\": ..., \"answer\": ...}}: {exc}") from None
            if not isinstance(prompt, str) or not isinstance(answer, str):
                raise ValueError(f"{file}:{lineno}: prompt and answer must be strings")
            rows.append((prompt, answer))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"{file}: no examples")
    return rows


def read_all(paths: list[str], limit: int | None = None) -> list[Example]:
    """Concatenation in the given order; `limit` applies per file so every file keeps a share."""
    return [row for path in paths for row in read_examples(path, limit)]
