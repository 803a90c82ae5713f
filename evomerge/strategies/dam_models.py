"""What DAM needs from a fitness task: a `DamModel` (the column layout, each seed's distillation
inputs and a differentiable forward), and the column layout alone.

The layout is all the population actor needs when DAM trains on a worker (`train_on: worker`):
for a causal LM it comes from a meta-device model (module types decide the column axes), so
the population builds no model; the worker builds the DamModel over its own bound model.

A task can provide its own with `task.dam_model(num_seeds)` (and, to keep the population free
of it, `task.dam_layout(num_seeds)`); the digits MLP and the causal-LM tasks have built-in
adapters here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from evomerge.genomes.columns import ColumnLayout


class DamModel(ABC):
    """The column layout, each seed's distillation data, and a differentiable forward of one model."""

    layout: ColumnLayout
    # The dtype the forward runs in: merged weights are cast to it per group (float32 sums are
    # transient). None keeps combine's float32 (digits' float32 MLP).
    weight_dtype: torch.dtype | None = None

    @abstractmethod
    def num_rows(self, seed: int) -> int:
        """How many distillation examples seed `seed` has."""

    @abstractmethod
    def inputs(self, seed: int, rows: np.ndarray) -> Any:
        """Model inputs for those rows of seed `seed`'s data."""

    @abstractmethod
    def logits(self, weights: dict[str, torch.Tensor], inputs: Any) -> torch.Tensor:
        """(N, classes) logits of the model with these weights (by group name); rows are averaged over."""


