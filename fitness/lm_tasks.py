"""Causal-LM fitness tasks over prompt/answer JSONL: exact match by greedy generation, and answer likelihood.

The architecture, tokenizer and chat template come from the first seed (or `fitness.options.model`);
no weights are read. On first use the task builds a weightless skeleton and binds each parameter,
by name, to a view of one flat buffer in the seeds' dtype on the worker's device (`fitness/lm_binding.py`).
The worker materialises every candidate straight into that buffer, so the model's weights change in
place; other inputs (a numpy vector, in tests and tools) are copied into it.

Per-datapoint scores are 1/0, which is what M2N2's niches are built from. Listing several data
files (one per skill) makes the fitness cover all skills, datapoints in file order. With
`groups`, each data file (or each run of files given the same name) is a group: one objective of
the Optuna study, and test scores per group from `test_data` listed in the same order.

Non-finite candidates (NaN/inf anywhere in the weights) score 0 on every datapoint instead of
raising: a wild merge is a bad candidate, not a failed evaluation.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.tasks import TASKS, FitnessTask, check_indices
from fitness.lm_data import Example, read_examples, resolve
from fitness.lm_scoring import (
    answer_likelihood_scores, exact_match_scores, load_causal_lm, load_tokenizer, normalize_answer, torch_threads,
)

__all__ = [
    "LMExactMatchTask", "LMAnswerLikelihoodTask", "LMTaskOptions", "LMModelOptions", "BoundLMTask", "exact_match_scores",
    "answer_likelihood_scores", "flat_params_of", "load_causal_lm", "read_examples", "normalize_answer",
]


# ---------------------------------------------------------------------------------------------
# flat layout (shared with the engine: `evomerge.models`)


def _layout_of(folder: Path):
    from evomerge.models import build_layout, open_checkpoint

    with open_checkpoint(folder) as ckpt:
        return build_layout(ckpt)


def flat_params_of(path: str | Path) -> np.ndarray:
    """The checkpoint at `path` as one flat float32 vector in the engine's layout (for tests and tools)."""
    from evomerge.models import build_layout, open_checkpoint, read_flat

    with open_checkpoint(resolve(path, kind="dir")) as ckpt:
        return read_flat(ckpt, build_layout(ckpt)).numpy()


# ---------------------------------------------------------------------------------------------
# tasks


