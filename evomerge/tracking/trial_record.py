"""An evaluation as an Optuna trial: its params' distributions and its user attributes.

Shared by every way the recorder writes (`add_trials`, the journal and RDB bulk writers), so a
trial reads back the same whichever storage holds it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import optuna
from optuna.distributions import FloatDistribution, IntDistribution, distribution_to_json
from optuna.trial import TrialState, create_trial

from evomerge.engine.population import EvalRecord

UNIT = FloatDistribution(0.0, 1.0)


def distribution_key(value: float | int) -> tuple[Any, ...]:
    """What a param's distribution depends on: ints range over [0, value], numbers in [0, 1]
    over [0, 1], anything else over a range that holds it. Cheap to hash, unlike a distribution."""
    if isinstance(value, int) and not isinstance(value, bool):
        return ("int", max(int(value), 1))
    if 0.0 <= value <= 1.0:
        return ("unit",)
    return ("float", min(value, 0.0), max(value, 1.0))


@functools.lru_cache(maxsize=4096)
def distribution_for(key: tuple[Any, ...]) -> Any:
    if key[0] == "int":
        return IntDistribution(0, key[1])
    if key[0] == "unit":
        return UNIT
    return FloatDistribution(key[1], key[2])


@functools.lru_cache(maxsize=4096)
def distribution_json(distribution: Any) -> str:
    return distribution_to_json(distribution)


def user_attrs(record: EvalRecord) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "member_id": record.member_id, "parents": record.parents, "generation": record.generation,
        "test_score": record.test_score, "seconds": round(record.seconds, 6), "evaluation": record.number,
    }
    if record.datapoints:  # datapoint-evaluations this trial cost (budget.datapoints' unit)
        attrs["datapoints"] = record.datapoints
    if record.indices is not None:  # which ones: subsets.decode_indices(text, num_datapoints)
        attrs["datapoint_indices"] = record.indices
    if record.topup_of is not None:
        attrs["topup_of"] = record.topup_of
    if record.partial:  # the value is a subset's mean: not comparable with a full row's, never a best
        attrs["partial"] = True
    if record.train_scores is not None:  # a task with groups: the values are the groups' means
        attrs["train_score"] = record.train_score
        attrs["test_scores"] = record.test_scores
    if record.failed:
        attrs["error"] = record.error
    return attrs


def trial_values(record: EvalRecord) -> list[float]:
    """A finished evaluation's objective values: its mean train score per group for a task with
    groups (the study has one objective each), else the one mean train score."""
    if record.train_scores is not None:
        return [float(v) for v in record.train_scores.values()]
    return [float(record.train_score)]  # type: ignore[arg-type]


def checked_values(record: EvalRecord, objectives: int) -> list[float]:
    """`trial_values`, refused (ValueError) where Optuna would refuse them: NaN, or a count that
    is not the study's number of objectives."""
    values = trial_values(record)
    if len(values) != objectives or any(math.isnan(v) for v in values):
        raise ValueError(f"trial values {values} cannot be recorded in a study with {objectives} objective(s)")
    return values


def train_score_of(trial: optuna.trial.FrozenTrial) -> float | None:
    """A complete trial's mean train score over all datapoints: its value in a single-objective
    study, its `train_score` attribute where the objectives are groups."""
    if trial.state != TrialState.COMPLETE or not trial.values:
        return None
    score = trial.user_attrs.get("train_score")
    if score is not None:
        return float(score)
    return float(trial.values[0]) if len(trial.values) == 1 else None


def record_to_trial(record: EvalRecord) -> optuna.trial.FrozenTrial:
    params = {name: int(v) if isinstance(v, int) and not isinstance(v, bool) else float(v)
              for name, v in record.params.items()}
    distributions = {name: distribution_for(distribution_key(v)) for name, v in record.params.items()}
    attrs = user_attrs(record)
    if record.failed:
        return create_trial(state=TrialState.FAIL, params=params, distributions=distributions, user_attrs=attrs)
    return create_trial(values=trial_values(record), params=params, distributions=distributions, user_attrs=attrs,
                        intermediate_values=record.intermediate)
