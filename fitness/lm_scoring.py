"""Scoring a causal LM on prompt/answer pairs: greedy exact match and teacher-forced answer likelihood.

These work on any loaded model and tokenizer (the tasks' bound skeletons, the tiny-LM fixture, the
tests), so they know nothing about layouts or candidates.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np

from fitness.lm_data import Example, resolve



def load_causal_lm(path: str, trust_remote_code: bool = False):
    """float32, eval mode, no grads, tokenizer padding on the left (generation appends on the right)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(resolve(path, kind="dir"))
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{folder}: the tokenizer has neither a pad nor an eos token; batching needs one")
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def normalize_answer(text: str, mode: str) -> str:
    if mode == "none":
        return text
    text = text.strip()
    return text.lower() if mode == "lower" else text


def _encode_prompts(tokenizer, prompts: list[str]):
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def generate_answers(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations, cut at EOS and at the first newline; batched with left padding."""
    import torch
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    gen_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                                  bos_token_id=tokenizer.bos_token_id)
    stops = {eos, tokenizer.pad_token_id} - {None}
    answers: list[str] = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            ids, mask = _encode_prompts(tokenizer, prompts[start:start + batch_size])
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config)
            for row in out[:, ids.shape[1]:].tolist():
                cut = next((i for i, t in enumerate(row) if t in stops), len(row))
                text = tokenizer.decode(row[:cut], skip_special_tokens=True)
                answers.append(text.split("\n", 1)[0])
    return answers


def exact_match_scores(model, tokenizer, examples: list[Example], *, max_new_tokens: int = 8,
                       batch_size: int = 64, normalize: str = "strip") -> tuple[np.ndarray, list[str]]:
    """1/0 per example, and the generated answers (for inspection)."""
    answers = generate_answers(model, tokenizer, [p for p, _ in examples],
                               max_new_tokens=max_new_tokens, batch_size=batch_size)
    hits = [normalize_answer(got, normalize) == normalize_answer(want, normalize)
            for got, (_, want) in zip(answers, examples)]
    return np.asarray(hits, dtype=np.float32), answers


def _teacher_forced_rows(tokenizer, examples: list[Example], include_eos: bool) -> list[tuple[list[int], int]]:
    """(prompt + answer ids, number of answer ids). The answer is encoded on its own, without specials."""
    rows = []
    eos = [tokenizer.eos_token_id] if include_eos and tokenizer.eos_token_id is not None else []
    for prompt, answer in examples:
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + eos
        if not a:
            raise ValueError(f"empty answer for prompt {prompt!r}")
        rows.append((p + a, len(a)))
    return rows


def answer_likelihood_scores(model, tokenizer, examples: list[Example], *, batch_size: int = 64,
                             include_eos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Teacher forcing: 1 where every answer token (and EOS) is the argmax, and the mean log-prob of those tokens.

    With `include_eos`, a hit means greedy decoding would produce exactly the answer and stop.
    """
    import torch

    rows = _teacher_forced_rows(tokenizer, examples, include_eos)
    pad = tokenizer.pad_token_id
    hits = np.zeros(len(rows), dtype=np.float32)
    logprobs = np.full(len(rows), -np.inf, dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (row, _) in enumerate(chunk):
                ids[i, width - len(row):] = torch.tensor(row)
                mask[i, width - len(row):] = 1
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits.float()
            for i, (row, n_answer) in enumerate(chunk):
                # Logits at position j predict token j + 1; the answer fills the last n_answer slots.
                pred = logits[i, width - n_answer - 1:width - 1]
                target = ids[i, width - n_answer:]
                finite = bool(torch.isfinite(pred).all())
                lp = torch.log_softmax(pred, dim=-1).gather(1, target[:, None]).squeeze(1)
                hits[start + i] = float(finite and bool((pred.argmax(-1) == target).all()))
                logprobs[start + i] = float(lp.mean()) if finite else -np.inf
    return hits, logprobs