class LMModelOptions(BaseModel):
    """The options every task that scores a bound causal LM shares (also `fitness/lm_eval_task.py`)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="HF folder giving the architecture, tokenizer and chat template; default: the first "
                          "seed. Its weights are never read")
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the candidates are merged into and scored in; auto: the seeds' own")
    device: str = Field("auto", description="auto (the worker's GPU when workers.num_gpus > 0, else the CPU), "
                                            "cpu, cuda or cuda:N")
    seeds_on: Literal["auto", "device", "host"] = Field(
        "auto", description="on a GPU: keep the seeds resident on it (device), or in host memory and stream "
                            "them (host); auto: device when the memory plan fits")
    kernel: Literal["auto", "fused", "eager"] = Field(
        "auto", description="materialising a recipe: fused compiles a one-pass kernel with torch.compile (needs a "
                            "C++ compiler on CPU, Triton on GPU; about 2x faster, the same bits); eager never "
                            "compiles; auto: fused for merges of 67M parameters or more")
    threads: int | None = Field(
        None, ge=1, description="torch threads while scoring on the CPU (restored after); default: the worker's "
                                "workers.num_cpus, or torch's own setting outside a worker")


def _file_group_names(opts: LMTaskOptions) -> list[str]:
    """The group each data file belongs to, in data order."""
    if opts.groups is True:
        names = [Path(path).stem for path in opts.data]
        if len(set(names)) != len(names):
            raise ValueError(f"groups: true names each group after its data file's stem, and {names} repeat; "
                             "give the names as a list instead")
        return names
    if isinstance(opts.groups, list):
        if len(opts.groups) != len(opts.data):
            raise ValueError(f"groups: give one name per data file ({len(opts.data)}), got {len(opts.groups)}")
        return list(opts.groups)
    return []


def _merge_runs(names: list[str], sizes: list[int]) -> list[tuple[str, int]]:
    """Adjacent files with the same group name as one group of their summed size."""
    groups: list[tuple[str, int]] = []
    for name, size in zip(names, sizes):
        if groups and groups[-1][0] == name:
            groups[-1] = (name, groups[-1][1] + size)
        else:
            groups.append((name, size))
    return groups


class LMTaskOptions(LMModelOptions):
    data: list[str] = Field(min_length=1, description="training JSONL files; scores are per line, files in order")
    test_data: list[str] = Field(default_factory=list, description="held-out JSONL files for test_score")
    max_new_tokens: int = Field(8, ge=1)
    batch_size: int = Field(64, ge=1)
    normalize: Literal["none", "strip", "lower"] = Field(
        "strip", description="answer normalisation before comparing: none, strip whitespace, or strip + lowercase")
    chat_template: bool = Field(False, description="wrap each prompt as a user message in the tokenizer's chat "
                                                   "template (instruct checkpoints)")
    limit: int | None = Field(None, ge=1, description="use only the first N lines of each file")
    include_eos: bool = Field(True, description="likelihood task: the answer must also be followed by EOS")
    groups: bool | list[str] = Field(
        False, description="one group (study objective) per data file: true names each after its file's stem; "
                           "a list gives one name per data file, adjacent files with the same name forming one "
                           "group. test_data, if any, must then list one file per data file, in the same order")

    @model_validator(mode="after")
    def _check_groups(self) -> "LMTaskOptions":
        if self.groups is False:
            return self
        names = _file_group_names(self)
        seen: set[str] = set()
        for i, name in enumerate(names):
            if not name:
                raise ValueError("groups: a group name must not be empty")
            if name in seen and names[i - 1] != name:
                raise ValueError(f"groups: the files of group {name!r} must be adjacent in data")
            seen.add(name)
        if self.test_data and len(self.test_data) != len(self.data):
            raise ValueError(f"groups: test_data must list one file per data file, in the same order "
                             f"({len(self.data)} data files, {len(self.test_data)} test_data files)")
        return self


class BoundLMTask(FitnessTask):
    """A causal LM whose parameters view one flat candidate buffer; subclasses score it.

    Gives `candidate_buffer`, `_bind`, `model`, `tokenizer`, `device`, `dtype`, `dimension` and
    `export` to any task whose options extend `LMModelOptions`.
    """

    Options = LMModelOptions

    def __init__(self, options: dict[str, Any] | BaseModel | None = None, seed: int = 0) -> None:
        super().__init__(options, seed=seed)
        opts: LMModelOptions = self.options  # type: ignore[assignment]
        self.model_dir = resolve(opts.model, kind="dir") if opts.model else None
        self._layout = None
        self._model = None  # built on first use: the population actor and the driver never build one
        self._tokenizer = None
        self._flat = None  # the candidate buffer every parameter views
        self._plan = None

    # -- what the engine tells us ------------------------------------------------------------
    def attach(self, context) -> None:
        if self._model is not None:
            raise RuntimeError("attach the task before its first evaluation")
        super().attach(context)
        if context.layout is not None:
            self._layout = context.layout
        if self.model_dir is None and context.seeds:
            self.model_dir = resolve(context.seeds[0], kind="dir")

    @classmethod
    def preflight(cls, options: dict[str, Any], context) -> None:
        """The seeds' names and shapes against the architecture, on a meta-device model."""
        from fitness.lm_binding import check_binding

        opts = cls.Options.model_validate(options or {})
        folder = opts.model or (context.seeds[0] if context.seeds else None)
        if folder is None or context.layout is None:
            return
        check_binding(resolve(folder, kind="dir"), context.layout, opts.trust_remote_code)

    @property
    def source(self) -> Path:
        if self.model_dir is None:
            raise ValueError("fitness.options.model is not set and the search has no checkpoint seeds; set "
                             "fitness.options.model to an HF folder (its config and tokenizer are used)")
        return self.model_dir

    @property
    def layout(self):
        """The seeds' layout when the engine attached one, else that of `model`'s own checkpoint."""
        if self._layout is None:
            self._layout = _layout_of(self.source)
        return self._layout

    @property
    def dimension(self) -> int:
        return int(self.layout.size)

    # -- the model, built once on first use ---------------------------------------------------
    @property
    def model(self):
        self._ensure_model()
        return self._model

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(str(self.source), self.options.trust_remote_code)
        return self._tokenizer

    @property
    def device(self):
        from evomerge.devices import resolve_device

        return resolve_device(self.options.device, self.context.num_gpus)

    @property
    def dtype(self):
        from evomerge.devices import majority_dtype, resolve_dtype

        return resolve_dtype(self.options.dtype, majority_dtype((t.numel, t.dtype) for t in self.layout.tensors))

    def candidate_buffer(self):
        """The flat tensor the model's parameters view: materialise a candidate here, then evaluate it."""
        self._ensure_model()
        return self._flat

    def _ensure_model(self) -> None:
        if self._model is not None:
            return
        import torch

        from fitness.lm_binding import bind, build_skeleton, move_buffers, plan_binding

        device, dtype = self.device, self.dtype
        if device.type == "cpu":
            from evomerge.devices import cpu_lacks_native, slow_cpu_dtype_advice

            if cpu_lacks_native(dtype):  # said once per worker, in its log (the plan says it at start too)
                logging.getLogger(__name__).warning("fitness worker: %s", slow_cpu_dtype_advice(dtype))
        model = build_skeleton(self.source, dtype, self.options.trust_remote_code)
        plan = plan_binding(model, self.layout, str(self.source))
        flat = torch.zeros(self.layout.size, dtype=dtype, device=device)
        move_buffers(model, device)
        bind(plan, flat)
        self._model, self._plan, self._flat = model, plan, flat

    def _threads(self) -> int | None:
        if self.options.threads is not None:
            return self.options.threads
        cpus = self.context.num_cpus
        return max(1, int(cpus)) if cpus and self._flat is not None and self._flat.device.type == "cpu" else None

    def _bind(self, params) -> bool:
        """Make the model's weights `params`; False (scores of 0) if they are not all finite."""
        import torch

        from fitness.lm_binding import all_finite, copy_buffers

        self._ensure_model()
        flat = self._flat
        if params is not flat:
            if isinstance(params, torch.Tensor):
                src = params.detach().reshape(-1) if params.dim() == 1 else params
            else:
                arr = np.asarray(params)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # read-only arrays (Ray, mmap): only read
                    src = torch.from_numpy(arr if arr.dtype != np.float64 else arr.astype(np.float32))
            if src.dim() != 1 or src.shape[0] != self.dimension:
                raise ValueError(f"expected a flat vector of {self.dimension} parameters (the seeds' layout), "
                                 f"got shape {tuple(src.shape)}")
            flat.copy_(src)
        if not all_finite(flat):
            return False
        copy_buffers(self._plan, flat)
        return True

    def export(self, params: np.ndarray, out_dir: Path) -> list[Path]:
        """A HF folder (config and tokenizer of the source folder, these weights by name) that `from_pretrained` opens."""
        import torch

        from evomerge.models import save_model_folder
        from evomerge.models.save import HF_NAMES

        arr = np.ascontiguousarray(params, dtype=np.float32)
        if arr.shape != (self.dimension,):
            raise ValueError(f"expected {self.dimension} parameters, got shape {arr.shape}")
        flat = torch.from_numpy(arr)
        tensors = {spec.name: flat[spec.offset:spec.offset + spec.numel].view(spec.shape)
                   for spec in self.layout.tensors}
        out = save_model_folder(tensors, Path(out_dir), source=self.source, dtype=HF_NAMES[self.dtype])
        return sorted(p for p in Path(out).iterdir() if p.is_file())