class DigitsDam(DamModel):
    """The digits MLP: [W1 (64x256, in x out), b1, W2 (256x10), b2]; kernels' input columns are rows.

    Seed i's data are the training rows whose labels fall in its share of the classes: with two
    seeds, digits 0-4 and 5-9, the specialists `DigitsTask.make_seeds` trains.
    """

    def __init__(self, task: Any, num_seeds: int) -> None:
        from fitness.digits import CLASSES

        self.layout = digits_layout()
        x, y = (np.asarray(a) for a in task.train_rows())
        self._x = []
        for labels in np.array_split(np.arange(CLASSES), num_seeds):
            mask = np.isin(y, labels)
            if not mask.any():
                raise ValueError(f"digits: no training rows with labels {labels.tolist()}; raise train_size")
            self._x.append(torch.from_numpy(np.ascontiguousarray(x[mask], dtype=np.float32)))

    def num_rows(self, seed: int) -> int:
        return int(self._x[seed].shape[0])

    def inputs(self, seed: int, rows: np.ndarray) -> torch.Tensor:
        return self._x[seed][torch.from_numpy(rows)]

    def logits(self, weights: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        w = {n: t if t.dtype == torch.float32 else t.to(torch.float32) for n, t in weights.items()}
        return torch.relu(inputs @ w["W1"] + w["b1"]) @ w["W2"] + w["b2"]


class CausalLMDam(DamModel):
    """Best effort for the causal-LM tasks: `torch.func.functional_call` over the task's model.

    Column axes: `nn.Linear` and `nn.Embedding` weights are (out, in) / (vocab, dim), so the last
    axis; GPT-2 style `Conv1D` is (in, out), so axis 0; everything else gets one scalar per seed.
    Seed i's data: the task's `dam_data` option (one JSONL per seed) if it has one, otherwise its
    `data` files when there is exactly one per seed. The KL runs over every non-padding position of
    prompt + answer.
    """

    def __init__(self, task: Any, num_seeds: int) -> None:
        from fitness.lm_data import read_examples

        self.model, self.tokenizer = task.model, task.tokenizer
        first = next(self.model.parameters())
        self.weight_dtype = first.dtype  # the run dtype: the seeds' own by default
        self.device = first.device  # a worker's GPU: the inputs go there
        self.layout = lm_column_layout(task, self.model)
        files = list(getattr(task.options, "dam_data", None) or [])
        if not files:
            files = list(task.options.data)
            if len(files) != num_seeds:
                raise ValueError(f"dam needs distillation data per seed: give the fitness task a `dam_data` list "
                                 f"of {num_seeds} JSONL files (seed order), or exactly one `data` file per seed "
                                 f"(it has {len(files)})")
        if len(files) != num_seeds:
            raise ValueError(f"fitness.options.dam_data lists {len(files)} files for {num_seeds} seeds; give one per seed")
        limit = getattr(task.options, "limit", None)
        self._rows = [[self.tokenizer(p + a)["input_ids"] for p, a in read_examples(f, limit)] for f in files]
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def num_rows(self, seed: int) -> int:
        return len(self._rows[seed])

    def inputs(self, seed: int, rows: np.ndarray) -> dict[str, torch.Tensor]:
        chunk = [self._rows[seed][int(r)] for r in rows]
        width = max(len(ids) for ids in chunk)
        ids = torch.full((len(chunk), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, row in enumerate(chunk):  # left padding, as the tasks score
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
        return {k: v.to(self.device) for k, v in inputs.items()}

    def logits(self, weights: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self.weight_dtype
        weights = {n: (w if w.dtype == dtype else w.to(dtype)) for n, w in weights.items()}  # seeds not in the run dtype
        out = torch.func.functional_call(self.model, weights, args=(), kwargs=inputs, tie_weights=True, strict=False)
        logits = out.logits.float()
        return logits[inputs["attention_mask"].bool()]


def _lm_column_axis(modules: dict[str, Any], name: str, shape: tuple[int, ...]) -> int | None:
    owner, _, leaf = name.rpartition(".")
    module = modules.get(owner)
    if leaf != "weight" or len(shape) != 2 or module is None:
        return None
    if type(module).__name__ == "Conv1D":
        return 0
    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        return 1
    return None


def digits_layout() -> ColumnLayout:
    """The digits MLP's groups: kernels (in x out) take their input columns along axis 0."""
    from fitness.digits import CLASSES, HIDDEN, IN_DIM

    return ColumnLayout.from_tensors(
        [("W1", (IN_DIM, HIDDEN)), ("b1", (HIDDEN,)), ("W2", (HIDDEN, CLASSES)), ("b2", (CLASSES,))],
        lambda name, shape: 0 if len(shape) == 2 else None)


def lm_column_layout(task: Any, model: Any = None) -> ColumnLayout:
    """The seeds' tensors as column groups, with axes from the module types of `model`, or of a
    meta-device build of the task's architecture (no bytes: what the population actor uses)."""
    if model is None:
        from fitness.lm_binding import meta_model

        model = meta_model(task.source, task.options.trust_remote_code)
    modules = dict(model.named_modules())
    return ColumnLayout.from_tensors([(s.name, tuple(s.shape)) for s in task.layout.tensors],
                                     lambda name, shape: _lm_column_axis(modules, name, shape))


def _is_lm_task(task: Any) -> bool:
    """Looked up on the class: `hasattr(task, "model")` would build the model (a lazy property)."""
    return all(hasattr(type(task), a) or a in getattr(task, "__dict__", {}) for a in ("model", "tokenizer", "layout"))


def dam_layout_for(task: Any, num_seeds: int) -> ColumnLayout:
    """The column layout `dam_model_for(task, num_seeds)` would have, without building a model."""
    if hasattr(task, "dam_layout"):
        return task.dam_layout(num_seeds)
    from fitness.digits import DigitsTask

    if isinstance(task, DigitsTask):
        return digits_layout()
    if not hasattr(task, "dam_model") and _is_lm_task(task):
        return lm_column_layout(task)
    return dam_model_for(task, num_seeds).layout


def dam_model_for(task: Any, num_seeds: int) -> DamModel:
    """The task's own `dam_model(num_seeds)` if it has one, else a built-in adapter."""
    if hasattr(task, "dam_model"):
        return task.dam_model(num_seeds)
    from fitness.digits import DigitsTask

    if isinstance(task, DigitsTask):
        return DigitsDam(task, num_seeds)
    if _is_lm_task(task):
        return CausalLMDam(task, num_seeds)
    raise ValueError(f"strategy dam cannot train on fitness task {type(task).__name__}: it needs a "
                     "differentiable forward and per-seed data; give the task a `dam_model(num_seeds)` "
                     "method returning an evomerge.strategies.dam.DamModel")
