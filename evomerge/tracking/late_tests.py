"""Held-out tests measured after their member's trial was written (`fitness.test_every: archive`).

Optuna refuses to change a finished trial (journal, RDB and in-memory storages alike raise
"has already finished and can not be updated"), so a late test is kept as a study user
attribute, `test:<member id>`, which every storage lets any process set at any time and the
dashboard lists with the study. Readers (status, plots, compare) merge them back onto the
member's own trial with `with_tests`, so everything downstream reads one `test_score` per trial
whichever way it was measured.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from evomerge.engine.late_tests import TestRecord

PREFIX = "test:"


def attr_value(record: TestRecord) -> dict[str, Any]:
    value: dict[str, Any] = {"test_score": record.test_score, "seconds": round(record.seconds, 6)}
    if record.test_scores is not None:
        value["test_scores"] = record.test_scores
    if record.error is not None:
        value["error"] = record.error
    return value


def write_tests(study: optuna.Study, records: Iterable[TestRecord]) -> int:
    """One study attribute per record; returns how many were written."""
    written = 0
    for record in records:
        study.set_user_attr(f"{PREFIX}{record.member_id}", attr_value(record))
        written += 1
    return written


def measured_tests(study: optuna.Study | None) -> dict[int, TestRecord]:
    """The late tests a study holds, by member id (a failed one has its error and no score)."""
    if study is None:
        return {}
    out: dict[int, TestRecord] = {}
    for key, value in study.user_attrs.items():
        if key.startswith(PREFIX) and isinstance(value, dict):
            member = int(key[len(PREFIX):])
            out[member] = TestRecord(member, value.get("test_score"), value.get("test_scores"),
                                     value.get("error"), float(value.get("seconds", 0.0)))
    return out


def member_trials(trials: Sequence[FrozenTrial]) -> dict[int, int]:
    """Member id -> index of the trial its test belongs on: the one with its full row (a last
    top-up's, whose `topup_of` is the child it completed), else, for a member that entered the
    archive on a subset alone (`subsample.topup: none`), its own partial trial."""
    full: dict[int, int] = {}
    own: dict[int, int] = {}
    for index, trial in enumerate(trials):
        attrs = trial.user_attrs
        if trial.state != TrialState.COMPLETE or attrs.get("member_id") is None:
            continue
        if not attrs.get("partial"):
            full.setdefault(int(attrs.get("topup_of", attrs["member_id"])), index)
        elif attrs.get("topup_of") is None:
            own.setdefault(int(attrs["member_id"]), index)
    return {**own, **full}


def with_tests(trials: Sequence[FrozenTrial], tests: dict[int, TestRecord]) -> list[FrozenTrial]:
    """`trials`, where a member's trial has a late test, a copy of it that carries the test as its
    own `test_score` (and `test_scores`, or `test_error`). The study is not changed."""
    out = list(trials)
    if not tests:
        return out
    for member, index in member_trials(out).items():
        record = tests.get(member)
        if record is None:
            continue
        trial = copy.copy(out[index])
        attrs = {**trial.user_attrs, "test_score": record.test_score}
        if record.test_scores is not None:
            attrs["test_scores"] = record.test_scores
        if record.error is not None:
            attrs["test_error"] = record.error
        trial.user_attrs = attrs
        out[index] = trial
    return out


def study_trials(study: optuna.Study | None) -> list[FrozenTrial]:
    """A study's trials with their late tests merged in."""
    if study is None:
        return []
    return with_tests(study.get_trials(deepcopy=False), measured_tests(study))


def held_out_counts(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """Held-out scores measured, and late tests that failed, over (merged) trials."""
    measured = sum(isinstance(v := t.user_attrs.get("test_score"), (int, float)) and math.isfinite(v)
                   for t in trials)
    return {"measured": int(measured), "failed": sum("test_error" in t.user_attrs for t in trials)}

