"""Static merge methods, registered by name, each with typed per-model and global parameters.

A method is `merge(base, tensors, per_model, params, *, key="") -> Tensor` over ONE tensor:
`base` is the base model's tensor (None for linear), `tensors` the other models' tensors,
`per_model` one parameter object per entry of `tensors`, `params` the global parameters and `key`
the tensor's name (it seeds DARE's drop masks so every tensor gets its own pattern). Inputs may be
bf16/f16; the math runs in float32 and the result is float32. Because parameters are plain
per-call objects, a layerwise genome calls the same method once per tensor with its layer group's
coefficients, and `evomerge merge` calls it with coefficients read from a mergekit-style YAML.

Parameter names and defaults follow mergekit, so a mergekit config means the same thing here.
This module holds the registry, the parameter models and the six core methods; the others live
in one module per family (`methods_sparse`, `methods_geometric`, `methods_papers`,
`methods_data`), each registering its methods by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from evomerge.merging import ops
from evomerge.registry import Registry

Tensor = torch.Tensor


class Params(BaseModel):
    """Base of all parameter models: strict names (typos fail), `lambda` accepted by alias."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class NoModelParams(Params):
    """Methods whose models carry no parameters of their own (slerp)."""


class WeightParams(Params):
    weight: float = Field(1.0, description="this model's coefficient")


class SparseParams(WeightParams):
    density: float = Field(1.0, gt=0, le=1, description="fraction of the task vector kept")


class LinearParams(Params):
    normalize: bool = Field(True, description="divide by Σ weight, so weights need not sum to 1")


class SlerpParams(Params):
    t: float = Field(ge=0, le=1, description="0 = base model, 1 = the other model")


class TaskArithmeticParams(Params):
    normalize: bool = Field(False, description="divide the summed task vectors by Σ weight")
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged task vector")
    int8_mask: bool = Field(False, description="accepted for mergekit configs; no effect here")


class TiesParams(TaskArithmeticParams):
    normalize: bool = Field(True, description="divide by the weights of the sign-agreeing entries")
    rescale: bool = Field(False, description="scale each trimmed task vector back to its L1 norm (mergekit)")


class DareParams(TaskArithmeticParams):
    rescale: bool = Field(True, description="scale the kept elements back to the task vector's L1 norm (mergekit)")
    seed: int = Field(0, description="seed of the drop masks; same seed, same merge")


