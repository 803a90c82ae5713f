"""What a trial carries so that a resume can tell it back instead of evaluating it again.

The study is the search's log: a child that finished costs nothing twice. Each trial's user
attribute `replay` holds, besides the member id, parents and generation the trial already has:

- `v`: the format version (a resume refuses, with a fallback, any other);
- `a`: the ask order, i.e. how many evaluations had been told when the child was asked;
- `g`: how the child was made: its lineage (parents, slots, split, mix ratio, noise seed), a
  seed index, or the RNG state a random start was drawn from; `null` when it cannot be written
  down (a resume then uses the snapshot's copy, or evaluates again);
- `s`: its per-datapoint scores, exact and compact: bits for 0/1 scores, float16 where that
  loses nothing, float32 (what workers send) otherwise; absent on a FAIL trial;
- `k`: the strategy's ask state after this child's ask (RNG, counters).

Room to grow: a later version may add keys (e.g. `i`, the datapoint indices a subsampled child
was scored on); decoders ignore keys they do not know, and `v` changes only when a key changes
meaning.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np

from evomerge.genomes.offspring import Lineage

VERSION = 1
ATTR = "replay"


class PayloadError(ValueError):
    """A trial's replay payload cannot be used (older version, corrupt, or missing)."""


# -- scores -------------------------------------------------------------------------------------
def encode_scores(scores: np.ndarray) -> str:
    """`b:` bits, `h:` float16 or `f:` float32 little-endian, base64; always lossless."""
    scores = np.asarray(scores)
    if scores.dtype.kind == "f":
        bits = scores.astype(bool)
        if np.array_equal(bits, scores) and not np.signbit(scores).any():
            return "b:" + base64.b64encode(np.packbits(bits).tobytes()).decode("ascii")
    single = scores.astype("<f4")
    half = single.astype("<f2")
    if np.array_equal(half.astype("<f4"), single, equal_nan=True):
        return "h:" + base64.b64encode(half.tobytes()).decode("ascii")
    return "f:" + base64.b64encode(single.tobytes()).decode("ascii")


def decode_scores(text: str, size: int) -> np.ndarray:
    """float32 scores of `size` datapoints, as the worker sent them."""
    if not isinstance(text, str) or text[1:2] != ":":
        raise PayloadError("scores are not an encoded string")
    try:
        kind, raw = text[0], base64.b64decode(text[2:].encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):  # binascii.Error is a ValueError
        raise PayloadError("scores are not valid base64") from None
    if kind == "b":
        if len(raw) != (size + 7) // 8:
            raise PayloadError(f"scores hold {len(raw)} bytes of bits, expected {(size + 7) // 8}")
        return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=size).astype(np.float32)
    dtype = {"h": "<f2", "f": "<f4"}.get(kind)
    if dtype is None:
        raise PayloadError(f"unknown score encoding {kind!r}")
    values = np.frombuffer(raw, dtype=dtype)
    if values.size != size:
        raise PayloadError(f"scores hold {values.size} datapoints, expected {size}")
    return values.astype(np.float32)


# -- how a child was made -----------------------------------------------------------------------
def encode_origin(origin: Any) -> Any:
    if isinstance(origin, Lineage):
        return {"lineage": [list(origin.parent_ids), list(origin.slots), int(origin.split), float(origin.ratio),
                            float(origin.sigma), origin.noise_seed]}
    if isinstance(origin, dict):  # already JSON: {"seed": i}, {"random": [sigma, rng state]}
        return origin
    return None


def decode_lineage(value: Any) -> Lineage:
    try:
        ids, slots, split, ratio, sigma, seed = value
        return Lineage(parent_ids=tuple(int(i) for i in ids), slots=tuple(int(k) for k in slots),
                       split=int(split), ratio=float(ratio), sigma=float(sigma),
                       noise_seed=None if seed is None else int(seed))
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"lineage is malformed: {exc}") from None


def rng_to_json(rng: np.random.Generator) -> list[Any]:
    """A PCG64 state as four numbers (its dict has the same, with longer keys)."""
    state = rng.bit_generator.state
    if state.get("bit_generator") != "PCG64":
        raise ValueError(f"only PCG64 states are recorded, not {state.get('bit_generator')}")
    return [state["state"]["state"], state["state"]["inc"], state["has_uint32"], state["uinteger"]]


def rng_from_json(value: Any) -> dict[str, Any]:
    try:
        s, inc, has, u = (int(v) for v in value)
    except (TypeError, ValueError):
        raise PayloadError("RNG state is malformed") from None
    return {"bit_generator": "PCG64", "state": {"state": s, "inc": inc}, "has_uint32": has, "uinteger": u}


# -- the payload --------------------------------------------------------------------------------
def encode(scores: np.ndarray | None, asked_at: int | None, origin: Any, ask_state: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"v": VERSION, "a": asked_at, "g": encode_origin(origin)}
    if scores is not None:
        payload["s"] = encode_scores(scores)
    if ask_state is not None:
        payload["k"] = ask_state
    return payload


def encode_text(scores: np.ndarray | None, asked_at: int | None, origin: Any, ask_state: Any) -> str:
    """`encode` as compact JSON text, made where the evaluation is told (the population actor):
    the driver splices it into the journal line as it is, instead of serialising a nested dict
    per trial (that cost the recorder a quarter more CPU per trial on digits)."""
    return json.dumps(encode(scores, asked_at, origin, ask_state), separators=(",", ":"))


def decode(value: Any) -> dict[str, Any]:
    """The payload as a dict, checked for what every version-1 reader relies on."""
    if value is None:
        raise PayloadError("the trial has no replay payload (written by an evomerge without replay, "
                           "or by a strategy that cannot be replayed)")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise PayloadError("the replay payload is not JSON") from None
    if not isinstance(value, dict):
        raise PayloadError("the replay payload is not an object")
    if value.get("v") != VERSION:
        raise PayloadError(f"replay payload version {value.get('v')!r} is not {VERSION}")
    if value.get("a") is not None and not isinstance(value["a"], int):
        raise PayloadError("the ask order is not a number")
    return value


