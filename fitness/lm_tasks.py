"""Causal-LM fitness tasks over prompt/answer JSONL: exact match by greedy generation, and answer likelihood.

A candidate arrives as one flat float32 vector in the checkpoint layout of `evomerge.models`
(every floating tensor of the checkpoint, in file order). The task builds the model once and, per
evaluation, points every parameter at its slice of that vector: no weights are copied, and a
worker can score thousands of merges with one model object.

Per-datapoint scores are 1/0, which is what M2N2's niches are built from. Listing several data
files (one per skill) makes the fitness cover all skills, datapoints in file order.

Non-finite candidates (NaN/inf anywhere in the vector) score 0 on every datapoint instead of
raising: a wild merge is a bad candidate, not a failed evaluation.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from evomerge.tasks import TASKS, FitnessTask
from fitness.lm_data import Example, read_all, read_examples, resolve
from fitness.lm_scoring import (
    answer_likelihood_scores, exact_match_scores, load_causal_lm, normalize_answer, torch_threads,
)

__all__ = [
    "LMExactMatchTask", "LMAnswerLikelihoodTask", "LMTaskOptions", "exact_match_scores",
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


class LMTaskOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="HF folder giving the architecture and tokenizer (e.g. models/tiny-lm/base)")
    data: list[str] = Field(min_length=1, description="training JSONL files; scores are per line, files in order")
    test_data: list[str] = Field(default_factory=list, description="held-out JSONL files for test_score")
    max_new_tokens: int = Field(8, ge=1)
    batch_size: int = Field(64, ge=1)
    normalize: Literal["none", "strip", "lower"] = Field(
        "strip", description="answer normalisation before comparing: none, strip whitespace, or strip + lowercase")
    trust_remote_code: bool = False
    limit: int | None = Field(None, ge=1, description="use only the first N lines of each file")
    include_eos: bool = Field(True, description="likelihood task: the answer must also be followed by EOS")
    threads: int | None = Field(
        1, ge=1, description="torch threads while scoring (restored after); small models on shared cores "
                             "run many times faster on 1 than on 2 contended threads; null leaves torch's setting")


class _LMTask(FitnessTask):
    Options = LMTaskOptions

    def __init__(self, options: dict[str, Any] | BaseModel | None = None, seed: int = 0) -> None:
        super().__init__(options, seed=seed)
        opts: LMTaskOptions = self.options  # type: ignore[assignment]
        self.model_dir = resolve(opts.model, kind="dir")
        self.model, self.tokenizer = load_causal_lm(str(self.model_dir), opts.trust_remote_code)
        self.layout = _layout_of(self.model_dir)
        self._bind_plan = self._plan_binding()
        self.train_examples = read_all(opts.data, opts.limit)
        self.test_examples = read_all(opts.test_data, opts.limit) if opts.test_data else []
        self._flat = None  # keeps the vector the parameters currently view alive

    def _plan_binding(self) -> list[tuple[Any, int, int, tuple[int, ...]]]:
        """(parameter, offset, numel, shape) per layout tensor; every model parameter must be covered."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        plan, covered = [], set()
        for spec in self.layout.tensors:
            if spec.name not in params:
                raise ValueError(f"checkpoint tensor {spec.name!r} is not a parameter of the "
                                 f"{type(self.model).__name__} built from {self.model_dir}")
            param = params[spec.name]
            if tuple(param.shape) != tuple(spec.shape):
                raise ValueError(f"{spec.name}: layout shape {tuple(spec.shape)} != model shape {tuple(param.shape)}")
            plan.append((param, spec.offset, spec.numel, tuple(spec.shape)))
            covered.add(id(param))
        # Tied weights (lm_head = embedding) share one Parameter object, so covering one covers both.
        missing = [n for n, p in params.items() if id(p) not in covered]
        if missing:
            raise ValueError(f"model parameters absent from the checkpoint layout: {missing[:5]}")
        return plan

    @property
    def dimension(self) -> int:
        return int(self.layout.size)

    @property
    def num_datapoints(self) -> int:
        return len(self.train_examples)

    def _bind(self, params: np.ndarray) -> bool:
        """Point every parameter at its slice of `params`; False (nothing bound) if it is not finite."""
        import torch

        arr = np.asarray(params)
        if arr.ndim != 1 or arr.shape[0] != self.dimension:
            raise ValueError(f"expected a flat vector of {self.dimension} parameters (the layout of "
                             f"{self.model_dir}), got shape {arr.shape}")
        if not np.isfinite(arr).all():
            return False
        # float32 contiguous input (the normal case) is used as is; anything else costs one copy.
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only arrays (Ray, mmap): we never write
            flat = torch.from_numpy(arr)
        for param, offset, numel, shape in self._bind_plan:
            param.data = flat[offset:offset + numel].view(shape)
        self._flat = arr
        return True

    def _scores(self, examples: list[Example]) -> np.ndarray:
        raise NotImplementedError

    def evaluate(self, params: np.ndarray) -> np.ndarray:
        if not self._bind(params):
            return self._nonfinite(len(self.train_examples))
        with torch_threads(self.options.threads):
            return self._scores(self.train_examples)

    def test_score(self, params: np.ndarray) -> float | None:
        if not self.test_examples:
            return None
        if not self._bind(params):
            self._nonfinite(len(self.test_examples))
            return 0.0
        with torch_threads(self.options.threads):
            return float(self._scores(self.test_examples).mean())

    def _nonfinite(self, n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.float32)

    def export(self, params: np.ndarray, out_dir: Path) -> list[Path]:
        """A HF folder (config and tokenizer of `model`, these weights) that `from_pretrained` opens."""
        import torch

        arr = np.ascontiguousarray(params, dtype=np.float32)
        if arr.shape != (self.dimension,):
            raise ValueError(f"expected {self.dimension} parameters, got shape {arr.shape}")
        tensors = {spec.name: torch.from_numpy(arr[spec.offset:spec.offset + spec.numel].reshape(spec.shape).copy())
                   for spec in self.layout.tensors}
        from evomerge.models import save_model_folder

        out = save_model_folder(tensors, Path(out_dir), source=self.model_dir)
        return sorted(p for p in Path(out).iterdir() if p.is_file())


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
                                                       normalize=o.normalize)
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
                                                            batch_size=o.batch_size, include_eos=o.include_eos)
        return hits

    def _nonfinite(self, n: int) -> np.ndarray:
        self.last_logprobs = np.full(n, -np.inf, dtype=np.float32)
        return super()._nonfinite(n)

    def evaluate_detailed(self, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(1/0 per datapoint, mean answer log-prob per datapoint)."""
        hits = self.evaluate(params)
        return hits, self.last_logprobs.copy()
