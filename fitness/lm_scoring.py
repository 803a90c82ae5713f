"""Scoring a causal LM on prompt/answer pairs: greedy exact match and teacher-forced answer likelihood.

These work on any loaded model and tokenizer (the tasks' bound skeletons, the tiny-LM fixture, the
tests), so they know nothing about layouts or candidates.
"""

from __future__ import annotations

import inspect
import weakref
from contextlib import contextmanager
from typing import Iterable, Iterator

import numpy as np

from fitness.lm_data import Example, resolve


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """Padding on the left (generation appends on the right); the EOS token pads when there is no pad."""
    from transformers import AutoTokenizer

    folder = str(resolve(path, kind="dir"))
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{folder}: the tokenizer has neither a pad nor an eos token; batching needs one")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, trust_remote_code: bool = False):
    """float32, eval mode, no grads, with `load_tokenizer`'s tokenizer: the reference the tasks are tested against."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = str(resolve(path, kind="dir"))
    tokenizer = load_tokenizer(folder, trust_remote_code)
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


def format_prompts(tokenizer, prompts: list[str], chat_template: bool) -> list[str]:
    """Instruct checkpoints answer best inside their own chat format; base checkpoints have none.

    With `chat_template`, each prompt becomes one user message followed by the assistant's turn
    opener. The template writes BOS itself, so text from here is encoded without special tokens.
    """
    if not chat_template:
        return list(prompts)
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"fitness.options.chat_template is true but the tokenizer {name!r} has no chat template; "
                         "set fitness.options.chat_template: false or use a tokenizer that has one")
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts]


def contiguous_head(model) -> None:
    """Make the LM head's input contiguous, once per model.

    `logits_to_keep` (and generation, which keeps the last position) hands the head a strided
    slice of the hidden states; on the CPU, torch's linear on a non-contiguous 3-D input expands
    the weight per batch row: measured +2.0 GB per forward at 1B bf16 (a 128k x 2048 head, 16
    rows), +8 GB for 4 positions of 16 rows in isolation. A contiguous copy of the slice is a few
    kilobytes.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_evomerge_contiguous", False):
        return

    def make_contiguous(module, args):
        if args and hasattr(args[0], "is_contiguous") and not args[0].is_contiguous():
            return (args[0].contiguous(), *args[1:])
        return None

    head.register_forward_pre_hook(make_contiguous)
    head._evomerge_contiguous = True


def _device_of(model):
    return next(model.parameters()).device


def _encode_prompts(tokenizer, prompts: list[str], chat_template: bool = False):
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat_template)
    return enc["input_ids"], enc["attention_mask"]


# Per tokenizer (weakly held): (vocabulary size when computed, ids whose decoded text holds "\n").
_NEWLINE_IDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def newline_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokens that, decoded on their own, contain a newline: an answer ends at any of them.

    One batched decode of the vocabulary (a fraction of a second for 128k tokens with a fast
    tokenizer), cached per tokenizer and recomputed only if tokens were added since.
    """
    size = len(tokenizer)
    try:
        cached = _NEWLINE_IDS.get(tokenizer)
    except TypeError:  # an unhashable tokenizer: compute every time
        cached = None
    if cached is not None and cached[0] == size:
        return cached[1]
    # Special tokens are skipped when answers are decoded, so their text cannot end an answer.
    texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=True)
    ids = frozenset(i for i, text in enumerate(texts) if "\n" in text)
    try:
        _NEWLINE_IDS[tokenizer] = (size, ids)
    except TypeError:
        pass
    return ids


def _stop_at_tokens(stop_ids: Iterable[int]):
    """A per-row stopping criterion: a row is done once its newest token is one of `stop_ids`."""
    import torch
    from transformers import StoppingCriteria

    class StopAtTokens(StoppingCriteria):
        def __init__(self, ids: list[int]) -> None:
            self.ids = torch.tensor(sorted(ids), dtype=torch.long)

        def __call__(self, input_ids, scores, **kwargs):
            if self.ids.device != input_ids.device:
                self.ids = self.ids.to(input_ids.device)
            return torch.isin(input_ids[:, -1], self.ids)

    return StopAtTokens(list(stop_ids))


def stop_token_ids(model, tokenizer) -> set[int]:
    """EOS and pad, plus every EOS the model's generation config lists (Llama 3 instruct ends a turn
    with `<|eot_id|>`, not the tokenizer's EOS)."""
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    listed = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(listed) if isinstance(listed, (list, tuple)) else {listed}
    return {int(i) for i in ids if i is not None}


