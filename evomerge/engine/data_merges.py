"""Data-based merges (fisher, regmean) named in a search, computed once by the driver.

They need each seed's statistics on its own examples: the diagonal Fisher, or every linear
layer's input Gram. Only the driver computes those, before any worker starts: for each such
spec in `strategy.options.merges` (static baselines) or `seed_with` (M2N2 archive members) it
runs `evomerge merge`'s pipeline (`merge_plan`) once into `RUN_DIR/merges/KEY/`, and the actors
get a copy of the config whose spec names that folder (`MergeSpec.merged`); they read it back
by tensor name (`MergedFolder`). The user's config, config.json and the snapshots never hold it.

KEY hashes the seeds' fingerprints (files, sizes, mtimes, headers), the spec and the data
files' contents, so a resume reuses a finished folder (its marker file is written last) and a
folder a crash left half-written, or one for other seeds or data, is merged again.

The data: `data:` in the spec (one prompt/answer JSONL per seed), else the LM fitness task's
own `fitness.options.data`, each seed on its own file: one file per seed in seed order, or a
single file shared by all.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from evomerge.config import SearchConfig
from evomerge.errors import ConfigError
from evomerge.merging.mergekit_config import MergePlan, plan_from_dict
from evomerge.engine.seed_cache import _write_atomic
from evomerge.merging.run import merge_plan

MERGES_DIR = "merges"
MARKER = "evomerge-merge.json"  # written last: a folder without it is unfinished
SPEC_FIELDS = ("merges", "seed_with")


def data_specs(config: SearchConfig) -> list[tuple[str, int, dict[str, Any]]]:
    """(FIELD, j, the raw spec) for every data-based merge in `strategy.options.FIELD[j]`."""
    from evomerge.genomes.layerwise import DATA_METHODS

    options = config.strategy.options or {}
    return [(field, j, raw) for field in SPEC_FIELDS for j, raw in enumerate(options.get(field) or [])
            if isinstance(raw, dict) and raw.get("method") in DATA_METHODS]


def prepare_data_merges(config: SearchConfig, run_dir: Path | None, merges_dir: Path | None = None) -> SearchConfig:
    """The config the actors get: `config` itself when it names no data-based merge, else a copy
    whose data-based specs name their merged folders (computed here unless already finished).
    `merges_dir` (default RUN_DIR/merges) may be shared by several runs: `evomerge compare`
    merges each spec once for all its strategies and seeds, as the key says when one is reusable."""
    found = data_specs(config)
    if not found:
        return config
    field, j, raw = found[0]
    where = f"strategy.options.{field}.{j}"
    if not isinstance(config.seeds, list) or not config.seeds:
        raise ConfigError(f"{where}: {raw['method']} merges checkpoints with each seed's own LM "
                          "examples; it needs `seeds:` to list checkpoint folders (in-memory seeds have no "
                          "tensor names and no LM data); use a method without data, or checkpoint seeds")
    if run_dir is None and merges_dir is None:
        raise ConfigError(f"{where}: a data-based merge is written to the run folder before the search; "
                          "pass run_dir= to run_local (evomerge search uses its --out folder)")
    from evomerge.engine.seed_cache import seed_fingerprint

    fingerprint = seed_fingerprint(list(config.seeds), config.allow_pickle)
    options = copy.deepcopy(config.strategy.options)
    for field, j, raw in found:
        root = Path(merges_dir) if merges_dir is not None else Path(run_dir) / MERGES_DIR
        folder = merged_folder(config, raw, f"strategy.options.{field}.{j}", root, fingerprint)
        options[field][j] = {**raw, "merged": str(folder)}
    strategy = config.strategy.model_copy(update={"options": options})
    return config.model_copy(update={"strategy": strategy})


def merged_folder(config: SearchConfig, raw: dict[str, Any], where: str, root: Path, fingerprint: str) -> Path:
    """The finished folder of one data-based spec: reused when its marker matches, else merged."""
    from evomerge.strategies.merge_specs import MergeSpec

    if raw.get("merged") is not None:
        raise ConfigError(f"{where}.merged: set by the search itself (the folder it merges into); remove it")
    try:
        spec = MergeSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{where}: {problems}") from None
    data = spec_data(spec, config, where)
    plan = spec_plan(spec, list(config.seeds), data, where)
    key = merge_key(fingerprint, spec, data)
    folder = (root / key).resolve()
    marker = folder / MARKER
    label = spec.label()
    if _marker_key(marker) == key:
        print(f"{where}: {label} reused from {folder}", file=sys.stderr)
        return folder
    if folder.exists():  # a crash left it half-written, or it is not ours: merged again
        shutil.rmtree(folder)
    print(f"{where}: {label}: each seed's {plan.method.data_kind} statistics on its own data, then the merge, "
          f"into {folder} (once; reused while seeds, spec and data are unchanged)", file=sys.stderr)
    merge_plan(plan, folder, allow_pickle=config.allow_pickle)
    record = {"key": key, "label": label, "seeds": list(config.seeds), "data": [str(p) for p in data]}
    _write_atomic(marker, (json.dumps(record, indent=2) + "\n").encode())
    return folder


def spec_data(spec: Any, config: SearchConfig, where: str) -> list[Path]:
    """One data file per seed, resolved: the spec's own `data`, else the fitness task's."""
    from fitness.lm_data import resolve

    k = len(config.seeds)
    if spec.data is not None:
        files, field = list(spec.data), f"{where}.data"
        if len(files) != k:
            raise ConfigError(f"{field}: {spec.method} needs one data file per seed ({k}), got {len(files)}")
    else:
        fitness = (config.fitness.options or {}).get("data")
        if not (isinstance(fitness, list) and fitness and all(isinstance(f, str) for f in fitness)):
            raise ConfigError(f"{where}.data: {spec.method} needs each seed's own examples (prompt/answer JSONL, "
                              f"as the LM tasks read), and fitness task {config.fitness.task!r} has no "
                              "`fitness.options.data` to take them from; add `data: [one file per seed]`")
        if len(fitness) not in (1, k):
            raise ConfigError(f"{where}.data: {spec.method} pairs each seed with its own file, but "
                              f"fitness.options.data lists {len(fitness)} files for {k} seeds; add "
                              "`data: [one file per seed]` to the merge")
        files, field = (fitness if len(fitness) == k else fitness * k), "fitness.options.data"
    out = []
    for i, name in enumerate(files):
        try:
            out.append(resolve(name))
        except FileNotFoundError as exc:
            index = i if spec.data is not None else i % len(config.fitness.options["data"])
            raise ConfigError(f"{field}.{index}: {exc}") from None
    return out


def spec_plan(spec: Any, seeds: list[str], data: list[Path], where: str) -> MergePlan:
    """The `evomerge merge` plan of a spec over the seeds: the YAML a user would write for it."""
    from evomerge.devices import DTYPES, majority_dtype
    from evomerge.engine.basis_spec import seeds_layout
    from evomerge.merging import MERGE_METHODS

    method = MERGE_METHODS.get(spec.method)
    settings = dict(spec.parameters)
    models: list[dict[str, Any]] = [{"model": seed} for seed in seeds]
    if "weight" in method.model_params.model_fields:
        weight = settings.pop("weight", 1.0)
        for entry, w in zip(models, spec.weights if spec.weights is not None else [weight] * len(seeds)):
            entry["parameters"] = {"weight": float(w)}
    layout = seeds_layout(seeds)
    dtype = majority_dtype((t.numel, t.dtype) for t in layout.tensors)  # written as the seeds are stored
    name = next((n for n, d in DTYPES.items() if d == dtype), "float32")
    return plan_from_dict({"merge_method": spec.method, "models": models, "parameters": settings,
                           "data": [str(p) for p in data], "dtype": name}, source=where)


def merge_key(fingerprint: str, spec: Any, data: list[Path]) -> str:
    """sha256 (first 16 hex digits) of the seeds' fingerprint, the spec and the data's bytes."""
    digest = hashlib.sha256()
    spec_json = spec.model_dump(mode="json", exclude={"merged"})
    digest.update(json.dumps({"seeds": fingerprint, "spec": spec_json}, sort_keys=True).encode())
    for path in data:
        digest.update(hashlib.sha256(path.read_bytes()).hexdigest().encode())
    return digest.hexdigest()[:16]


def _marker_key(marker: Path) -> str | None:
    try:
        return json.loads(marker.read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None
