"""LM scoring: the cheaper paths (kept logits, early stop) give the old answers; chat templates; devices."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.fixtures.tiny_lm import make_tiny_lm
from fitness import lm_scoring
from fitness.lm_data import read_examples
from fitness.lm_scoring import (
    answer_likelihood_scores,
    exact_match_scores,
    format_prompts,
    generate_answers,
    load_causal_lm,
    newline_token_ids,
)

LIMIT = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-scoring")
    make_tiny_lm(root / "models", scale="test", seed=0, data_dir=root / "data")
    return root


@pytest.fixture(scope="module")
def examples(tiny):
    data = tiny / "data"
    return read_examples(data / "add_train.jsonl", LIMIT) + read_examples(data / "rev_train.jsonl", LIMIT)


# ---------------------------------------------------------------------------------------------
# references: the implementations before this change, kept verbatim in behaviour


def _old_generate_answers(model, tokenizer, prompts, *, max_new_tokens, batch_size, add_special_tokens=True):
    """Every row runs to EOS or max_new_tokens; the newline cut happens after decoding."""
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                              bos_token_id=tokenizer.bos_token_id)
    stops = {eos, tokenizer.pad_token_id} - {None}
    answers = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=add_special_tokens)
            out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 generation_config=config)
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                cut = next((i for i, t in enumerate(row) if t in stops), len(row))
                answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True).split("\n", 1)[0])
    return answers


def _old_likelihood(model, tokenizer, examples, *, batch_size, include_eos=True):
    """Full-vocabulary float32 logits at every position, sliced per row afterwards."""
    eos = [tokenizer.eos_token_id] if include_eos else []
    rows = [(tokenizer(p)["input_ids"] + tokenizer(a, add_special_tokens=False)["input_ids"] + eos,
             len(tokenizer(a, add_special_tokens=False)["input_ids"]) + len(eos)) for p, a in examples]
    hits = np.zeros(len(rows), dtype=np.float32)
    lps = np.full(len(rows), -np.inf, dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(r) for r, _ in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (r, _) in enumerate(chunk):
                ids[i, width - len(r):] = torch.tensor(r)
                mask[i, width - len(r):] = 1
            logits = model(input_ids=ids, attention_mask=mask,
                           position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits.float()
            for i, (r, n) in enumerate(chunk):
                pred, target = logits[i, width - n - 1:width - 1], ids[i, width - n:]
                hits[start + i] = float(bool((pred.argmax(-1) == target).all()))
                lps[start + i] = float(torch.log_softmax(pred, -1).gather(1, target[:, None]).mean())
    return hits, lps


def _with_newline_as(tokenizer, char: str):
    """A copy of the per-character tokenizer in which `char`'s id decodes to "\\n" (and "\\n"'s id to `char`).

    The tiny LM never writes a newline; after the swap, every `char` it writes ends its answer.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab[char], vocab["\n"] = vocab["\n"], vocab[char]
    swapped = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                      bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                                      pad_token=tokenizer.pad_token, unk_token=tokenizer.unk_token,
                                      padding_side="left")
    assert swapped.decode([tokenizer.convert_tokens_to_ids(char)]) == "\n"
    return swapped


class _ForwardCounter:
    def __init__(self, model) -> None:
        self.calls = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.calls += 1


# ---------------------------------------------------------------------------------------------
# likelihood: kept logits


@pytest.mark.parametrize("expert", ["expert_add", "expert_rev"])
@pytest.mark.parametrize("batch_size", [5, 64])
def test_likelihood_equals_full_logits_reference(tiny, examples, expert, batch_size):
    model, tok = load_causal_lm(str(tiny / "models" / expert))
    assert lm_scoring._takes_logits_to_keep(model)  # the cheap path is the one under test
    hits, lps = answer_likelihood_scores(model, tok, examples, batch_size=batch_size, include_eos=True)
    want_hits, want_lps = _old_likelihood(model, tok, examples, batch_size=batch_size)
    np.testing.assert_array_equal(hits, want_hits)
    np.testing.assert_allclose(lps, want_lps, rtol=1e-6, atol=1e-6)
    assert np.all(lps < 0)