def generate_answers(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int,
                     chat_template: bool = False) -> list[str]:
    """Greedy continuations, cut at EOS and at the first newline; batched with left padding.

    Each row stops generating at its first EOS, pad or newline token, and a batch stops when all
    of its rows have: on short answers most of `max_new_tokens` is never run.
    """
    import torch
    from transformers import GenerationConfig, StoppingCriteriaList

    eos = tokenizer.eos_token_id
    gen_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                                  bos_token_id=tokenizer.bos_token_id)
    stops = stop_token_ids(model, tokenizer)
    stopping = StoppingCriteriaList([_stop_at_tokens(stops | newline_token_ids(tokenizer))])
    texts = format_prompts(tokenizer, prompts, chat_template)
    contiguous_head(model)
    device = _device_of(model)
    answers: list[str] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            ids, mask = _encode_prompts(tokenizer, texts[start:start + batch_size], chat_template)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 generation_config=gen_config, stopping_criteria=stopping)
            for row in out[:, ids.shape[1]:].tolist():
                cut = next((i for i, t in enumerate(row) if t in stops), len(row))
                text = tokenizer.decode(row[:cut], skip_special_tokens=True)
                answers.append(text.split("\n", 1)[0])
    return answers


def exact_match_scores(model, tokenizer, examples: list[Example], *, max_new_tokens: int = 8,
                       batch_size: int = 64, normalize: str = "strip",
                       chat_template: bool = False) -> tuple[np.ndarray, list[str]]:
    """1/0 per example, and the generated answers (for inspection)."""
    answers = generate_answers(model, tokenizer, [p for p, _ in examples], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, chat_template=chat_template)
    hits = [normalize_answer(got, normalize) == normalize_answer(want, normalize)
            for got, (_, want) in zip(answers, examples)]
    return np.asarray(hits, dtype=np.float32), answers


def _teacher_forced_rows(tokenizer, examples: list[Example], include_eos: bool,
                         chat_template: bool = False) -> list[tuple[list[int], int]]:
    """(prompt + answer ids, number of answer ids). The answer is encoded on its own, without specials."""
    rows = []
    eos = [tokenizer.eos_token_id] if include_eos and tokenizer.eos_token_id is not None else []
    prompts = format_prompts(tokenizer, [p for p, _ in examples], chat_template)
    for prompt, (_, answer) in zip(prompts, examples):
        p = tokenizer(prompt, add_special_tokens=not chat_template)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + eos
        if not a:
            raise ValueError(f"empty answer for prompt {prompt!r}")
        rows.append((p + a, len(a)))
    return rows


def _takes_logits_to_keep(model) -> bool:
    """Whether forward can project only some positions onto the vocabulary (recent transformers LMs)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def answer_likelihood_scores(model, tokenizer, examples: list[Example], *, batch_size: int = 64,
                             include_eos: bool = True, chat_template: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Teacher forcing: 1 where every answer token (and EOS) is the argmax, and the mean log-prob of those tokens.

    With `include_eos`, a hit means greedy decoding would produce exactly the answer and stop.
    Only the positions that predict answer tokens are projected onto the vocabulary: with left
    padding every answer ends at the right edge, so the last (longest answer + 1) positions hold
    them all. Full logits for 64 rows of 512 tokens and a 128k vocabulary would be 16.8 GB in float32.
    """
    import torch

    rows = _teacher_forced_rows(tokenizer, examples, include_eos, chat_template)
    pad = tokenizer.pad_token_id
    contiguous_head(model)
    device = _device_of(model)
    slice_in_forward = _takes_logits_to_keep(model)
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
            ids, mask, position_ids = ids.to(device), mask.to(device), position_ids.to(device)
            # Logits at position j predict token j + 1, so `longest` answers need the last longest + 1.
            longest = max(n for _, n in chunk)
            keep = longest + 1
            if slice_in_forward:
                logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                               logits_to_keep=keep).logits
            else:
                logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -keep:]
            for i, (row, n_answer) in enumerate(chunk):
                # In the kept slice, index k is position width - keep + k; the answer fills the last n_answer slots.
                pred = logits[i, longest - n_answer:longest].float()
                target = ids[i, width - n_answer:]
                finite = bool(torch.isfinite(pred).all())
                lp = torch.log_softmax(pred, dim=-1).gather(1, target[:, None]).squeeze(1)
                hits[start + i] = float(finite and bool((pred.argmax(-1) == target).all()))
                logprobs[start + i] = float(lp.mean()) if finite else -np.inf
    return hits, logprobs
