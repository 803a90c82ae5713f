"""Resume = newest valid snapshot + the trials recorded after it, told back instead of evaluated.

An LLM candidate costs minutes, so a finished evaluation must never be done twice. The study
holds every evaluation in tell order, each with its replay payload (tracking/replay_payload.py).
Replaying goes through the population's and strategy's ordinary `tell`, with the recorded
scores, in trial-number order: the archive, the best and the counters end up as the crashed
search had them, and the strategy's ask state (RNG, counters) is set to what it was after the
newest recorded ask. A child the snapshot holds in flight is taken from the snapshot; a child
asked after it is rebuilt from its recorded origin (lineage over parents that the archive or
earlier replayed trials hold, a seed, or a random start's RNG state).

A trial that cannot be replayed stops the replay there: it and every later trial are evaluated
again (the warning says how many), and children get fresh member ids past every id the study
holds, so that ids stay unique.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np

from evomerge.engine.population import Population
from evomerge.strategies.base import Candidate, Evaluation
from evomerge.tracking import replay_payload
from evomerge.tracking.replay_payload import PayloadError
from evomerge.tracking.trial_record import train_score_of


@dataclass
class TrialEntry:
    """One recorded trial, as much of it as a replay reads (plain data: it travels to the actor)."""

    number: int
    member_id: int | None
    failed: bool
    value: float | None
    test_score: float | None
    error: str | None
    seconds: float
    params: dict[str, Any]
    parents: list[int]
    generation: int
    payload: Any = None
    test_scores: dict[str, float] | None = None  # held-out score per group (tasks with groups)


@dataclass
class ReplayReport:
    replayed: int = 0
    resent: int = 0
    redone: int = 0
    problem: str | None = None  # why the replay stopped early
    first_redone: int | None = None  # trial number from which evaluations are done again
    renumbered: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def warning_text(report: dict[str, Any]) -> str | None:
    if not report.get("redone"):
        return None
    return (f"{report['problem']}; resume evaluates again the {report['redone']} evaluation(s) recorded from "
            f"trial {report['first_redone']} on (those trials stay in the study as they were)")


def entries_from_trials(trials: Iterable[Any], start: int) -> list[TrialEntry]:
    """The trials numbered `start` on, in number order (driver side, from Optuna FrozenTrials)."""
    entries = []
    for trial in sorted((t for t in trials if t.number >= start), key=lambda t: t.number):
        attrs = trial.user_attrs
        failed = trial.state.name != "COMPLETE"
        member = attrs.get("member_id")
        entries.append(TrialEntry(
            number=int(trial.number), member_id=None if member is None else int(member), failed=failed,
            value=None if failed else train_score_of(trial), test_score=attrs.get("test_score"),
            error=attrs.get("error"), seconds=float(attrs.get("seconds", 0.0)), params=dict(trial.params),
            parents=list(attrs.get("parents", [])), generation=int(attrs.get("generation", 0)),
            payload=attrs.get(replay_payload.ATTR), test_scores=attrs.get("test_scores")))
    return entries


def max_member_id(trials: Iterable[Any]) -> int:
    ids = [int(t.user_attrs["member_id"]) for t in trials if t.user_attrs.get("member_id") is not None]
    return max(ids, default=-1)


def rebuild_genome(origin: Any, space: Any, members: dict[int, Any]) -> Any:
    """The child a recorded origin describes, bit for bit as it was asked."""
    if not isinstance(origin, dict):
        raise PayloadError("the child's genome was not recorded")
    if "lineage" in origin:
        lineage = replay_payload.decode_lineage(origin["lineage"])
        missing = [m for m in lineage.parent_ids if m not in members]
        if missing:
            raise PayloadError(f"its parents {missing} are neither in the snapshot's archive nor replayed")
        return space.breed([members[m] for m in lineage.parent_ids], lineage)
    if "seed" in origin:
        return space.seed_genome(int(origin["seed"]))
    if "random" in origin:
        sigma, state = origin["random"]
        rng = np.random.default_rng()
        rng.bit_generator.state = replay_payload.rng_from_json(state)
        return space.random_genome(rng, float(sigma))
    raise PayloadError(f"unknown genome origin {sorted(origin)}")


def _round_start(entries: list[TrialEntry], index: int) -> int:
    """The first entry of the sync round `entries[index]` belongs to (its children share an ask order)."""
    asked = entries[index].payload.get("a") if isinstance(entries[index].payload, dict) else None
    if asked is None:  # unknown: it may belong to the round before it, so start that one again
        return _round_start(entries, index - 1) if index > 0 else 0
    while index > 0 and isinstance(entries[index - 1].payload, dict) and entries[index - 1].payload.get("a") == asked:
        index -= 1
    return index


def _same_params(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(float(a[k]) == float(b[k]) for k in a)


def _candidate(entry: TrialEntry, payload: dict[str, Any], population: Population,
               members: dict[int, Any], first_new_id: int, seen: set[int]) -> Candidate:
    member = entry.member_id
    if member is None:
        raise PayloadError("the trial has no member id")
    if member in seen:
        raise PayloadError(f"member id {member} is on an earlier trial too")
    candidate = population.inflight.get(member)
    if candidate is not None:  # asked before the snapshot: the snapshot holds the very child
        if not _same_params(candidate.params, entry.params) or list(candidate.parents) != entry.parents:
            raise PayloadError(f"member {member} does not match the snapshot's child in flight")
        return candidate
    if member < first_new_id:
        raise PayloadError(f"member {member} was asked before the snapshot but is not among its children in flight")
    if payload.get("k") is None:
        raise PayloadError("the strategy's ask state was not recorded")
    genome = rebuild_genome(payload.get("g"), population.strategy.problem.space, members)
    return Candidate(genome=genome, params=dict(entry.params), parents=tuple(entry.parents),
                     generation=entry.generation, member_id=member)


def _evaluation(entry: TrialEntry, payload: dict[str, Any], num_datapoints: int) -> Evaluation:
    if entry.failed:
        return Evaluation(int(entry.member_id), None, None, entry.error or "failed", entry.seconds)  # type: ignore[arg-type]
    if "s" not in payload:
        raise PayloadError("the scores were not recorded")
    scores = replay_payload.decode_scores(payload["s"], num_datapoints)
    mean = float(entry.value) if entry.value is not None else None
    if mean is not None and mean != float(np.mean(scores)):
        raise PayloadError(f"the scores' mean {float(np.mean(scores))!r} is not the trial's value {mean!r}")
    return Evaluation(int(entry.member_id), scores, entry.test_score, None, entry.seconds, mean,  # type: ignore[arg-type]
                      test_scores=entry.test_scores)


def _first_unreadable(entries: list[TrialEntry], num_datapoints: int) -> tuple[int, str] | None:
    """The first entry whose payload cannot even be read, before anything is told."""
    for index, entry in enumerate(entries):
        try:
            payload = replay_payload.decode(entry.payload)
            if not entry.failed:
                replay_payload.decode_scores(payload.get("s"), num_datapoints)  # type: ignore[arg-type]
            origin = payload.get("g")
            if isinstance(origin, dict) and "lineage" in origin:
                replay_payload.decode_lineage(origin["lineage"])
        except PayloadError as exc:
            return index, str(exc)
    return None


def replay(population: Population, entries: list[TrialEntry], study_max_member: int = -1,
           sync: bool = False) -> ReplayReport:
    """Tell `entries` (the trials after the snapshot the population was loaded from) back to it.

    `sync`: rounds of children are asked together and told in id order. A replay that must stop
    inside a round stops at the round's start instead, so that the search asks that round again
    as it did, bit for bit (its children get their ids back; their trials are not written again)."""
    strategy = population.strategy
    space = strategy.problem.space
    first_new_id = population.issued
    members = strategy.member_genomes()
    needed = set()  # members some later child was bred from: kept as parents while replaying
    for entry in entries:
        origin = entry.payload.get("g") if isinstance(entry.payload, dict) else None
        if isinstance(origin, dict) and isinstance(origin.get("lineage"), list) and origin["lineage"]:
            needed.update(m for m in origin["lineage"][0] if isinstance(m, int))
    report = ReplayReport()
    stop, why = len(entries), None
    unreadable = _first_unreadable(entries, strategy.problem.num_datapoints)
    if unreadable is not None:
        stop, why = unreadable[0], f"trial {entries[unreadable[0]].number} cannot be replayed: {unreadable[1]}"
        if sync:
            stop = _round_start(entries, stop)
    newest: tuple[int, Any] | None = None
    seen: set[int] = set()
    recording, population.record_replay = population.record_replay, False
    try:
        for index, entry in enumerate(entries):
            if index == stop:
                report.problem, report.first_redone, report.redone = why, entry.number, len(entries) - index
                break
            try:
                if entry.number != population.told:
                    raise PayloadError(f"it is numbered {entry.number} but {population.told} evaluations are told")
                payload = replay_payload.decode(entry.payload)
                candidate = _candidate(entry, payload, population, members, first_new_id, seen)
                evaluation = _evaluation(entry, payload, strategy.problem.num_datapoints)
            except PayloadError as exc:  # found while telling: the tells before it stand
                report.problem = f"trial {entry.number} cannot be replayed: {exc}"
                report.first_redone, report.redone = entry.number, len(entries) - index
                break
            member = candidate.member_id
            if member not in population.inflight:
                population.inflight[member] = candidate
            if payload.get("a") is not None:
                population._asked_at[member] = int(payload["a"])
            population._ask_states.pop(member, None)
            population.tell(evaluation)
            seen.add(member)
            if member in needed and not evaluation.failed:
                members[member] = space.copy(candidate.genome)
            if member >= first_new_id and (newest is None or member > newest[0]):
                newest = (member, payload["k"])
            report.replayed += 1
    finally:
        population.record_replay = recording
    if newest is not None:  # the next ask continues where the crashed search's newest ask left off
        population.issued = max(population.issued, newest[0] + 1)
        strategy.set_ask_state(newest[1])
    if report.redone and not sync:
        # Trials from the stop on stay in the study: their member ids must not come back (in
        # sync mode the same children come back under the same ids, and are not written again).
        population.issued = max(population.issued, study_max_member + 1)
        taken = {e.member_id for e in entries[report.replayed:]}
        for old in sorted(m for m in population.inflight if m in taken):
            candidate = population.inflight.pop(old)
            candidate.member_id = population.issued
            population.issued += 1
            population.inflight[candidate.member_id] = candidate
            for book in (population._asked_at, population._ask_states):
                if old in book:
                    book[candidate.member_id] = book.pop(old)
            report.renumbered.append(old)
    report.resent = len(population.inflight)
    for key in ("replayed", "resent", "redone"):
        population.recovery[key] += getattr(report, key)
    return report
