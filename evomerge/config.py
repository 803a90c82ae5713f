"""Search definitions: YAML in, a validated `SearchConfig` out, and errors that name the field.

Plugin options (strategy, fitness task) are validated by the plugin's own pydantic model, so a
typo in `strategy.options` is caught before Ray starts rather than deep inside an actor.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import to_jsonable_python

from evomerge.errors import ConfigError
from evomerge.yamlio import format_validation_error, read_yaml, unwrap_model  # noqa: F401  (re-exported)


UNLIMITED = 1 << 62  # "no evaluation budget": the datapoint budget ends the search


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class SubsampleSpec(_Strict):
    """Score each child on part of the fitness set (see evomerge/strategies/subsets.py)."""

    size: int | None = Field(None, ge=1, description="datapoints per child (M); or give `fraction`")
    fraction: float | None = Field(None, gt=0.0, le=1.0, description="M as a fraction of the datapoints")
    topup: Literal["archive", "none"] = Field(
        "archive", description="archive: a child that wins a slot is scored on the rest first, so members are "
                               "fully known; none: members keep what was observed, the rest is estimated")
    strata: int = Field(4, ge=1, description="load strata of the draw; 1: a uniform draw")
    staged: bool = Field(
        True, description="topup: archive only. true: top up in stages that double what is observed (uniform "
                          "over the rest), judging the child again after each and stopping a loser early; "
                          "false: the whole rest at once")

    @model_validator(mode="after")
    def _one_size(self) -> "SubsampleSpec":
        if (self.size is None) == (self.fraction is None):
            raise ValueError("give exactly one of `size` (datapoints per child) and `fraction`; "
                             "e.g. `subsample: {fraction: 0.1}`")
        return self

    def resolve(self, num_datapoints: int) -> int:
        """M for a task of `num_datapoints`; M >= N means no subsampling at all."""
        if self.size is not None:
            return min(self.size, num_datapoints)
        return min(num_datapoints, max(1, round(self.fraction * num_datapoints)))


class FitnessSpec(_Strict):
    task: str = Field(description="registered fitness task name, or 'package.module:Class'")
    options: dict[str, Any] = Field(default_factory=dict)
    test_every: Literal["best", "archive", "all"] = Field(
        "best", description="which children get the held-out test score (task.test_score): 'best' only a "
                            "child that becomes the new best by mean train score (on an LLM the test can take "
                            "close to half of each evaluation); 'archive' also every child that enters the "
                            "strategy's archive (a test-only job after the tell); 'all' every child. "
                            "Selection never reads it")
    subsample: SubsampleSpec | None = Field(
        None, description="{size: M | fraction: F, topup: archive | none}: score each child on M datapoints")


class StrategySpec(_Strict):
    name: str = "m2n2"
    options: dict[str, Any] = Field(default_factory=dict)


class BudgetSpec(_Strict):
    evaluations: int | None = Field(None, gt=0, description="total evaluations (scoring calls, a top-up is one), "
                                                             "initial members included")
    datapoints: int | None = Field(None, gt=0, description="total datapoint-evaluations: a child scored on M "
                                                            "datapoints costs M; never exceeded")

    @model_validator(mode="after")
    def _some_budget(self) -> "BudgetSpec":
        if self.evaluations is None and self.datapoints is None:
            raise ValueError("give `evaluations` or `datapoints` (or both: the search ends at the first spent)")
        return self

    @property
    def max_evaluations(self) -> int:
        """The evaluation budget; without one, a number no datapoint budget can reach."""
        return self.evaluations if self.evaluations is not None else UNLIMITED


class WorkersSpec(_Strict):
    count: int = Field(2, ge=1)
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    batch: Union[int, Literal["auto"]] = Field(
        "auto", description="children sent per worker call; amortises Ray overhead. 'auto': about 25 ms "
                            "of fitness work per call (at most 64 children), 4 in sync mode")
    pipeline: Union[int, Literal["auto"]] = Field(
        "auto", description="batches queued per worker, so it never waits for the next. 'auto': 2, or 1 (a "
                            "child is asked when a worker frees up) while evaluations take 1 s or more")
    breed_on_workers: bool = Field(
        True, description="dense children travel as their lineage and workers breed them (parents are "
                          "sent once per worker); false: the population breeds and ships every child")
    max_restarts: int = Field(3, ge=0, description="deaths in a row before a worker is given up on")
    max_retries_per_child: int = Field(2, ge=0, description="re-sends of a child whose worker died")
    timeout_seconds: float | None = Field(
        None, gt=0, description="per child: an evaluation that runs longer is stopped and recorded as FAIL; "
                                "a worker stuck past it in native code is restarted. None: no limit")
    memory_check: bool = Field(
        True, description="print the memory plan before the workers start and stop when it does not fit "
                          "the node's available memory or a GPU; false: print nothing, start anyway")

    @field_validator("pipeline", mode="before")
    @classmethod
    def _pipeline_is_count_or_auto(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError("must be a whole number >= 1 (calls queued per worker) or 'auto'")

    @field_validator("batch", mode="before")
    @classmethod
    def _batch_is_count_or_auto(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError("must be a whole number >= 1 (children per worker call) or 'auto'; "
                         "set e.g. `batch: 4`, or `batch: auto` to size calls by the fitness's speed")


class RaySpec(_Strict):
    address: str | None = Field(None, description="None starts an embedded local Ray; 'auto' joins")
    num_cpus: int | None = Field(None, ge=1, description="embedded Ray only")
    object_store_memory_mb: int = Field(256, ge=80, description="embedded Ray only")


class OptunaSpec(_Strict):
    storage: str | None = Field(None, description="None: journal file runs/NAME/optuna.journal")
    study_name: str | None = None


class SnapshotSpec(_Strict):
    every: int = Field(1000, ge=1, description="evaluations between snapshots")
    keep: int = Field(3, ge=1)


class GenomeSpec(_Strict):
    kind: Literal["auto", "dense", "recipe"] = Field(
        "auto", description="auto: recipes when merging checkpoints, dense vectors otherwise")
    max_boundaries: int = Field(1 << 16, ge=2, description="split-point grid for large models")


class SearchConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    seeds: Union[Literal["task"], list[str]] = Field(
        default_factory=list,
        description="[] = from scratch; 'task' = seeds the fitness task makes; or checkpoint paths",
    )
    allow_pickle: bool = Field(False, description="allow .bin seeds (loaded with weights_only=True)")
    genome: GenomeSpec = Field(default_factory=GenomeSpec)
    fitness: FitnessSpec
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    budget: BudgetSpec
    workers: WorkersSpec = Field(default_factory=WorkersSpec)
    ray: RaySpec = Field(default_factory=RaySpec)
    optuna: OptunaSpec = Field(default_factory=OptunaSpec)
    snapshots: SnapshotSpec = Field(default_factory=SnapshotSpec)
    sync: bool = Field(False, description="fixed evaluation order: same seed, same search")

    @field_validator("seeds")
    @classmethod
    def _seed_paths_exist(cls, value: Union[str, list[str]]) -> Union[str, list[str]]:
        if isinstance(value, list):
            for path in value:
                if not Path(path).exists():
                    raise ValueError(f"seed checkpoint {path!r} does not exist; fix the path (the tiny-lm "
                                     "experts are made by `evomerge fixtures tiny-lm models/tiny-lm`)")
        return value

    def hash(self) -> str:
        """Hash of everything that changes the search (not the budget, workers or storage)."""
        data = self.model_dump(mode="json")
        for volatile in ("budget", "ray", "optuna", "snapshots"):
            data.pop(volatile)
        data["workers"] = {"batch": self.workers.batch, "count": self.workers.count} if self.sync else {}
        data["fitness"].pop("test_every")  # which test scores are measured; selection never reads them
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SearchConfig:
    """Read and validate a YAML search definition; `overrides` use dotted keys (CLI flags)."""
    path = Path(path)
    data = read_yaml(path, "search definition")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of fields at the top level, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    return config_from_dict(data, source=str(path))


def config_from_dict(data: dict[str, Any], source: str = "<config>") -> SearchConfig:
    try:
        config = SearchConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, SearchConfig)) from None
    config.strategy.options = validate_plugin_options(config.strategy.name, config.strategy.options, "strategy", source)
    config.fitness.options = validate_plugin_options(config.fitness.task, config.fitness.options, "fitness", source)
    if config.fitness.subsample is not None:
        check_subsample(config, source)
    return config


def check_subsample(config: SearchConfig, source: str = "<config>") -> None:
    """A subsampled search needs a task that can score a subset and a strategy that can judge one:
    refused here, before Ray starts, naming the field."""
    from evomerge.strategies import STRATEGIES
    from evomerge.tasks import TASKS

    task = TASKS.get(config.fitness.task)
    if not getattr(task, "supports_subsample", False):
        raise ConfigError(f"{source}: field `fitness.subsample`: fitness task {config.fitness.task!r} cannot score a "
                          "subset of its datapoints (its evaluate takes no indices); remove fitness.subsample, or "
                          "use a task that supports it (digits, lm_exact_match, lm_answer_likelihood, lm_eval)")
    strategy = STRATEGIES.get(config.strategy.name)
    if not getattr(strategy, "supports_subsample", False):
        raise ConfigError(f"{source}: field `fitness.subsample`: strategy {config.strategy.name!r} does not judge "
                          "children on a subset; remove fitness.subsample, or use m2n2, ga or cmaes")


def validate_plugin_options(name: str, options: dict[str, Any], section: str, source: str) -> dict[str, Any]:
    """Check options against the plugin's `Options` model and return them with defaults filled in."""
    if section == "strategy":
        from evomerge.strategies import STRATEGIES as registry
        field = "strategy.name"
    else:
        from evomerge.tasks import TASKS as registry
        field = "fitness.task"
    try:
        plugin = registry.get(name)
    except KeyError as exc:
        raise ConfigError(f"{source}: field `{field}`: {exc.args[0]}") from None
    options_model = getattr(plugin, "Options", None)
    if options_model is None:
        return dict(options)
    try:
        validated = options_model.model_validate(options)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, options_model, prefix=f"{section}.options")) from None
    return validated.model_dump(mode="json", by_alias=True)


MISSING: Any = object()  # a field a config dict does not have


def submodel(model: type[BaseModel] | None, key: str) -> type[BaseModel] | None:
    """The model of field `key` of `model` when that field is a section (None otherwise)."""
    if model is None or key not in model.model_fields:
        return None
    return unwrap_model(model.model_fields[key].annotation)


def field_default_json(model: type[BaseModel] | None, key: str) -> Any:
    """Field `key`'s default as `model_dump(mode="json")` writes it; `MISSING` when the field
    is required or `model` has no such field."""
    if model is None or key not in model.model_fields or model.model_fields[key].is_required():
        return MISSING
    value = model.model_fields[key].get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return to_jsonable_python(value)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
