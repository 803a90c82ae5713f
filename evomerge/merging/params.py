"""mergekit-style parameter settings: a scalar, a layer gradient, or filter-conditioned values.

A setting is turned into the scalar for one tensor by `evaluate_setting(setting, name, t)`, where t
is the tensor's relative depth (mergekit 0.1.5's convention: layer i of n at i/(n−1), 0 for every
tensor outside the layers, embeddings, final norm and head alike). This is how a YAML says "weight 0.3 in early layers, 0.7 late" or
"t = 0 on attention, 0.5 elsewhere", and it is the same per-layer-group view a layerwise genome has.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Iterable, Iterator, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, TypeAdapter, ValidationError
from pydantic.functional_validators import PlainValidator

Scalar = Union[bool, int, float]
SETTING_HELP = ("a number or true/false, a list of numbers (a gradient over layers), "
                "or a list of {filter, value} entries")


class ConditionalParameter(BaseModel):
    """`{filter: "self_attn", value: ...}`: applies when `filter` is a substring of the tensor name."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    filter: Optional[str] = None
    value: Union[StrictBool, StrictInt, float, list[float]]


def parse_setting(raw: Any) -> "Scalar | list[float] | list[ConditionalParameter]":
    """One clear message for a malformed setting, instead of one per member of a type union."""
    if isinstance(raw, (bool, int, float)):
        return raw
    if isinstance(raw, (dict, ConditionalParameter)):
        raw = [raw]
    if isinstance(raw, list) and raw:
        if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in raw):
            return [float(e) for e in raw]
        if all(isinstance(e, (dict, ConditionalParameter)) for e in raw):
            out = []
            for i, entry in enumerate(raw):
                try:
                    out.append(ConditionalParameter.model_validate(entry))
                except ValidationError as exc:
                    problems = "; ".join(_entry_problem(e) for e in exc.errors())
                    raise ValueError(f"entry {i}: {problems}") from None
            return out
    raise ValueError(f"expected {SETTING_HELP}")


def _entry_problem(err: Any) -> str:
    key = str(err["loc"][0]) if err["loc"] else "?"
    if err["type"] == "extra_forbidden":
        return f"unknown key `{key}` (allowed: filter, value)"
    if err["type"] == "missing":
        return f"`{key}` is missing"
    return f"`{key}`: a number, true/false or a list of numbers"


Setting = Annotated[Any, PlainValidator(parse_setting)]

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def evaluate_setting(setting: Setting, tensor_name: str, t: float) -> Optional[Scalar]:
    """The value for one tensor, or None when no filter matches (the next level decides).

    Raw YAML shapes (dicts) are accepted too, so genomes can pass settings without a config.
    """
    setting = parse_setting(setting)
    if isinstance(setting, (bool, int, float)):
        return setting
    if all(isinstance(e, ConditionalParameter) for e in setting):
        for cond in setting:
            if cond.filter in (None, "*") or cond.filter in tensor_name:
                return evaluate_setting(cond.value, tensor_name, t)
        return None
    values = [float(v) for v in setting]  # a gradient: linear interpolation over depth
    if len(values) == 1:
        return values[0]
    scaled = min(max(t, 0.0), 1.0) * (len(values) - 1)
    i0 = int(math.floor(scaled))
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def setting_leaves(setting: Setting) -> Iterator[Scalar]:
    """Every literal value a setting can contain; valid leaves make every interpolation valid
    too, because all constraints here are intervals."""
    if isinstance(setting, (bool, int, float)):
        yield setting
    elif isinstance(setting, ConditionalParameter):
        yield from setting_leaves(setting.value)
    else:
        for entry in setting:
            yield from setting_leaves(entry)


def layer_index(tensor_name: str) -> Optional[int]:
    """The first integer component of a dotted name (`model.layers.7.mlp...` → 7)."""
    match = _LAYER.search(tensor_name)
    return int(match.group(1)) if match else None


def count_layers(tensor_names: Iterable[str]) -> int:
    indices = [i for i in (layer_index(n) for n in tensor_names) if i is not None]
    return max(indices) + 1 if indices else 0


def depth(tensor_name: str, num_layers: int) -> float:
    """mergekit's t: layer i at i/(n−1) (1 when n = 1), every tensor outside the layers 0.

    mergekit plans the embeddings and the final norm and head with one reader at t = 0 (only
    layers get their own t), so a gradient's first value applies to all of them; checked
    against mergekit 0.1.5 in tests/test_mergekit_parity.py.
    """
    index = layer_index(tensor_name)
    if index is None:
        return 0.0
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def resolve(model: type[BaseModel], levels: Sequence[dict[str, Setting]], tensor_name: str, t: float) -> BaseModel:
    """Build `model` for one tensor; for each field the first level that yields a value wins.

    Per-model parameters pass `[model's parameters, global parameters]`: a global `weight` or
    `density` is the default for every model, as in mergekit.
    """
    values: dict[str, Scalar] = {}
    for name, field in model.model_fields.items():
        key = field.alias or name
        for level in levels:
            if key in level:
                value = evaluate_setting(level[key], tensor_name, t)
                if value is not None:
                    values[key] = value
                    break
    return model.model_validate(values)


def field_adapter(model: type[BaseModel], key: str) -> TypeAdapter:
    """A validator for one field's values (its type and bounds), for checking config leaves."""
    for name, field in model.model_fields.items():
        if (field.alias or name) == key:
            if field.metadata:  # bounds only: the alias/default would only draw pydantic warnings
                return TypeAdapter(Annotated[(field.annotation, *field.metadata)])
            return TypeAdapter(field.annotation)
    raise KeyError(key)
