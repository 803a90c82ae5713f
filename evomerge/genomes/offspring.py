"""Dense children written down as how they were bred, so fitness workers can breed them.

A from-scratch child is a whole model's parameters (77 KB on digits). Breeding it (split-point
SLERP plus noise on every parameter) cost the population actor ~0.4 ms, and shipping it cost
serialisation in the actor, the object store and the worker: on a cheap fitness that was as much
CPU as the fitness itself, all of it in the single population actor. A `Lineage` is a few
numbers; a worker that holds the parents breeds the child itself, bit for bit as the population
would. Parents travel once per worker, when they are first needed, and only archive members can
be parents, so about one child in ten travels, once per worker, instead of every child.

`breed` is the one definition of a dense child: the population (when a child enters the archive,
for a snapshot, or when deferral is off) and the workers both call it, so they cannot disagree.
The noise comes from the child's own seed, not from the strategy's stream, for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from evomerge.genomes.dense import split_slerp


@dataclass(slots=True)
class Lineage:
    """What a worker needs besides the parents: which archive slots hold them (and which
    members they must be), the split, the mix ratio and the mutation noise's seed."""

    parent_ids: tuple[int, ...]  # one parent: a mutated copy; two: split-point SLERP
    slots: tuple[int, ...]
    split: int = 0
    ratio: float = 0.0
    sigma: float = 0.0
    noise_seed: int | None = None


def draw_noise_seed(rng: np.random.Generator) -> int:
    """63 random bits straight from the generator: `rng.integers` costs ten times as much."""
    return int(rng.bit_generator.random_raw()) >> 1


def add_noise(genome: np.ndarray, sigma: float, noise_seed: int) -> np.ndarray:
    """genome + N(0, sigma^2) noise from the seed, as a new array.

    Drawn in float32, the genome's precision (float64 normals cast down cost ~20% more and carried
    bits the child never kept); the noise buffer becomes the child, so nothing is copied."""
    child = np.random.default_rng(noise_seed).standard_normal(genome.size, dtype=np.float32)
    child *= np.float32(sigma)
    child += genome
    return child


def breed(parents: Sequence[np.ndarray], lineage: Lineage) -> np.ndarray:
    if len(parents) != len(lineage.parent_ids):
        raise ValueError(f"lineage names {len(lineage.parent_ids)} parents, got {len(parents)}")
    if len(parents) == 2:
        child = split_slerp(parents[0], parents[1], lineage.split, lineage.ratio)
    elif len(parents) == 1:
        child = parents[0]
    else:
        raise ValueError(f"a child has one or two parents, not {len(parents)}")
    if lineage.sigma > 0:
        if lineage.noise_seed is None:
            raise ValueError("a mutated child needs a noise seed")
        return add_noise(child, lineage.sigma, lineage.noise_seed)
    return child.copy() if child is parents[0] else child


@dataclass(slots=True)
class Offspring:
    """A child not bred yet: its lineage plus the parents themselves (kept alive by this
    reference even after they leave the archive, so the child can always be bred). Never
    modified once made."""

    lineage: Lineage
    parents: tuple[np.ndarray, ...] = field(repr=False, compare=False)

    def materialise(self) -> np.ndarray:
        return breed(self.parents, self.lineage)

    def parent_entries(self) -> list[tuple[int, int, np.ndarray]]:
        """(slot, member id, genome) of each parent, for a worker's cache."""
        return list(zip(self.lineage.slots, self.lineage.parent_ids, self.parents))


def pack_offspring(children: Sequence[Offspring], rows: Sequence[int], prefix: str) -> dict[str, np.ndarray]:
    """Children not bred yet, as their lineages plus each parent once (by member id).

    The children in flight at a snapshot are dozens of models but have a few parents, most of them
    archive members: bred, they made a digits snapshot 6.1 MB (3.5 MB this way) and cost the
    population actor a breeding each. A child bred from this on resume has the same bits."""
    k = len(children)
    arrays: dict[str, np.ndarray] = {
        f"{prefix}/rows": np.asarray(rows, dtype=np.int64).reshape(k),
        f"{prefix}/parent_ids": np.full((k, 2), -1, dtype=np.int64),
        f"{prefix}/slots": np.full((k, 2), -1, dtype=np.int64),
        f"{prefix}/split": np.zeros(k, dtype=np.int64),
        f"{prefix}/ratio": np.zeros(k, dtype=np.float64),
        f"{prefix}/sigma": np.zeros(k, dtype=np.float64),
        f"{prefix}/noise_seed": np.full(k, -1, dtype=np.int64),  # -1: no noise seed
    }
    for i, child in enumerate(children):
        lineage = child.lineage
        arrays[f"{prefix}/parent_ids"][i, :len(lineage.parent_ids)] = lineage.parent_ids
        arrays[f"{prefix}/slots"][i, :len(lineage.slots)] = lineage.slots
        arrays[f"{prefix}/split"][i] = lineage.split
        arrays[f"{prefix}/ratio"][i] = lineage.ratio
        arrays[f"{prefix}/sigma"][i] = lineage.sigma
        if lineage.noise_seed is not None:
            arrays[f"{prefix}/noise_seed"][i] = lineage.noise_seed
        for member_id, parent in zip(lineage.parent_ids, child.parents):
            arrays.setdefault(f"{prefix}/parent/{member_id}", np.asarray(parent))  # its own dtype
    return arrays


