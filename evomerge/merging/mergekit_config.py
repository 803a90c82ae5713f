"""The `evomerge merge` config: mergekit's YAML field names in, a checked `MergePlan` out.

Only mergekit's `models:` form is supported (no `slices:`). Every mistake becomes a ConfigError
that names the field and lists what is allowed, before any checkpoint is opened.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from evomerge.yamlio import format_validation_error, read_yaml
from evomerge.errors import ConfigError
from evomerge.merging.methods import MERGE_METHODS, MergeMethod, param_names
from evomerge.merging.params import Setting, field_adapter, setting_leaves

Dtype = Literal["float32", "bfloat16", "float16"]
_HEADER = "invalid merge config:"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputModel(_Strict):
    model: str = Field(description="path of a HF model folder or safetensors checkpoint")
    parameters: dict[str, Setting] = Field(default_factory=dict)

    @field_validator("parameters", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value  # mergekit YAML often has `parameters:` left empty


class MergeConfig(_Strict):
    merge_method: str
    base_model: Optional[str] = None
    models: list[InputModel] = Field(min_length=1)
    parameters: dict[str, Setting] = Field(default_factory=dict)
    dtype: Dtype = Field("float32", description="dtype written; the math always runs in float32")
    out_dtype: Optional[Dtype] = Field(None, description="mergekit's name for the written dtype; wins over dtype")
    tokenizer_source: Optional[str] = Field(None, description="model path or 'base'; default base, else first model")
    data: Optional[list[str]] = Field(None, description="fisher/regmean: one prompt/answer JSONL per entry of "
                                      "`models` (the base's entry, if listed, excluded)")

    @field_validator("parameters", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value


@dataclass(frozen=True)
class MergePlan:
    """Which checkpoint plays which role: what `run_merge` needs, nothing YAML-shaped."""

    method: MergeMethod
    base: Optional[Path]  # passed to the operator as `base` (None for linear)
    others: list[Path]  # passed as `tensors`, in order
    model_settings: list[dict[str, Setting]]  # one per entry of `others`
    global_settings: dict[str, Setting]
    config_source: Path  # where config.json comes from
    tokenizer_source: Path
    dtype: Dtype
    data: tuple[Path, ...] = ()  # one per entry of `others` (data methods only)
    align_vocabulary: bool = False  # tokenizer_source given: vocabulary rows follow its tokenizer

    @property
    def paths(self) -> list[Path]:
        """Distinct checkpoints to open, base first."""
        out: list[Path] = []
        for path in ([self.base] if self.base else []) + self.others:
            if path not in out:
                out.append(path)
        return out


def load_merge_config(path: str | Path) -> MergePlan:
    """Read a mergekit-style YAML and check it; relative paths are tried from the CWD, then the YAML's folder."""
    path = Path(path)
    data = read_yaml(path, "merge config (mergekit-style)")
    return plan_from_dict(data, source=str(path), base_dir=path.parent)


def plan_from_dict(data: Any, source: str = "<merge config>", base_dir: Path | None = None) -> MergePlan:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of fields at the top level, got {type(data).__name__}")
    try:
        config = MergeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(exc, source)) from None
    errors: list[str] = []
    method = _check_method(config, errors)
    if method is not None:
        _check_parameters(config, method, errors)
    paths = _resolve_paths(config, base_dir, errors)
    data = _resolve_data(config, method, base_dir, errors) if method is not None else []
    if errors:
        raise ConfigError("\n".join([f"{source}: {_HEADER}"] + [f"  {e}" for e in errors]))
    assert method is not None
    plan = _plan(config, method, paths)
    if method.data_kind is not None and len(data) != len(plan.others):
        raise ConfigError(f"{source}: {_HEADER}\n  field `data`: {method.name} needs one data file per merged "
                          f"model ({len(plan.others)}: {', '.join(p.name for p in plan.others)}), got {len(data)}")
    return dataclasses.replace(plan, data=tuple(data))


def _resolve_data(config: MergeConfig, method: MergeMethod, base_dir: Path | None, errors: list[str]) -> list[Path]:
    """Data files: from the CWD, the config's folder, then the shipped `fitness/data/`."""
    if method.data_kind is None:
        if config.data is not None:
            errors.append(f"field `data`: {method.name} reads no data (only fisher and regmean do); drop it")
        return []
    if not config.data:
        errors.append(f"field `data`: required by {method.name} (each model's own examples, prompt/answer "
                      "JSONL as the LM tasks read) but missing; add one file per model")
        return []
    from fitness.lm_data import resolve

    out = []
    for i, raw in enumerate(config.data):
        found = _existing(raw, base_dir)
        if found is None:
            try:
                found = resolve(raw)
            except FileNotFoundError:
                errors.append(f"field `data.{i}`: data file {raw!r} does not exist")
                continue
        out.append(found)
    return out


def _format(exc: ValidationError, source: str) -> str:
    """The shared formatter, plus the allowed names inside `models[i]`, which it cannot see
    (it does not step over list indices)."""
    lines = [line.replace(": Value error, ", ": ", 1)
             for line in format_validation_error(exc, source, MergeConfig, what="merge config").splitlines()]
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if err["type"] == "extra_forbidden" and len(loc) == 3 and loc[0] == "models":
            for i, line in enumerate(lines):
                if f"`{'.'.join(loc)}`" in line and "allowed here" not in line:
                    lines[i] = f"{line}; allowed here: {', '.join(InputModel.model_fields)}"
    return "\n".join(lines)