def test_likelihood_without_eos_and_without_logits_to_keep(tiny, examples, monkeypatch):
    """A model whose forward takes no `logits_to_keep` goes through the full-logits path: same results."""
    model, tok = load_causal_lm(str(tiny / "models" / "expert_add"))
    want_hits, want_lps = _old_likelihood(model, tok, examples, batch_size=7, include_eos=False)
    kept = answer_likelihood_scores(model, tok, examples, batch_size=7, include_eos=False)
    seen = []
    real_forward = model.forward

    def forward_without_slicing(input_ids=None, attention_mask=None, position_ids=None):
        seen.append(input_ids.shape)
        return real_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    monkeypatch.setattr(model, "forward", forward_without_slicing)
    assert not lm_scoring._takes_logits_to_keep(model)
    full = answer_likelihood_scores(model, tok, examples, batch_size=7, include_eos=False)
    assert len(seen) == -(-len(examples) // 7)  # the fallback really ran
    for hits, lps in (kept, full):
        np.testing.assert_array_equal(hits, want_hits)
        np.testing.assert_allclose(lps, want_lps, rtol=1e-6, atol=1e-6)


def test_likelihood_keeps_only_answer_positions(tiny, examples, monkeypatch):
    """The projection onto the vocabulary covers the longest answer in the batch plus one position."""
    model, tok = load_causal_lm(str(tiny / "models" / "expert_rev"))
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    try:
        answer_likelihood_scores(model, tok, examples, batch_size=8)
    finally:
        handle.remove()
    longest = [max(len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for _, a in examples[s:s + 8])
               for s in range(0, len(examples), 8)]
    assert [s[1] for s in shapes] == [n + 1 for n in longest]
    assert all(s[2] == len(tok) for s in shapes)


# ---------------------------------------------------------------------------------------------
# generation: early stop


def test_newline_ids_are_the_tokens_that_decode_to_a_newline(tiny):
    _, tok = load_causal_lm(str(tiny / "models" / "base"))
    assert newline_token_ids(tok) == {tok.convert_tokens_to_ids("\n")}
    assert newline_token_ids(tok) is newline_token_ids(tok)  # cached
    swapped = _with_newline_as(tok, "w")
    assert newline_token_ids(swapped) == {tok.convert_tokens_to_ids("w")}


def test_newline_ids_of_a_byte_level_vocabulary():
    """Merged tokens holding a newline anywhere count; special tokens whose text has one do not."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte = pre_tokenizers.ByteLevel.alphabet()
    nl = "\u010a"  # byte-level spelling of "\n"
    pieces = sorted(byte) + [f"a{nl}", f"{nl}{nl}", f"x{nl}y"]
    core = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>",
                                  additional_special_tokens=["<special\n>"])
    want = {pieces.index(p) for p in (nl, f"a{nl}", f"{nl}{nl}", f"x{nl}y")}
    assert newline_token_ids(tok) == want
    tok.add_tokens(["z\nz"])  # the cache notices a grown vocabulary
    assert newline_token_ids(tok) == want | {tok.convert_tokens_to_ids("z\nz")}


@pytest.mark.parametrize("expert", ["expert_add", "expert_rev"])
def test_answers_equal_old_generation(tiny, examples, expert):
    model, tok = load_causal_lm(str(tiny / "models" / expert))
    prompts = [p for p, _ in examples]
    for tokenizer in (tok, _with_newline_as(tok, "w"), _with_newline_as(tok, "1")):
        want = _old_generate_answers(model, tokenizer, prompts, max_new_tokens=12, batch_size=5)
        assert generate_answers(model, tokenizer, prompts, max_new_tokens=12, batch_size=5) == want
        hits, got = exact_match_scores(model, tokenizer, examples, max_new_tokens=12, batch_size=5)
        assert got == want
        np.testing.assert_array_equal(hits, [g.strip() == a for g, (_, a) in zip(want, examples)])


def test_generation_stops_at_the_first_newline(tiny, examples):
    """expert_rev writes many "w"s before its EOS; with "w" decoding to a newline, rows stop at the first."""
    model, tok = load_causal_lm(str(tiny / "models" / "expert_rev"))
    swapped = _with_newline_as(tok, "w")
    w = tok.convert_tokens_to_ids("w")
    prompts = [p for p, _ in examples]
    max_new = 16
    # One row at a time, run to max_new_tokens: where each row's answer ends, and where its EOS is.
    first_stop, first_eos = [], []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([swapped(p)["input_ids"]])
            out = model.generate(input_ids=ids, max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:]
            row = out.tolist()
            first_stop.append(next((i for i, t in enumerate(row) if t in (w, tok.eos_token_id)), max_new - 1))
            first_eos.append(next((i for i, t in enumerate(row) if t == tok.eos_token_id), max_new - 1))
    batch = [i for i, (s, e) in enumerate(zip(first_stop, first_eos)) if s < e]
    assert len(batch) >= 3, "the expert should write 'w' before its EOS on several prompts"
    batch_prompts = [prompts[i] for i in batch]

    counter = _ForwardCounter(model)
    answers = generate_answers(model, swapped, batch_prompts, max_new_tokens=max_new, batch_size=len(batch))
    new_calls, counter.calls = counter.calls, 0
    old = _old_generate_answers(model, swapped, batch_prompts, max_new_tokens=max_new, batch_size=len(batch))
    old_calls = counter.calls
    counter.handle.remove()
    assert answers == old
    # One forward per generated token: the batch ends with its latest-stopping row.
    assert new_calls == max(first_stop[i] for i in batch) + 1
    assert old_calls == max(first_eos[i] for i in batch) + 1
    assert new_calls < old_calls


# ---------------------------------------------------------------------------------------------
# chat templates


def _templated(tok, template: str):
    out = copy.deepcopy(tok)
    out.chat_template = template
    return out


IDENTITY = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
PREFIXED = "{{ bos_token }}{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}{% endfor %}" \
           "{% if add_generation_prompt %} {% endif %}"


def test_format_prompts(tiny):
    _, tok = load_causal_lm(str(tiny / "models" / "base"))
    assert format_prompts(tok, ["1+2="], False) == ["1+2="]
    assert format_prompts(_templated(tok, PREFIXED), ["1+2=", "rev:ab"], True) == ["<s>u:1+2= ", "<s>u:rev:ab "]
    with pytest.raises(ValueError, match="no chat template.*fitness.options.chat_template: false"):
        format_prompts(tok, ["1+2="], True)
    model, _ = load_causal_lm(str(tiny / "models" / "base"))
    with pytest.raises(ValueError, match="chat_template"):
        exact_match_scores(model, tok, [("1+2=", "3")], chat_template=True)
    with pytest.raises(ValueError, match="chat_template"):
        answer_likelihood_scores(model, tok, [("1+2=", "3")], chat_template=True)


def test_chat_template_scores(tiny, examples):
    """The template writes BOS once; its text is the prompt, and the answer follows it."""
    model, tok = load_causal_lm(str(tiny / "models" / "expert_add"))
    plain_em = exact_match_scores(model, tok, examples, batch_size=5)
    plain_ll = answer_likelihood_scores(model, tok, examples, batch_size=5)
    same = _templated(tok, IDENTITY)
    em = exact_match_scores(model, same, examples, batch_size=5, chat_template=True)
    ll = answer_likelihood_scores(model, same, examples, batch_size=5, chat_template=True)
    assert em[1] == plain_em[1]
    np.testing.assert_array_equal(ll[0], plain_ll[0])
    np.testing.assert_allclose(ll[1], plain_ll[1], rtol=1e-6, atol=1e-6)

    # A template that changes the text equals the plain path on the prompts written out by hand.
    prefixed = _templated(tok, PREFIXED)
    by_hand = [(f"u:{p} ", a) for p, a in examples]
    em = exact_match_scores(model, prefixed, examples, batch_size=5, chat_template=True)
    ll = answer_likelihood_scores(model, prefixed, examples, batch_size=5, chat_template=True)
    assert em[1] == exact_match_scores(model, tok, by_hand, batch_size=5)[1]
    want_hits, want_lps = _old_likelihood(model, tok, by_hand, batch_size=5)
    np.testing.assert_array_equal(ll[0], want_hits)
    np.testing.assert_allclose(ll[1], want_lps, rtol=1e-6, atol=1e-6)
    assert not np.allclose(ll[1], plain_ll[1])  # the template reached the model


# ---------------------------------------------------------------------------------------------
# devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scoring_runs_on_cuda(tiny, examples):
    model, tok = load_causal_lm(str(tiny / "models" / "expert_rev"))
    cpu_em = exact_match_scores(model, tok, examples, batch_size=5)
    cpu_ll = answer_likelihood_scores(model, tok, examples, batch_size=5)
    model.to("cuda")
    em = exact_match_scores(model, tok, examples, batch_size=5)
    ll = answer_likelihood_scores(model, tok, examples, batch_size=5)
    np.testing.assert_array_equal(em[0], cpu_em[0])
    np.testing.assert_array_equal(ll[0], cpu_ll[0])
    np.testing.assert_allclose(ll[1], cpu_ll[1], rtol=1e-4, atol=1e-4)


def test_generation_stops_at_every_eos_the_generation_config_lists(tiny, examples):
    """An instruct model ends its turn with a token the tokenizer does not call EOS (Llama 3's
    <|eot_id|>): listed in generation_config.json, it ends the answer there."""
    model, tok = load_causal_lm(str(tiny / "models" / "expert_rev"))
    prompts = [p for p, _ in examples if p.startswith("rev:")][:4]
    plain = generate_answers(model, tok, prompts, max_new_tokens=8, batch_size=4)
    assert all(len(a) >= 2 for a in plain), plain
    second = [tok.convert_tokens_to_ids(a[1]) for a in plain]  # each answer's second character
    model.generation_config.eos_token_id = [tok.eos_token_id, *second]
    stop_chars = {a[1] for a in plain}
    cut = generate_answers(model, tok, prompts, max_new_tokens=8, batch_size=4)
    # Each answer ends before its first listed token, which is at index 0 or 1.
    assert cut == [a[:1] if a[0] not in stop_chars else "" for a in plain]
    assert all(len(c) < len(a) for c, a in zip(cut, plain))


def test_the_lm_head_gets_a_contiguous_input(tiny, examples):
    """A strided slice into the head makes torch's CPU linear expand the weight per row (+2 GB a
    forward at 1B bf16); the head must see a contiguous tensor, in scoring and in generation."""
    from fitness.lm_scoring import answer_likelihood_scores

    model, tok = load_causal_lm(str(tiny / "models" / "expert_add"))
    seen = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    answer_likelihood_scores(model, tok, examples, batch_size=6)
    generate_answers(model, tok, [p for p, _ in examples], max_new_tokens=3, batch_size=6)
    handle.remove()
    assert seen and all(seen)
