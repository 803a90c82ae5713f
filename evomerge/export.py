"""`evomerge export`: turn a run's best member into the checkpoint its fitness task knows how to load."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.numpy import load_file

from evomerge.errors import EvomergeError
from evomerge.tasks import build_task


def export_best(run_dir: Path, out_dir: Path) -> list[Path]:
    best_path, config_path = run_dir / "best.safetensors", run_dir / "config.json"
    for path in (best_path, config_path):
        if not path.is_file():
            raise EvomergeError(f"{path} not found: export needs a finished run folder "
                                f"(finish or resume the search first)")
    try:
        params = load_file(str(best_path))["params"]
    except (SafetensorError, KeyError, OSError) as exc:
        raise EvomergeError(f"{best_path} is unreadable ({exc}); re-run `evomerge resume {run_dir}` to rewrite it")
    config = json.loads(config_path.read_text())
    task = build_task(config["fitness"]["task"], config["fitness"].get("options", {}), seed=config.get("seed", 0))
    written = task.export(params, out_dir)
    meta = {"source_run": str(run_dir), **json.loads((run_dir / "best.json").read_text())}
    (out_dir / "evomerge.json").write_text(json.dumps(meta, indent=2))
    return [*written, out_dir / "evomerge.json"]