def _check_method(config: MergeConfig, errors: list[str]) -> Optional[MergeMethod]:
    if config.merge_method not in MERGE_METHODS:
        errors.append(f"field `merge_method`: unknown merge method {config.merge_method!r}; "
                      f"allowed: {', '.join(MERGE_METHODS.names())}")
        return None
    method = MERGE_METHODS.get(config.merge_method)
    if (method.needs_base or method.pairwise) and config.base_model is None:
        role = "the t=0 end" if method.pairwise else "the model task vectors are taken against"
        errors.append(f"field `base_model`: required by {method.name} ({role}) but missing; add it")
    if method.pairwise:
        names = [m.model for m in config.models]
        others = [n for n in names if n != config.base_model]
        if len(others) != 1 or len(names) > 2:
            errors.append(f"field `models`: slerp merges exactly two models: base_model plus one other "
                          f"(or both listed, base_model being one of them); got {len(names)} listed "
                          f"({', '.join(names)}) and base_model {config.base_model!r}")
    names = [m.model for m in config.models]
    count = len([n for n in names if n != config.base_model]) if method.uses_base else len(names)
    if method.min_tensors > 1 and count < method.min_tensors:
        errors.append(f"field `models`: {method.name} needs at least {method.min_tensors} models besides "
                      f"base_model; got {count} ({', '.join(names)})")
    if method.max_tensors is not None and not method.pairwise and count > method.max_tensors:
        errors.append(f"field `models`: {method.name} merges at most {method.max_tensors} models besides "
                      f"base_model; got {count} ({', '.join(names)})")
    return method


def _check_parameters(config: MergeConfig, method: MergeMethod, errors: list[str]) -> None:
    """Unknown names and out-of-range values, per leaf of every setting; required globals present."""
    model_names = param_names(method.model_params)
    global_names = param_names(method.global_params)
    levels = [("parameters", config.parameters, global_names + model_names)]
    levels += [(f"models.{i}.parameters", m.parameters, model_names) for i, m in enumerate(config.models)]
    for where, settings, allowed in levels:
        for key, setting in settings.items():
            if key not in allowed:
                errors.append(f"field `{where}.{key}`: unknown parameter for {method.name}; "
                              f"allowed here: {', '.join(allowed) or '(none)'}")
                continue
            owner = method.global_params if key in global_names else method.model_params
            adapter = field_adapter(owner, key)
            for leaf in setting_leaves(setting):
                try:
                    adapter.validate_python(leaf)
                except ValidationError as exc:
                    errors.append(f"field `{where}.{key}`: {exc.errors()[0]['msg']} (got {leaf!r})")
    for name, field in method.global_params.model_fields.items():
        key = field.alias or name
        if field.is_required() and key not in config.parameters:
            errors.append(f"field `parameters.{key}`: required by {method.name} but missing; add it")
    if method.weight_required and "weight" not in config.parameters:
        skip_base = method.uses_base and config.base_model is not None  # the base's entry takes no weight
        for i, entry in enumerate(config.models):
            if "weight" not in entry.parameters and not (skip_base and entry.model == config.base_model):
                errors.append(f"field `models.{i}.parameters.weight`: required by {method.name} for model "
                              f"{entry.model!r} but missing (mergekit refuses it too: \"Missing required "
                              "parameter weight\"); give each model a weight, or one global `parameters.weight`")


def _existing(raw: str, base_dir: Path | None) -> Optional[Path]:
    for candidate in [Path(raw)] + ([base_dir / raw] if base_dir and not Path(raw).is_absolute() else []):
        if candidate.exists():
            return candidate.resolve()
    return None


def _resolve_paths(config: MergeConfig, base_dir: Path | None, errors: list[str]) -> dict[str, Path]:
    fields = [("base_model", config.base_model)] + [(f"models.{i}.model", m.model) for i, m in enumerate(config.models)]
    if config.tokenizer_source not in (None, "base"):
        fields.append(("tokenizer_source", config.tokenizer_source))
    resolved: dict[str, Path] = {}
    for field, raw in fields:
        if raw is None or raw in resolved:
            continue
        path = _existing(raw, base_dir)
        if path is None:
            errors.append(f"field `{field}`: path {raw!r} does not exist (local paths only; "
                          "relative paths are tried from the current folder, then the config's folder)")
        else:
            resolved[raw] = path
    return resolved


def _plan(config: MergeConfig, method: MergeMethod, paths: dict[str, Path]) -> MergePlan:
    base = paths[config.base_model] if config.base_model else None
    if method.uses_base and base is not None:
        entries = [m for m in config.models if paths[m.model] != base]  # the base's own entry is skipped
        op_base = base
    else:
        entries, op_base = list(config.models), None
        if method.base_is_model and base is not None and all(paths[m.model] != base for m in entries):
            entries.append(InputModel(model=config.base_model))  # mergekit gathers the base as one more model
    first = paths[config.models[0].model]
    if config.tokenizer_source in (None, "base"):
        tokenizer = base or first
    else:
        tokenizer = paths[config.tokenizer_source]
    return MergePlan(
        method=method, base=op_base, others=[paths[m.model] for m in entries],
        model_settings=[dict(m.parameters) for m in entries], global_settings=dict(config.parameters),
        config_source=base or first, tokenizer_source=tokenizer, dtype=config.out_dtype or config.dtype,
        align_vocabulary=config.tokenizer_source is not None,
    )
