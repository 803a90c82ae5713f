"""Dataset loader for the tiny-LM skill tasks: `dataset_path: json` files resolved from this folder.

lm-eval hands `data_files` to `datasets.load_dataset`, which reads a relative path against the
working directory. `load` resolves each relative file against `data_dir` (the `--metadata` /
TaskManager metadata key, e.g. a folder made by `evomerge fixtures tiny-lm`), else against
`fitness/data/` next to this folder, so `--include_path fitness/lm_eval_tasks` works from any
directory and needs no download.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data"


def _resolve(name: str, data_dir: str | None) -> str:
    path = Path(name).expanduser()
    if path.is_absolute():
        return str(path)
    base = Path(data_dir).expanduser() if data_dir else DEFAULT_DATA
    found = base / path
    if not found.is_file():
        raise FileNotFoundError(f"tiny-LM task data {name!r} not found in {base} (set metadata data_dir)")
    return str(found.resolve())


def load(data_files: dict[str, str], data_dir: str | None = None, dataset_path: str = "json", **_):
    import datasets

    files = {split: _resolve(name, data_dir) for split, name in data_files.items()}
    return datasets.load_dataset(dataset_path, data_files=files)
