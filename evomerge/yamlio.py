"""Reading YAML files and turning pydantic errors into "field `x.y`: ..." messages.

It sits below both `evomerge.config` (search definitions) and `evomerge.merging` (merge configs),
so that merging can read its YAML without importing the search config, which imports the
strategies, which import the genomes, which use merging: this module imports none of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from evomerge.errors import ConfigError


def read_yaml(path: str | Path, what: str) -> Any:
    """Parse a YAML file, with errors that say which file and what it should have been."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} not found; give the path to a YAML {what}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def format_validation_error(exc: ValidationError, source: str, model: type[BaseModel], prefix: str = "",
                            what: str = "search definition") -> str:
    """One line per problem, each naming the dotted field; unknown fields list what is allowed."""
    lines = [f"{source}: invalid {what}:"]
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[", "list["))]
        field = ".".join(([prefix] if prefix else []) + loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = allowed_fields(model, err["loc"][:-1])
            hint = f"; allowed here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"  field `{field}`: unknown field (check the spelling){hint}")
        elif err["type"] == "missing":
            lines.append(f"  field `{field}`: required but missing; add it")
        else:
            got = err.get("input")
            got_text = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
            lines.append(f"  field `{field}`: {err['msg']}{got_text}")
    return "\n".join(lines)


def allowed_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the (sub)model at `loc`, or [] when `loc` leaves the models."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return []
        current = unwrap_model(current.model_fields[part].annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def unwrap_model(annotation: Any) -> Any:
    """The pydantic model inside an annotation (`Optional[X]`, `list[X]`, ...), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            found = unwrap_model(arg)
            if found is not None:
                return found
    return None