class _LMTask(BoundLMTask):
    """Prompt/answer JSONL files, one datapoint per line."""

    Options = LMTaskOptions
    supports_subsample = True  # one prompt per datapoint: a subset is the chosen prompts

    def __init__(self, options: dict[str, Any] | BaseModel | None = None, seed: int = 0) -> None:
        super().__init__(options, seed=seed)
        opts: LMTaskOptions = self.options  # type: ignore[assignment]
        train_files = [read_examples(path, opts.limit) for path in opts.data]
        test_files = [read_examples(path, opts.limit) for path in opts.test_data]
        self.train_examples = [row for rows in train_files for row in rows]
        self.test_examples = [row for rows in test_files for row in rows]
        names = _file_group_names(opts)
        self._groups = _merge_runs(names, [len(rows) for rows in train_files]) if names else None
        self._test_groups = (_merge_runs(names, [len(rows) for rows in test_files])
                             if names and test_files else None)

    @property
    def num_datapoints(self) -> int:
        return len(self.train_examples)

    def _scores(self, examples: list[Example]) -> np.ndarray:
        raise NotImplementedError

    def evaluate(self, params, indices: np.ndarray | None = None) -> np.ndarray:
        idx = check_indices(self, indices)
        examples = self.train_examples if idx is None else [self.train_examples[i] for i in idx]
        if not self._bind(params):
            return self._nonfinite(len(examples))
        with torch_threads(self._threads()):
            return self._scores(examples)

    @property
    def groups(self) -> list[tuple[str, int]] | None:
        """With `groups`: (name, training datapoints) per group, in data order."""
        return self._groups

    def held_out(self, params) -> tuple[float | None, dict[str, float] | None]:
        """The mean over all test data and, with `groups`, per group: one pass over test_data."""
        if not self.test_examples:
            return None, None
        if not self._bind(params):
            scores = self._nonfinite(len(self.test_examples))
        else:
            with torch_threads(self._threads()):
                scores = np.asarray(self._scores(self.test_examples))
        by_group = None
        if self._test_groups is not None:
            by_group, start = {}, 0
            for name, size in self._test_groups:
                by_group[name] = float(scores[start:start + size].mean())
                start += size
        return float(scores.mean()), by_group

    def test_score(self, params) -> float | None:
        return self.held_out(params)[0]

    def test_scores(self, params) -> dict[str, float] | None:
        return self.held_out(params)[1]

    def _nonfinite(self, n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.float32)