def unpack_offspring(arrays: dict[str, np.ndarray], prefix: str) -> dict[int, Offspring]:
    """`pack_offspring` undone: each child by its row."""
    # One copy per parent, shared by its children (an Offspring never modifies its parents).
    parents = {int(key.rsplit("/", 1)[1]): np.array(value) for key, value in arrays.items()
               if key.startswith(f"{prefix}/parent/")}
    children: dict[int, Offspring] = {}
    for i, row in enumerate(arrays[f"{prefix}/rows"]):
        ids = tuple(int(m) for m in arrays[f"{prefix}/parent_ids"][i] if m >= 0)
        missing = [m for m in ids if m not in parents]
        if missing:
            raise ValueError(f"snapshot array {prefix}: the parents {missing} of a child in flight are not stored")
        seed = int(arrays[f"{prefix}/noise_seed"][i])
        lineage = Lineage(parent_ids=ids, slots=tuple(int(k) for k in arrays[f"{prefix}/slots"][i][:len(ids)]),
                          split=int(arrays[f"{prefix}/split"][i]), ratio=float(arrays[f"{prefix}/ratio"][i]),
                          sigma=float(arrays[f"{prefix}/sigma"][i]), noise_seed=None if seed < 0 else seed)
        children[int(row)] = Offspring(lineage, tuple(parents[m] for m in ids))
    return children


def realise(genome: Any) -> Any:
    """The genome itself: an `Offspring` bred, anything else unchanged."""
    return genome.materialise() if isinstance(genome, Offspring) else genome


class StaleParents(LookupError):
    """The worker's cache does not hold a parent the lineage names: the child must be re-sent."""


class ParentCache:
    """A worker's copy of the archive members it has been sent, by slot.

    Keyed by slot, so it never holds more than the archive; each entry carries its member id, and
    a lineage is bred only when every slot holds the member it names. A worker that restarted, or
    calls that arrive out of order, therefore give `StaleParents`, never a wrong child."""

    def __init__(self) -> None:
        self.slots: dict[int, tuple[int, np.ndarray]] = {}

    def update(self, entries: Sequence[tuple[int, int, np.ndarray]]) -> None:
        for slot, member_id, genome in entries:
            # A copy: the received array may be a view into Ray's object store, which it would pin.
            self.slots[int(slot)] = (int(member_id), np.array(genome))  # its own dtype, as the population has it

    def breed(self, lineage: Lineage) -> np.ndarray:
        parents = []
        for slot, member_id in zip(lineage.slots, lineage.parent_ids):
            held = self.slots.get(slot)
            if held is None or held[0] != member_id:
                raise StaleParents(f"slot {slot} does not hold member {member_id}")
            parents.append(held[1])
        return breed(parents, lineage)


class ParentMirror:
    """The dispatcher's record of what each worker's `ParentCache` holds, so a parent is sent to
    a worker only when that worker lacks it."""

    def __init__(self, workers: int) -> None:
        self.held: list[dict[int, int]] = [{} for _ in range(workers)]

    def wire(self, worker_index: int, genomes: Sequence[Any]) -> tuple[list[Any], list[tuple[int, int, np.ndarray]]]:
        """What one call to a worker carries: each genome as sent (an `Offspring` as its
        `Lineage`), and the cache entries the worker must take first; recorded as sent.

        A child re-sent after a worker died may name an older member in a slot that a fresh child
        of the same call names a newer member in. One call can only fill a slot once, so such a
        child goes whole (bred here); otherwise it could be found stale again and again."""
        held = self.held[worker_index]
        wanted: dict[int, int] = {}
        sent: list[Any] = []
        entries: list[tuple[int, int, np.ndarray]] = []
        for genome in genomes:
            if not isinstance(genome, Offspring):
                sent.append(genome)
                continue
            parents = genome.parent_entries()
            if any(wanted.get(slot, member_id) != member_id for slot, member_id, _ in parents):
                sent.append(genome.materialise())
                continue
            for slot, member_id, parent in parents:
                if slot not in wanted:
                    wanted[slot] = member_id
                    if held.get(slot) != member_id:
                        held[slot] = member_id
                        entries.append((slot, member_id, parent))
            sent.append(genome.lineage)
        return sent, entries

    def forget(self, worker_index: int) -> None:
        """The worker restarted (or its cache disagreed): assume it holds nothing."""
        self.held[worker_index].clear()