MergeFn = Callable[[Optional[Tensor], Sequence[Tensor], Sequence[BaseModel], BaseModel, str], Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A registered operator plus the parameter models that describe (and validate) its inputs."""

    name: str
    fn: MergeFn
    model_params: type[Params]
    global_params: type[Params]
    needs_base: bool  # merges task vectors against a base model
    pairwise: bool = False  # exactly one model besides the base (slerp)
    doc: str = ""
    base_optional: bool = False  # uses base_model when one is given, merges the models themselves otherwise
    base_is_model: bool = False  # a given base_model is just one more input model (karcher)
    min_tensors: int = 1  # how many `tensors` (models besides a base) the method needs
    max_tensors: Optional[int] = None
    random: bool = False  # draws random masks from its `seed` parameter
    data_kind: Optional[str] = None  # "fisher" / "gram": statistics of each model on its own `data:`
    # mergekit gives `weight` no default here ("Missing required parameter weight"): a merge YAML
    # must set it per model or globally. Callers that build per-model parameters (genomes,
    # merge specs) always pass one, so the 1.0 default of WeightParams only serves them.
    weight_required: bool = False

    @property
    def uses_base(self) -> bool:
        """Whether a base tensor (when present) is passed as `base` rather than as a model."""
        return self.needs_base or self.pairwise or self.base_optional

    def __call__(self, base: Tensor | None, tensors: Sequence[Tensor], per_model: Sequence[BaseModel],
                 params: BaseModel, *, key: str = "", stats: Optional[Sequence[Optional[Tensor]]] = None) -> Tensor:
        """Check the inputs, pass non-floating tensors through, and run the float32 math.

        `stats` (data methods only): each model's statistic for this tensor, None where it has none.
        """
        if len(per_model) != len(tensors):
            raise ValueError(f"{self.name}: {len(tensors)} tensors but {len(per_model)} parameter sets")
        if (self.needs_base or self.pairwise) and base is None:
            raise ValueError(f"{self.name} needs a base tensor")
        if self.pairwise and len(tensors) != 1:
            raise ValueError(f"{self.name} merges the base with exactly one other tensor, got {len(tensors)}")
        if not self.needs_base and not self.pairwise and not tensors:
            raise ValueError(f"{self.name} needs at least one tensor")
        if tensors and len(tensors) < self.min_tensors:
            raise ValueError(f"{self.name} needs at least {self.min_tensors} models besides the base, "
                             f"got {len(tensors)}")
        if self.max_tensors is not None and len(tensors) > self.max_tensors:
            raise ValueError(f"{self.name} merges at most {self.max_tensors} models besides the base, "
                             f"got {len(tensors)}")
        reference = base if base is not None else tensors[0]
        if any(x.shape != reference.shape for x in tensors):
            raise ValueError(f"{self.name}: shapes differ for {key or 'tensor'}: "
                             f"{[tuple(x.shape) for x in [reference, *tensors]]}")
        if not reference.is_floating_point():
            return reference.clone()  # integer buffers (positions, masks) are not averaged
        if self.needs_base and not tensors:
            return ops.as_f32(base).clone()
        if self.data_kind is not None:
            if stats is None or len(stats) != len(tensors):
                raise ValueError(f"{self.name} needs one {self.data_kind} statistic per model (from `data:`)")
            return self.fn(base, tensors, per_model, params, key, stats)  # type: ignore[call-arg]
        return self.fn(base, tensors, per_model, params, key)

    def params(self, **values: object) -> BaseModel:
        """Global parameters from keywords, e.g. `METHOD.params(t=0.3)` or `params(**{"lambda": 2})`."""
        return self.global_params.model_validate(values)

    def model_params_list(self, weights: Sequence[float], densities: Sequence[float] | None = None,
                          defaults: dict[str, Any] | None = None) -> list[BaseModel]:
        """Per-model parameters from coefficient lists: the shape a layerwise genome produces.

        Values a method does not take are dropped (slerp has no weights; linear no densities).
        `defaults` gives every model the same other parameters (breadcrumbs' gamma, della's epsilon).
        """
        out = []
        for i, weight in enumerate(weights):
            values = {**(defaults or {}), "weight": float(weight)}
            if densities is not None:
                values["density"] = float(densities[i])
            known = {k: v for k, v in values.items() if k in self.model_params.model_fields}
            out.append(self.model_params.model_validate(known))
        return out


def param_names(model: type[BaseModel]) -> list[str]:
    """Names as written in a config (`lambda`, not `lambda_`)."""
    return [field.alias or name for name, field in model.model_fields.items()]


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method")


def register(method: MergeMethod) -> MergeMethod:
    MERGE_METHODS.add(method.name, method)
    return method


def _linear(base: Optional[Tensor], tensors: Sequence[Tensor], per_model: Sequence[Any], params: Any,
            key: str) -> Tensor:
    return ops.weighted_sum(tensors, [p.weight for p in per_model], params.normalize)


def _slerp(base: Optional[Tensor], tensors: Sequence[Tensor], per_model: Sequence[Any], params: Any,
           key: str) -> Tensor:
    return ops.slerp(base, tensors[0], params.t)


def _task_arithmetic(base: Optional[Tensor], tensors: Sequence[Tensor], per_model: Sequence[Any], params: Any,
                     key: str) -> Tensor:
    merged = ops.linear_combine(ops.task_vectors(base, tensors), [p.weight for p in per_model], params.normalize)
    return ops.as_f32(base) + params.lambda_ * merged


def _ties(base: Optional[Tensor], tensors: Sequence[Tensor], per_model: Sequence[Any], params: Any,
          key: str) -> Tensor:
    taus = [ops.magnitude_trim(tau, p.density) for tau, p in zip(ops.task_vectors(base, tensors), per_model)]
    if params.rescale:
        taus = [ops.l1_rescaled(tau, kept) if p.density < 1 else kept
                for tau, kept, p in zip(ops.task_vectors(base, tensors), taus, per_model)]
    merged = ops.ties_combine(taus, [p.weight for p in per_model], params.normalize)
    return ops.as_f32(base) + params.lambda_ * merged


def dare_task_vectors(base: Tensor, tensors: Sequence[Tensor], per_model: Sequence[BaseModel],
                      params: BaseModel, key: str) -> list[Tensor]:
    """Task vectors after DARE's random drop; model i's mask comes from `ops.dare_seed(seed, key, i)`."""
    taus = []
    for i, (tau, p) in enumerate(zip(ops.task_vectors(base, tensors), per_model)):
        generator = torch.Generator().manual_seed(ops.dare_seed(params.seed, key, i))
        taus.append(ops.dare_drop(tau, p.density, params.rescale, generator))
    return taus


def _dare_linear(base: Optional[Tensor], tensors: Sequence[Tensor], per_model: Sequence[Any], params: Any,
                 key: str) -> Tensor:
    taus = dare_task_vectors(base, tensors, per_model, params, key)
    merged = ops.linear_combine(taus, [p.weight for p in per_model], params.normalize)
    return ops.as_f32(base) + params.lambda_ * merged


def _dare_ties(base: Optional[Tensor], tensors: Sequence[Tensor], per_model: Sequence[Any], params: Any,
               key: str) -> Tensor:
    taus = dare_task_vectors(base, tensors, per_model, params, key)
    merged = ops.ties_combine(taus, [p.weight for p in per_model], params.normalize)
    return ops.as_f32(base) + params.lambda_ * merged


LINEAR = register(MergeMethod("linear", _linear, WeightParams, LinearParams, needs_base=False,
                              weight_required=True, doc="model soup: Σ w_i θ_i (/ Σ w_i)"))
SLERP = register(MergeMethod("slerp", _slerp, NoModelParams, SlerpParams, needs_base=False, pairwise=True,
                             doc="spherical interpolation from base_model (t=0) to the other model"))
TASK_ARITHMETIC = register(MergeMethod("task_arithmetic", _task_arithmetic, WeightParams, TaskArithmeticParams,
                                       needs_base=True, weight_required=True, doc="θ_base + λ Σ w_i (θ_i − θ_base)"))
TIES = register(MergeMethod("ties", _ties, SparseParams, TiesParams, needs_base=True, weight_required=True,
                            doc="trim to top-density magnitudes, elect signs, disjoint mean"))
DARE_LINEAR = register(MergeMethod("dare_linear", _dare_linear, SparseParams, DareParams, needs_base=True,
                                   weight_required=True, doc="random drop (1 − density) + rescale, then task arithmetic"))
DARE_TIES = register(MergeMethod("dare_ties", _dare_ties, SparseParams, DareParams, needs_base=True,
                                 weight_required=True, doc="random drop (1 − density) + rescale, then TIES sign election"))
