"""Per-model statistics from each model's own examples: the data that fisher and regmean merge with.

The examples are prompt/answer JSONL, the LM tasks' format (`fitness/lm_data.py`). Each model is
loaded in float32 on the CPU, one at a time, and run on its own file:

- `fisher_diagonal`: the empirical diagonal Fisher, the mean over examples of the squared gradient
  of log p(answer | prompt) (answer tokens teacher-forced), one tensor per parameter.
- `input_grams`: for every `nn.Linear`, the mean over tokens of x xᵀ of its inputs (prompt and
  answer tokens), keyed by the layer's weight name.

Both are keyed by the checkpoint's tensor names; a tied head shares its embedding's entry under
the name transformers reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

Tensor = torch.Tensor


def read_rows(path: Path, tokenizer: Any, limit: int) -> list[tuple[list[int], int]]:
    """(prompt + answer token ids, number of answer ids) per example, at most `limit` of them."""
    from fitness.lm_data import read_examples

    rows = []
    for prompt, answer in read_examples(path, limit):
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not a:
            raise ValueError(f"{path}: empty answer for prompt {prompt!r}")
        rows.append((p + a, len(a)))
    return rows


def load_model(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model


def fisher_diagonal(model: Any, rows: Sequence[tuple[list[int], int]]) -> dict[str, Tensor]:
    """Mean over examples of (∂ log p(answer | prompt) / ∂θ)², per parameter (float32)."""
    params = {name: p for name, p in model.named_parameters()}
    for p in params.values():
        p.requires_grad_(True)
    total = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    for ids, n_answer in rows:
        model.zero_grad(set_to_none=True)
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0].float()
        start = len(ids) - n_answer  # logits at position t predict token t + 1
        logp = torch.log_softmax(logits[start - 1:len(ids) - 1], dim=-1)
        logp.gather(1, x[0, start:].unsqueeze(1)).sum().backward()
        for name, p in params.items():
            if p.grad is not None:
                total[name].add_(p.grad.float() ** 2)
    model.zero_grad(set_to_none=True)
    return {name: t / len(rows) for name, t in total.items()}


def input_grams(model: Any, rows: Sequence[tuple[list[int], int]]) -> dict[str, Tensor]:
    """Mean over all tokens of x xᵀ of each linear layer's input, keyed `<module>.weight` (float64)."""
    grams: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name: str):
        def record(_module: Any, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_pre_hook(hook(f"{name}.weight")))
    try:
        with torch.no_grad():
            for ids, _ in rows:
                model(input_ids=torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return {name: g / counts[name] for name, g in grams.items()}


def model_statistics(kind: str, paths: Sequence[Path], data: Sequence[Path], tokenizer_path: Path,
                     limit: int) -> list[dict[str, Tensor]]:
    """`kind` ("fisher" or "gram") for each model on its own data file."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    out = []
    for path, file in zip(paths, data):
        rows = read_rows(file, tokenizer, limit)
        model = load_model(path)
        out.append(fisher_diagonal(model, rows) if kind == "fisher" else input_grams(model, rows))
        del model
    return out
