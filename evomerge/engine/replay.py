"""Resume = newest valid snapshot + the trials recorded after it, told back instead of evaluated.

An LLM candidate costs minutes, so a finished evaluation must never be done twice. The study
holds every evaluation in tell order, each with its replay payload (tracking/replay_payload.py).

Re-ask and verify, for every strategy. A strategy's asks are a function of its state (RNG,
counters, archive) and of the tells before each ask; the snapshot holds the state, the study the
tells. So the replay walks the trials after the snapshot in trial-number order, and before
telling trial t it asks the strategy again, in member-id order, for every child the crashed
search had asked by then (the payload's `n`: how many children were asked when t was told).
Each re-asked child that has a trial is checked against it: member id, params, parents,
generation, ask order, top-up and subset (`datapoint_indices`), and its origin (`g`) or genome
digest (`h`). Then the recorded evaluation is told through the population's and strategy's
ordinary `tell`. The archive, the best, the counters and the strategy's whole state (pycma's
included) end up as the crashed search had them, with no per-strategy genome encoding.
A child the snapshot holds in flight is not asked again: it is taken from the snapshot.

A child asked but never told (in flight when the process died) is asked again like the others
and sent out again under its own member id, as are the snapshot's children that no trial holds.
Children the crashed search asked after its last recorded tell have no trial and no trace: the
resumed search asks them afresh under the same ids (in sync mode, the same children).

Background work is switched off while replaying (`Strategy.allow_background`): DAM trains its
chunk inside ask() instead of returning None. Whether an async search's DAM guide had its chunk
done at a guide turn depended on timing; so before each re-ask the strategy hears the params
the trial recorded for that child (`Strategy.expect`), and M2N2 skips a guide turn whose child
was not the guide's, as the crashed search did. A child with no trial (never told) gets no hint:
its guide turn is taken, and a later trial that then differs makes the replay fall back there.

A trial that cannot be replayed (written by an older version, corrupt, or a re-asked child that
does not match) stops the replay there: it and every later trial are evaluated again (the
warning says how many), and children get fresh member ids past every id the study holds, so
that ids stay unique.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np

from evomerge.engine.population import Population, genome_digest
from evomerge.strategies.base import Candidate, Evaluation
from evomerge.strategies.subsets import decode_indices, encode_indices
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
    indices: str | None = None  # a subsampled child's datapoints (`datapoint_indices`); None: all
    topup_of: int | None = None  # a top-up: the member whose row it completes


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
            payload=attrs.get(replay_payload.ATTR), test_scores=attrs.get("test_scores"),
            indices=attrs.get("datapoint_indices"), topup_of=attrs.get("topup_of")))
    return entries


def max_member_id(trials: Iterable[Any]) -> int:
    ids = [int(t.user_attrs["member_id"]) for t in trials if t.user_attrs.get("member_id") is not None]
    return max(ids, default=-1)


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


def _subset_text(indices: str | None, size: int) -> str | None:
    """A recorded subset in its canonical text (what `encode_indices` writes), checked."""
    if indices is None:
        return None
    try:
        return encode_indices(decode_indices(indices, size), size)
    except (ValueError, TypeError):
        raise PayloadError("the datapoint indices are not a valid bitmask") from None


def _asked_by(entries: list[TrialEntry], index: int, payload: dict[str, Any]) -> int:
    """How many children had been asked when `entries[index]` was told: its `n`, or for a
    payload without it, one past the largest member id asked at or before its number (exact
    when asks come in rounds, as in sync mode; elsewhere a wrong guess fails the checks)."""
    if payload.get("n") is not None:
        return int(payload["n"])
    told = entries[index].number
    return 1 + max((e.member_id for e in entries if e.member_id is not None and isinstance(e.payload, dict)
                    and isinstance(e.payload.get("a"), int) and e.payload["a"] <= told), default=-1)


def _ask_again(population: Population, upto: int, recorded: dict[int, dict[str, Any]]) -> None:
    """Ask the strategy, as the crashed search did, until `upto` children are asked; before each
    ask it hears the params the trial of that child recorded (`recorded`, by member id)."""
    strategy = population.strategy
    while population.issued < upto:
        strategy.expect(recorded.get(population.issued))
        try:
            child = population.ask()
        finally:
            strategy.expect(None)
        if child is None:
            raise PayloadError(f"the strategy offered no child where the search had asked member {population.issued}")


def _check(entry: TrialEntry, payload: dict[str, Any], candidate: Candidate, population: Population,
           asked_again: bool) -> None:
    """Is `candidate` the child the trial recorded? PayloadError saying what differs if not."""
    member, n = entry.member_id, population.strategy.problem.num_datapoints
    where = "asked again" if asked_again else "the snapshot's child in flight"
    if not _same_params(candidate.params, entry.params) or list(candidate.parents) != entry.parents:
        raise PayloadError(f"member {member} {where} has other params or parents than the trial")
    if candidate.generation != entry.generation or candidate.topup_of != entry.topup_of:
        raise PayloadError(f"member {member} {where} has another generation or top-up than the trial")
    recorded = _subset_text(entry.indices, n)
    if recorded != (None if candidate.indices is None else encode_indices(candidate.indices, n)):
        raise PayloadError(f"member {member} {where} is scored on other datapoints than the trial")
    if not asked_again:  # the snapshot holds the very child
        return
    if payload.get("a") is not None and population._asked_at.get(member) != payload["a"]:
        raise PayloadError(f"member {member} was asked again after {population._asked_at.get(member)} "
                           f"evaluations, the trial says {payload['a']}")
    origin = payload.get("g")
    if origin is not None:
        again = json.loads(json.dumps(replay_payload.encode_origin(candidate.origin)))
        if again != origin:
            raise PayloadError(f"member {member} asked again was made otherwise than the trial's child")
    elif payload.get("h") is not None:
        if genome_digest(population.strategy.problem.space, candidate.genome) != payload["h"]:
            raise PayloadError(f"member {member} asked again has another genome than the trial's child")
    else:
        raise PayloadError("the child's genome was not recorded")


def _evaluation(entry: TrialEntry, payload: dict[str, Any], population: Population,
                candidate: Candidate) -> Evaluation:
    if entry.failed:
        return Evaluation(int(entry.member_id), None, None, entry.error or "failed", entry.seconds)  # type: ignore[arg-type]
    if "s" not in payload:
        raise PayloadError("the scores were not recorded")
    scores = replay_payload.decode_scores(payload["s"], population.cost(candidate))
    row = population.full_row(candidate, scores) if population.completes(candidate) else scores
    mean = float(entry.value) if entry.value is not None else None
    if mean is not None and mean != float(np.mean(row)):
        raise PayloadError(f"the scores' mean {float(np.mean(row))!r} is not the trial's value {mean!r}")
    return Evaluation(int(entry.member_id), scores, entry.test_score, None, entry.seconds,  # type: ignore[arg-type]
                      None if row is not scores else mean, test_scores=entry.test_scores)


def _first_unreadable(entries: list[TrialEntry], num_datapoints: int) -> tuple[int, str] | None:
    """The first entry whose payload cannot even be read, before anything is told."""
    for index, entry in enumerate(entries):
        try:
            payload = replay_payload.decode(entry.payload)
            subset = _subset_text(entry.indices, num_datapoints)
            size = num_datapoints if subset is None else len(decode_indices(subset, num_datapoints))
            if not entry.failed:
                replay_payload.decode_scores(payload.get("s"), size)  # type: ignore[arg-type]
            origin = payload.get("g")
            if isinstance(origin, dict) and "lineage" in origin:
                replay_payload.decode_lineage(origin["lineage"])
        except PayloadError as exc:
            return index, str(exc)
    return None


def replay(population: Population, entries: list[TrialEntry], study_max_member: int = -1,
           sync: bool = False) -> ReplayReport:
    """Tell `entries` (the trials after the snapshot the population was loaded from) back to it,
    asking the strategy again for their children first (see the module docstring).

    `sync`: rounds of children are asked together and told in id order. A replay that must stop
    inside a round stops at the round's start instead, so that the search asks that round again
    as it did, bit for bit (its children get their ids back; their trials are not written again)."""
    strategy = population.strategy
    first_new_id = population.issued
    report = ReplayReport()
    stop, why = len(entries), None
    unreadable = _first_unreadable(entries, strategy.problem.num_datapoints)
    if unreadable is not None:
        stop, why = unreadable[0], f"trial {entries[unreadable[0]].number} cannot be replayed: {unreadable[1]}"
        if sync:
            stop = _round_start(entries, stop)
    seen: set[int] = set()
    recorded = {e.member_id: e.params for e in entries[:stop] if e.member_id is not None}
    recording, population.record_replay = population.record_replay, False
    background = strategy.allow_background(False)
    try:
        for index, entry in enumerate(entries):
            if index == stop:
                report.problem, report.first_redone, report.redone = why, entry.number, len(entries) - index
                break
            try:
                if entry.number != population.told:
                    raise PayloadError(f"it is numbered {entry.number} but {population.told} evaluations are told")
                payload = replay_payload.decode(entry.payload)
                member = entry.member_id
                if member is None:
                    raise PayloadError("the trial has no member id")
                if member in seen:
                    raise PayloadError(f"member id {member} is on an earlier trial too")
                _ask_again(population, _asked_by(entries, index, payload), recorded)
                candidate = population.inflight.get(member)
                if candidate is None:
                    raise PayloadError(f"member {member} is not among the children the search had asked")
                _check(entry, payload, candidate, population, asked_again=member >= first_new_id)
                evaluation = _evaluation(entry, payload, population, candidate)
            except PayloadError as exc:  # found while telling: the tells before it stand
                report.problem = f"trial {entry.number} cannot be replayed: {exc}"
                report.first_redone, report.redone = entry.number, len(entries) - index
                break
            if payload.get("a") is not None:
                population._asked_at[member] = int(payload["a"])
            population.tell(evaluation)
            seen.add(member)
            report.replayed += 1
    finally:
        population.record_replay = recording
        strategy.allow_background(background)
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
            if old in population._asked_at:
                population._asked_at[candidate.member_id] = population._asked_at.pop(old)
            report.renumbered.append(old)
    report.resent = len(population.inflight)
    for key in ("replayed", "resent", "redone"):
        population.recovery[key] += getattr(report, key)
    return report
