"""CMA-ES (pycma) over dense vectors or layerwise merge coefficients, buffered over an async pool.

Buffering. pycma wants whole generations: ask λ, tell λ. The engine instead asks whenever a worker
is free and tells results in completion order, so a plain ask-λ/tell-λ loop would leave workers
idle while a generation's stragglers finish. Here `ask` never returns None: it hands out the λ
samples of the current generation, and once all λ are out but the generation is not complete it
draws *extra* samples from the same (current) distribution with `es.ask(1)`. The generation is
told to pycma with exactly λ results: the first λ of its samples to come back, in completion
order. Each sample is an i.i.d. draw from the current distribution, so any λ of them chosen
without looking at their fitness are a valid generation. In sync dispatch results come back in
id order, so the λ told are exactly the λ regular samples and a fixed seed reproduces the run.
Samples of a generation that was already told (stragglers, unneeded extras) are stale: their
evaluations are accepted and recorded like any other, but left out of the update (injecting
them into the next generation would need pycma's injection bookkeeping in every snapshot for
little gain). The waste is bounded by the number of candidates in flight at a generation
boundary. Failed evaluations get fitness +1, worse than any real one (fitness = −mean score in
[−1, 0]), so they count towards λ and never stall a generation.

Randomness. pycma draws all its normal samples through its `randn` option; we pass a function
that draws from `self.rng` (a numpy Generator seeded by the engine and saved as JSON), so pycma
never touches numpy's global RNG: several strategies can share a process, and the generator
state in a snapshot is the whole random state. Mirrored sampling and TPA step-size adaptation
(pycma's default above 300 dimensions) are turned off, because both pair up specific samples of
a generation, which the completion-order buffer cannot promise; CSA is used instead.

State. pycma objects are not pickled. `state_dict` walks the pycma object (and its sampler,
step-size, diagonal-decoding, fitness-history and best-solution parts) and stores every plain
data attribute: arrays as arrays (shared arrays as aliases, e.g. `es.C is es.sm.C`), floats as
hex strings (exact, and inf/NaN are legal JSON that way), ints, bools and lists as JSON.
`load_state_dict` builds a fresh `cma.CMAEvolutionStrategy` with the same options and assigns
those fields back, and re-inserts the current generation's samples into pycma's archive of
sent solutions, which it needs to map phenotypes back to genotypes under bounds. Samples handed
out but not yet told are kept (float64) by the strategy, keyed by (generation, index) in the
candidate's params, so candidates re-sent after a resume are recognised. tests/test_cmaes.py
proves that a resumed search continues bit-identically.

Genomes. From scratch: a dense vector (x0 = 0). With seeds: a layerwise genome by default
(`evomerge.genomes.layerwise`: per layer-group weights per seed, optional densities; `method` is
any registered merge method with per-model weights or densities, its other parameters fixed by
`parameters`, e.g. `{method: breadcrumbs, parameters: {gamma: 0.02}}`),
or a dense vector starting at the seeds' mean (`genome: dense`, dense seeds only). Layerwise
weights are bounded to `weight_bounds` ([0, 1] by default for every method; widen it, e.g. to
[-1, 2], for task-arithmetic extrapolation), densities to [0.1, 1], with pycma's `bounds`.
Full covariance up to `auto_threshold` dimensions, separable (`CMA_diagonal`) above: a full
covariance of the 19,210-parameter digits MLP would take several GB and seconds per update.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import cma
import numpy as np
from cma.sigma_adaptation import CMAAdaptSigmaCSA
from cma.utilities.utils import ElapsedWCTime
from pydantic import Field, model_validator

from evomerge.genomes.layerwise import (BASE_METHODS, LINEAR_METHODS, SPARSE_METHODS, WEIGHTED_METHODS, LayerGroups,
                                        LayerwiseGenome, LayerwiseSpace, layer_groups)
from evomerge.strategies import STRATEGIES
from evomerge.strategies.base import Candidate, Evaluation, Problem, Strategy, StrategyOptions
from evomerge.strategies.subsets import subset_rng, uniform_subset

FAILED_FITNESS = 1.0  # fitness is -mean(score) in [-1, 0]; a failure ranks below every real result
DENSE_SIGMA0 = 0.05  # digits from scratch: 0.01..0.05 all reach ~0.75 test accuracy in 5k evaluations
LAYERWISE_SIGMA0 = 0.2  # coefficients live in boxes of width ~1
DENSITY_BOUNDS = (0.1, 1.0)
DENSITY_X0 = 0.5
STATE_FORMAT = 1


class CMAESOptions(StrategyOptions):
    genome: Literal["auto", "dense", "layerwise"] = Field(
        "auto", description="auto: dense from scratch, layerwise with seeds")
    sigma0: float | None = Field(None, gt=0, description=f"None: {DENSE_SIGMA0} dense, {LAYERWISE_SIGMA0} layerwise")
    popsize: int | None = Field(None, ge=2, description="λ; None: pycma's 4 + 3 ln(n)")
    diagonal: Literal["auto"] | bool = Field(
        "auto", description="separable CMA (CMA_diagonal); auto: above auto_threshold")
    auto_threshold: int = Field(2000, ge=1, description="dimension above which diagonal=auto goes separable")
    method: str = Field("linear", description="a merge method with per-model weights or densities "
                        "(linear, task_arithmetic, ties, dare_ties, breadcrumbs, della, pcb, star, tsv, ...)")
    parameters: dict[str, Any] = Field(default_factory=dict, description="the method's fixed other parameters")
    base: int = Field(0, ge=0, description="base seed of the methods that merge task vectors")
    group_size: int = Field(1, ge=1, description="transformer layers per layer group")
    boundaries: list[int] | None = Field(None, description="explicit group boundaries over the flat layout")
    density: bool | None = Field(None, description="search per-group densities; None: for ties/dare_ties only")
    weight_bounds: tuple[float, float] = (0.0, 1.0)
    max_param_coefficients: int = Field(64, ge=0, description="record coefficients as Optuna params up to this many")

    @model_validator(mode="after")
    def _check(self) -> "CMAESOptions":
        lo, hi = self.weight_bounds
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"strategy.options.weight_bounds must be finite with low < high, got {self.weight_bounds}")
        if self.method not in WEIGHTED_METHODS:
            raise ValueError(f"strategy.options.method: {self.method!r} is not a merge method with per-model "
                             f"weights or densities; choose one of {', '.join(WEIGHTED_METHODS.names())}")
        if self.density and self.method not in SPARSE_METHODS:
            raise ValueError(f"strategy.options.density needs a method with densities ({', '.join(SPARSE_METHODS.names())}; "
                             f"method {self.method} keeps every parameter); drop density or change the method")
        if self.parameters:
            try:  # the genome checks names and values against the method's parameter models
                LayerwiseGenome(self.method, np.ones((1, 2)), None, 0, np.array([0, 1]), None, dict(self.parameters))
            except ValueError as exc:
                raise ValueError(f"strategy.options.parameters: {exc}") from None
        return self


# -- genome coders: CMA's x <-> the genome a worker evaluates -----------------------------------
class _DenseCoder:
    bounded = False

    def __init__(self, problem: Problem) -> None:
        space = problem.space
        if space.kind != "dense":
            raise ValueError("strategy.options.genome=dense needs dense seeds (or none); checkpoint seeds are "
                             "merged with genome: layerwise")
        self.dimension = int(space.size)
        if space.num_seeds:
            self.x0 = np.mean(np.stack([np.asarray(s, np.float64) for s in space.seeds]), axis=0)
        else:
            self.x0 = np.zeros(self.dimension)
        self.bounds = None

    def decode(self, x: np.ndarray) -> np.ndarray:
        return x.astype(np.float32)

    def params(self, x: np.ndarray) -> dict[str, float]:
        return {}


class _LayerwiseCoder:
    """x = [weights of the searched seeds per group, then densities per group] (row-major)."""

    bounded = True

    def __init__(self, problem: Problem, opts: CMAESOptions) -> None:
        if problem.from_scratch:
            raise ValueError("strategy.options.genome=layerwise needs seeds to merge; use genome: dense from scratch")
        if isinstance(problem.space, LayerwiseSpace):
            problem.space = problem.space.inner
        if problem.space.kind == "recipe" and (opts.method not in LINEAR_METHODS or opts.parameters):
            # Checkpoint seeds + a non-linear method: members are LayerwiseGenomes, so the population must be
            # able to snapshot those (recipes stay recipes).
            problem.space = LayerwiseSpace(problem.space)
        space = self.space = problem.space
        self.groups = _resolve_groups(problem, opts)
        if self.groups.size != space.size:
            raise ValueError(f"layer groups cover {self.groups.size} parameters but the problem has {space.size}")
        self.method = opts.method
        self.settings = dict(opts.parameters)
        k = space.num_seeds
        self.base = opts.base if opts.method in BASE_METHODS else None
        if self.base is not None and self.base >= k:
            raise ValueError(f"strategy.options.base={opts.base} but there are only {k} seeds (0..{k - 1})")
        if self.base is not None and k < 2:
            raise ValueError(f"method {opts.method} needs at least two seeds: a base and one to merge into it")
        self.cols = [j for j in range(k) if j != self.base]
        self.density = (opts.method in SPARSE_METHODS and opts.method not in LINEAR_METHODS
                        if opts.density is None else bool(opts.density))
        g, c = self.groups.num_groups, len(self.cols)
        self.num_weights = g * c
        self.dimension = self.num_weights * (2 if self.density else 1)
        lo, hi = opts.weight_bounds
        w, d = self.num_weights, self.dimension - self.num_weights
        self.x0 = np.concatenate([np.full(w, min(max(1.0 / k, lo), hi)), np.full(d, DENSITY_X0)])
        lower = np.concatenate([np.full(w, lo), np.full(d, DENSITY_BOUNDS[0])])
        upper = np.concatenate([np.full(w, hi), np.full(d, DENSITY_BOUNDS[1])])
        self.bounds = [lower.tolist(), upper.tolist()]
        self.record = self.dimension <= opts.max_param_coefficients
        self.basis = None
        if space.kind == "dense":  # small in-memory seeds: materialise here, workers get plain vectors
            from evomerge.strategies.merge_specs import dense_basis

            self.basis = dense_basis(space.seeds, getattr(problem.task, "layout", None))

    def genome(self, x: np.ndarray) -> LayerwiseGenome:
        g, k = self.groups.num_groups, self.space.num_seeds
        weights = np.zeros((g, k))
        weights[:, self.cols] = x[:self.num_weights].reshape(g, len(self.cols))
        densities = None
        if self.density:
            densities = np.ones((g, k))
            densities[:, self.cols] = np.clip(x[self.num_weights:].reshape(g, len(self.cols)), *DENSITY_BOUNDS)
        return LayerwiseGenome(self.method, weights, densities, self.base, self.groups.boundaries,
                               self.groups.segment_group, self.settings)

    def decode(self, x: np.ndarray) -> Any:
        genome = self.genome(x)
        if self.basis is not None:
            return genome.materialise(self.basis).numpy().copy()
        return genome.to_recipe() if genome.is_linear else genome

    def params(self, x: np.ndarray) -> dict[str, float]:
        if not self.record:
            return {}
        c = len(self.cols)
        out: dict[str, float] = {}
        for i in range(self.num_weights):
            out[f"w_g{i // c}_s{self.cols[i % c]}"] = float(x[i])
        for i in range(self.dimension - self.num_weights):
            out[f"d_g{i // c}_s{self.cols[i % c]}"] = float(x[self.num_weights + i])
        return out


def _resolve_groups(problem: Problem, opts: CMAESOptions) -> LayerGroups:
    """Explicit boundaries; else the checkpoints' (or the task's) tensor layout; else one group."""
    if opts.boundaries is not None:
        return layer_groups(opts.boundaries)
    task = getattr(problem, "task", None)
    for owner in (getattr(problem, "basis", None), task, problem):
        layout = getattr(owner, "layout", None)
        if layout is not None and getattr(layout, "tensors", None) is not None:
            return layer_groups(layout, opts.group_size)
    return layer_groups(int(problem.space.size))


# -- the strategy --------------------------------------------------------------------------------
@STRATEGIES.register("cmaes")
class CMAES(Strategy):
    """Subsampling (`fitness.subsample`): every sample of a generation is scored on one subset,
    drawn uniformly from the generation's own seed (subsets.subset_rng(seed, generation)), so the
    ranking pycma sees compares like with like; the next generation draws afresh. Nothing to
    snapshot: the subset is a function of the generation. No top-up: pycma needs ranks only."""

    Options = CMAESOptions
    supports_scratch = True
    supports_seeds = True
    supports_subsample = True

    def __init__(self, options: dict[str, Any] | CMAESOptions, problem: Problem, seed: int) -> None:
        super().__init__(options, problem, seed)
        opts = self.options
        kind = opts.genome
        if kind == "auto":
            kind = "dense" if problem.from_scratch else "layerwise"
        self.kind = kind
        self.coder: _DenseCoder | _LayerwiseCoder = (_DenseCoder(problem) if kind == "dense"
                                                     else _LayerwiseCoder(problem, opts))
        self.space = problem.space  # after the coder: layerwise TIES/DARE over checkpoints wraps it
        self.n = self.coder.dimension
        self.diagonal = self.n > opts.auto_threshold if opts.diagonal == "auto" else bool(opts.diagonal)
        self.sigma0 = opts.sigma0 or (DENSE_SIGMA0 if kind == "dense" else LAYERWISE_SIGMA0)
        self.es = self._new_es()
        self.lam = int(self.es.popsize)
        self.seeds_issued = 0
        self.samples: list[np.ndarray] = []  # phenotypes of the current generation, by index
        self.genos: list[np.ndarray] = []  # their genotypes (differ from samples under bounds)
        self.issued = 0  # samples of the current generation handed out so far
        self.results: list[tuple[int, float]] = []  # (index, fitness) in completion order
        self.best_train: float | None = None
        self.updates = 0  # generations told to pycma (== es.countiter)
        self.stale = 0  # evaluations that came back after their generation was updated
        n = problem.num_datapoints
        self.subset_size = problem.subsample.resolve(n) if problem.subsample is not None else n
        self.subset_seed = seed

    def _new_es(self) -> cma.CMAEvolutionStrategy:
        strategy = self

        def randn(*shape: int) -> np.ndarray:  # a closure, not a bound method: pycma deep-copies options
            return strategy.rng.standard_normal(shape)

        opts: dict[str, Any] = {
            "CMA_diagonal": self.diagonal, "randn": randn, "seed": float("nan"),  # nan: never touch np.random
            "AdaptSigma": CMAAdaptSigmaCSA, "CMA_mirrors": 0,
            "verbose": -9, "verb_log": 0, "verb_disp": 0, "verb_plot": 0,
        }
        if self.options.popsize is not None:
            opts["popsize"] = self.options.popsize
        if self.coder.bounds is not None:
            opts["bounds"] = self.coder.bounds
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cma.CMAEvolutionStrategy(self.coder.x0, self.sigma0, opts)

    @property
    def generation(self) -> int:
        """1-based CMA generation of the samples being handed out (the seeds are generation 0)."""
        return self.updates + 1

    # -- ask -------------------------------------------------------------------------------------
    def ask(self) -> Candidate | None:
        if self.seeds_issued < self.space.num_seeds:
            index = self.seeds_issued
            self.seeds_issued += 1
            return Candidate(genome=self.space.seed_genome(index), params={}, parents=(), generation=0)
        if not self.samples:
            self._sample(self.lam)  # a new generation
        elif self.issued == len(self.samples):
            self._sample(1)  # all λ are out: keep the pool busy from the current distribution
        index = self.issued
        self.issued += 1
        x = self.samples[index]
        params: dict[str, float | int] = {"generation": self.generation, "index": index, **self.coder.params(x)}
        candidate = Candidate(genome=self.coder.decode(x), params=params, parents=(), generation=self.generation)
        if self.subset_size < self.problem.num_datapoints:
            candidate.indices = self.generation_subset(self.generation)
        return candidate

    def generation_subset(self, generation: int) -> np.ndarray:
        """The datapoints every sample of `generation` is scored on."""
        return uniform_subset(self.problem.num_datapoints, self.subset_size, subset_rng(self.subset_seed, generation))

    def _sample(self, number: int) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            phenos = self.es.ask(number)
        for x in phenos:
            entry = self.es.sent_solutions[x]
            # pycma's genotype is a row of a (possibly Fortran-ordered) batch; a contiguous copy in
            # its archive is what a resumed run re-inserts, so both runs hold the same layout.
            entry["geno"] = np.array(entry["geno"], dtype=np.float64, order="C")
            self.samples.append(np.array(x, dtype=np.float64))
            self.genos.append(entry["geno"])

    # -- tell ------------------------------------------------------------------------------------
    def tell(self, candidate: Candidate, evaluation: Evaluation) -> None:
        train = evaluation.train_score
        if train is not None and math.isfinite(train) and (self.best_train is None or train > self.best_train):
            self.best_train = float(train)
        if "generation" not in candidate.params:
            return  # a seed: evaluated for the record, not a sample of the distribution
        generation, index = int(candidate.params["generation"]), int(candidate.params["index"])
        if generation != self.generation or not 0 <= index < self.issued or any(i == index for i, _ in self.results):
            self.stale += 1  # its generation was updated without it
            return
        fitness = FAILED_FITNESS if train is None or not math.isfinite(train) else -train
        self.results.append((index, fitness))
        if len(self.results) == self.lam:
            self._update()

    def _update(self) -> None:
        told = {i for i, _ in self.results}
        solutions = [self.samples[i] for i, _ in self.results]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es.tell(solutions, [f for _, f in self.results])
        for i, x in enumerate(self.samples):  # samples left out: drop them from pycma's archive too
            if i not in told:
                self.es.sent_solutions.pop(x, None)
        self.samples, self.genos, self.results, self.issued = [], [], [], 0
        self.updates += 1

    # -- state -----------------------------------------------------------------------------------
    def _shape_meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "n": self.n, "lam": self.lam, "diagonal": self.diagonal}

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        es_meta, es_arrays = encode_es(self.es)
        meta = {
            "format": STATE_FORMAT, **self._shape_meta(), "rng": self._rng_state(),
            "seeds_issued": self.seeds_issued, "issued": self.issued, "updates": self.updates, "stale": self.stale,
            "results": [[i, f.hex()] for i, f in self.results],
            "best_train": self.best_train, "es": es_meta,
        }
        shape = (len(self.samples), self.n)
        arrays = {"samples": np.array(self.samples, dtype=np.float64).reshape(shape),
                  "genos": np.array(self.genos, dtype=np.float64).reshape(shape),
                  **{f"es/{k}": v for k, v in es_arrays.items()}}
        return meta, arrays

    def load_state_dict(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"cmaes state format {meta.get('format')!r} is not {STATE_FORMAT}; resume with "
                             "the evomerge version that wrote the snapshot")
        saved = {k: meta[k] for k in self._shape_meta()}
        if saved != self._shape_meta():
            raise ValueError(f"snapshot CMA-ES is {saved} but this search builds {self._shape_meta()}; "
                             "the strategy options or the problem changed since the snapshot")
        self._set_rng_state(meta["rng"])
        self.seeds_issued, self.issued = int(meta["seeds_issued"]), int(meta["issued"])
        self.updates, self.stale = int(meta["updates"]), int(meta["stale"])
        self.results = [(int(i), float.fromhex(f)) for i, f in meta["results"]]
        self.best_train = None if meta["best_train"] is None else float(meta["best_train"])
        self.samples = [np.array(x) for x in arrays["samples"]]
        self.genos = [np.array(x) for x in arrays["genos"]]
        self.es = self._new_es()
        fields = meta["es"]
        iteration = _decode(fields[""]["countiter"], arrays, {})
        for x, geno in zip(self.samples, self.genos):  # what pycma archived when it sampled them
            self.es.sent_solutions.insert(x, geno=geno, iteration=iteration)
        decode_es_into(self.es, fields, {k[3:]: v for k, v in arrays.items() if k.startswith("es/")})
        self.es.timer = ElapsedWCTime()  # wall-clock only; pycma makes it in its first ask
        if int(self.es.countiter) != self.updates:
            raise ValueError("inconsistent cmaes snapshot: pycma's iteration count disagrees with the strategy's")

    def archive_summary(self) -> dict[str, Any]:
        return {"generation": self.updates, "popsize": self.lam, "sigma": float(self.es.sigma),
                "dimension": self.n, "diagonal": self.diagonal, "stale": self.stale, "best_train": self.best_train}


# -- pycma state codec: plain data attributes, no pickle ----------------------------------------
# The parts of a CMAEvolutionStrategy that change while it runs; everything else (options,
# strategy parameters, bound transforms, loggers) is rebuilt identically from the options.
ES_PARTS = ("", "sm", "adapt_sigma", "sigma_vec", "fit", "best", "best.last", "_stoptolxstagnation",
            "sent_solutions")
_TRANSIENT = frozenset({"ary", "pop", "pop_sorted", "_tell2_args"})  # scratch of the last ask/tell
_SKIP = object()


def _part(es: Any, path: str) -> Any:
    obj = es
    for name in filter(None, path.split(".")):
        obj = getattr(obj, name, None)
    return obj


def encode_es(es: cma.CMAEvolutionStrategy) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    fields: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    seen: dict[int, str] = {}
    for path in ES_PARTS:
        obj = _part(es, path)
        if obj is None:
            continue
        out = {}
        for name, value in sorted(vars(obj).items()):
            if name in _TRANSIENT:
                continue
            encoded = _encode(value, f"{path}.{name}", arrays, seen)
            if encoded is not _SKIP:
                out[name] = encoded
        fields[path] = out
    return fields, arrays


def decode_es_into(es: cma.CMAEvolutionStrategy, fields: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    restored: dict[str, np.ndarray] = {}
    for path, values in fields.items():
        obj = _part(es, path)
        if obj is None:
            raise ValueError(f"cmaes snapshot has state for es.{path}, which this pycma version lacks")
        for name, encoded in values.items():
            setattr(obj, name, _decode(encoded, arrays, restored))


def _encode(value: Any, key: str, arrays: dict[str, np.ndarray], seen: dict[int, str]) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if type(value) is int:
        return value
    if type(value) is float:
        return {"float": value.hex()}
    if isinstance(value, np.generic):
        if value.dtype.kind == "f":
            return {"np": value.dtype.str, "float": float(value).hex()}
        if value.dtype.kind in "iu":
            return {"np": value.dtype.str, "int": int(value)}
        if value.dtype.kind == "b":
            return {"np": value.dtype.str, "bool": bool(value)}
        return _SKIP
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            return _SKIP
        if id(value) in seen:  # the same array reachable twice (es.C is es.sm.C): keep it shared
            return {"array": seen[id(value)]}
        seen[id(value)] = key
        arrays[key] = np.array(value, copy=True)
        if value.ndim == 0 or value.flags.c_contiguous:
            return {"array": key}
        # Keep the memory layout too (eigh returns Fortran-ordered B; some fields are strided
        # views): BLAS sums in a layout-dependent order, so a C-ordered copy drifts in the last bits.
        return {"array": key, "strides": list(value.strides)}
    if type(value) in (list, tuple):
        items = [_encode(v, f"{key}.{i}", arrays, seen) for i, v in enumerate(value)]
        if any(item is _SKIP for item in items):
            return _SKIP
        return {"list" if type(value) is list else "tuple": items}
    if type(value) is dict:  # small caches of numbers (sampler parameters); never archives of arrays
        inner: dict[str, np.ndarray] = {}
        items = [[_encode(k, key, inner, {}), _encode(v, key, inner, {})] for k, v in value.items()]
        if inner or any(part is _SKIP for item in items for part in item):
            return _SKIP
        return {"dict": items}
    return _SKIP


def _decode(encoded: Any, arrays: dict[str, np.ndarray], restored: dict[str, np.ndarray]) -> Any:
    if not isinstance(encoded, dict):
        return encoded
    if "array" in encoded:
        key = encoded["array"]
        if key not in restored:
            restored[key] = _with_strides(arrays[key], encoded.get("strides"))
        return restored[key]
    if "list" in encoded:
        return [_decode(v, arrays, restored) for v in encoded["list"]]
    if "tuple" in encoded:
        return tuple(_decode(v, arrays, restored) for v in encoded["tuple"])
    if "dict" in encoded:
        return {_decode(k, arrays, restored): _decode(v, arrays, restored) for k, v in encoded["dict"]}
    if "np" in encoded:
        dtype = np.dtype(encoded["np"])
        raw = float.fromhex(encoded["float"]) if "float" in encoded else encoded.get("int", encoded.get("bool"))
        return dtype.type(raw)
    if "float" in encoded:
        return float.fromhex(encoded["float"])
    raise ValueError(f"unrecognised entry in a cmaes snapshot: {encoded!r}")


def _with_strides(values: np.ndarray, strides: list[int] | None) -> np.ndarray:
    """A writable copy of `values` laid out in memory with `strides` (C order when None)."""
    if strides is None or values.size == 0:
        return np.array(values, copy=True, order="C")
    item = values.itemsize
    if any(st <= 0 or st % item for st in strides):  # broadcast or reversed views: values are what count
        return np.array(values, copy=True, order="C")
    span = 1 + sum((n - 1) * st // item for n, st in zip(values.shape, strides))
    out = np.lib.stride_tricks.as_strided(np.zeros(span, dtype=values.dtype), values.shape, tuple(strides))
    out[...] = values
    return out