@TASKS.register("lm_exact_match")
class LMExactMatchTask(_LMTask):
    """1 where the greedy continuation, cut at EOS or newline and normalised, equals the answer."""

    def __init__(self, options: dict[str, Any] | BaseModel | None = None, seed: int = 0) -> None:
        super().__init__(options, seed=seed)
        self.last_answers: list[str] = []

    def _scores(self, examples: list[Example]) -> np.ndarray:
        o: LMTaskOptions = self.options  # type: ignore[assignment]
        scores, self.last_answers = exact_match_scores(self.model, self.tokenizer, examples,
                                                       max_new_tokens=o.max_new_tokens, batch_size=o.batch_size,
                                                       normalize=o.normalize, chat_template=o.chat_template)
        return scores

    def _nonfinite(self, n: int) -> np.ndarray:
        self.last_answers = [""] * n
        return super()._nonfinite(n)


@TASKS.register("lm_answer_likelihood")
class LMAnswerLikelihoodTask(_LMTask):
    """Teacher-forced: 1 where every answer token is the argmax; `last_logprobs` holds the mean log-probs."""

    def __init__(self, options: dict[str, Any] | BaseModel | None = None, seed: int = 0) -> None:
        super().__init__(options, seed=seed)
        self.last_logprobs = np.zeros(0, dtype=np.float32)

    def _scores(self, examples: list[Example]) -> np.ndarray:
        o: LMTaskOptions = self.options  # type: ignore[assignment]
        hits, self.last_logprobs = answer_likelihood_scores(self.model, self.tokenizer, examples,
                                                            batch_size=o.batch_size, include_eos=o.include_eos,
                                                            chat_template=o.chat_template)
        return hits

    def _nonfinite(self, n: int) -> np.ndarray:
        self.last_logprobs = np.full(n, -np.inf, dtype=np.float32)
        return super()._nonfinite(n)

    def evaluate_detailed(self, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(1/0 per datapoint, mean answer log-prob per datapoint)."""
        hits = self.evaluate(params)
        return hits, self.last_logprobs.copy()
