"""Values as PostgreSQL's COPY text format and as Optuna's JSON, the way the bulk writer stores them.

Kept apart from `rdb_writer` because each function here must produce exactly the text that
Optuna's own path (`json.dumps`, SQLAlchemy parameters) would store; tests compare them one by
one, and the writer only assembles rows from them.
"""

from __future__ import annotations

import datetime
import json
import math
from typing import Any

_json_dumps = json.dumps
_INF = math.inf


def json_text(value: Any) -> str:
    """`json.dumps(value)`, without building an encoder for the values a search records most
    (ints, finite floats, None, lists of ints): for those the text is the same by construction
    (json's own int and float reprs, its ", " separator), for anything else it is json.dumps."""
    kind = type(value)
    if kind is int:
        return int.__repr__(value)
    if kind is float and -_INF < value < _INF:
        return float.__repr__(value)
    if value is None:
        return "null"
    if kind is list and all(type(item) is int for item in value):
        return "[" + ", ".join(map(int.__repr__, value)) + "]"
    return _json_dumps(value)


def copy_json_text(value: Any) -> str:
    """`json_text(value)` as a COPY text field. JSON never holds a raw control character (json
    escapes them), so only its backslashes need doubling, and the fast-path texts have none."""
    kind = type(value)
    if kind is int:
        return int.__repr__(value)
    if kind is float and -_INF < value < _INF:
        return float.__repr__(value)
    text = json_text(value)
    return text.replace("\\", "\\\\") if "\\" in text else text


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_text(value: str) -> str:
    """A string as a field of PostgreSQL's COPY text format."""
    if type(value) is not str:
        raise TypeError(f"expected a string, got {type(value).__name__}: {value!r}")
    if "\x00" in value:  # what psycopg says for a parameter with NUL, where add_trials fails
        raise ValueError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
    return value.translate(_COPY_ESCAPES)


def copy_json(text: str) -> str:
    """json.dumps output as a COPY text field (see `copy_json_text`)."""
    return text.replace("\\", "\\\\") if "\\" in text else text


def copy_float(value: Any) -> str:
    """A number for a double precision column: repr round-trips exactly through float8in."""
    if value is None:
        return "\\N"
    value = float(value)
    if -_INF < value < _INF:
        return float.__repr__(value)
    return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")


def copy_datetime(value: datetime.datetime | None) -> str:
    """A naive datetime for a `timestamp without time zone` column (ISO 8601, to the microsecond)."""
    return "\\N" if value is None else value.isoformat(" ")
