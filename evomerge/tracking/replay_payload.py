"""What a trial carries so that a resume can tell it back instead of evaluating it again.

The study is the search's log: a child that finished costs nothing twice. A resume asks the
strategy again for every child asked after the snapshot, in member-id order and at the point of
the tells where the crashed search asked it (evomerge/engine/replay.py), so a trial needs to say
when its child was asked and what it was (to check the child asked again is the same), and its
scores. Each trial's user attribute `replay` holds, besides the member id, parents, generation,
`datapoint_indices` (a subsampled child's subset) and `topup_of` the trial already has:

- `v`: the format version (a resume refuses, with a fallback, any other);
- `a`: the ask order, i.e. how many evaluations had been told when the child was asked;
- `n`: how many children had been asked when this one was told: every child with a smaller
  member id was asked before this tell, so the replay knows exactly where each ask falls, also
  for children asked but never told (not in the study);
- `g`: how the child was made, when the strategy says: its lineage (parents, slots, split, mix
  ratio, noise seed), a seed index, or the RNG state a random start was drawn from; `null`
  otherwise;
- `h`: where `g` is null, a digest of the genome as the population packs it (CRC-32, 8 hex
  digits): CMA-ES samples, DAM merges, static merges, seed merges, top-ups, guides' children;
- `s`: its per-datapoint scores as the worker returned them (a subsampled child's or a
  top-up's: its subset's only), exact and compact: bits for 0/1 scores, float16 where that
  loses nothing, float32 (what workers send) otherwise; absent on a FAIL trial.

Version-1 payloads written before `n` and `h` existed carried `k` (M2N2's ask state); `k` is no
longer read, and a payload without `n` is placed by its ask order `a` alone (exact in sync mode).
Decoders ignore keys they do not know, and `v` changes only when a key changes meaning.
"""

from __future__ import annotations

import base64
import json
import zlib
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
    """A PCG64 state as four numbers (its dict has the same, with longer keys): a random
    start's origin, which a replay compares with the re-asked child's."""
    state = rng.bit_generator.state
    if state.get("bit_generator") != "PCG64":
        raise ValueError(f"only PCG64 states are recorded, not {state.get('bit_generator')}")
    return [state["state"]["state"], state["state"]["inc"], state["has_uint32"], state["uinteger"]]


# -- what the child was, where no origin says it ---------------------------------------------
def digest(arrays: dict[str, np.ndarray]) -> str:
    """CRC-32 over the named arrays (names, dtypes, shapes and bytes, in name order), as 8 hex
    digits: it only has to tell a re-asked child from another one (no adversary), and at ~35 us
    for a 19k-parameter vector it costs a quarter of a 64-bit BLAKE2b here."""
    crc = 0
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        crc = zlib.crc32(f"{name}|{value.dtype.str}|{value.shape}|".encode(), crc)
        crc = zlib.crc32(value.data if value.size else b"", crc)
    return f"{crc:08x}"


# -- the payload --------------------------------------------------------------------------------
def encode(scores: np.ndarray | None, asked_at: int | None, issued: int, origin: Any,
           genome_digest: str | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {"v": VERSION, "a": asked_at, "n": issued, "g": encode_origin(origin)}
    if payload["g"] is None and genome_digest is not None:
        payload["h"] = genome_digest
    if scores is not None:
        payload["s"] = encode_scores(scores)
    return payload


def encode_text(scores: np.ndarray | None, asked_at: int | None, issued: int, origin: Any,
                genome_digest: str | None = None) -> str:
    """`encode` as compact JSON text, made where the evaluation is told (the population actor):
    the driver splices it into the journal line as it is, instead of serialising a nested dict
    per trial (that cost the recorder a quarter more CPU per trial on digits)."""
    return json.dumps(encode(scores, asked_at, issued, origin, genome_digest), separators=(",", ":"))


def decode(value: Any) -> dict[str, Any]:
    """The payload as a dict, checked for what every version-1 reader relies on."""
    if value is None:
        raise PayloadError("the trial has no replay payload (written by an evomerge without replay)")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise PayloadError("the replay payload is not JSON") from None
    if not isinstance(value, dict):
        raise PayloadError("the replay payload is not an object")
    if value.get("v") != VERSION:
        raise PayloadError(f"replay payload version {value.get('v')!r} is not {VERSION}")
    for key, what in (("a", "the ask order"), ("n", "the count of children asked")):
        if value.get(key) is not None and (not isinstance(value[key], int) or isinstance(value[key], bool)):
            raise PayloadError(f"{what} is not a number")
    return value
