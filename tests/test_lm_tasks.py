"""LM fitness tasks: batched scoring equals per-example references, and params are zero-copy views."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evomerge.fixtures.tiny_lm import make_tiny_lm
from evomerge.tasks import TASKS
from fitness import lm_data
from fitness.lm_tasks import (
    LMAnswerLikelihoodTask,
    LMExactMatchTask,
    LMTaskOptions,
    answer_likelihood_scores,
    exact_match_scores,
    flat_params_of,
    load_causal_lm,
    read_examples,
)

REPO = Path(__file__).resolve().parent.parent
LIMIT = 12  # per file: 24 datapoints, mixed add/rev prompts of different lengths in each batch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-tasks")
    make_tiny_lm(root / "models", scale="test", seed=0, data_dir=root / "data")
    return root


def _options(tiny: Path, **extra) -> dict:
    data = tiny / "data"
    opts = {"model": str(tiny / "models" / "base"),
            "data": [str(data / "add_train.jsonl"), str(data / "rev_train.jsonl")],
            "test_data": [str(data / "add_test.jsonl"), str(data / "rev_test.jsonl")],
            "limit": LIMIT, "batch_size": 5}
    opts.update(extra)
    return opts


def _interleaved(tiny: Path) -> list[tuple[str, str]]:
    """The task's training examples, as read independently of the task."""
    data = tiny / "data"
    return read_examples(data / "add_train.jsonl", LIMIT) + read_examples(data / "rev_train.jsonl", LIMIT)


def _one_by_one_generate(folder: Path, examples, max_new_tokens: int = 8) -> list[str]:
    """Reference: no batching, no padding, plain `generate`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    answers = []
    with torch.no_grad():
        for prompt, _ in examples:
            ids = torch.tensor([tok(prompt)["input_ids"]])
            out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:]
            new = out.tolist()
            if tok.eos_token_id in new:
                new = new[:new.index(tok.eos_token_id)]
            answers.append(tok.decode(new, skip_special_tokens=True).split("\n")[0])
    return answers


def _one_by_one_teacher_forced(folder: Path, examples) -> tuple[np.ndarray, np.ndarray]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    hits, lps = [], []
    with torch.no_grad():
        for prompt, answer in examples:
            p = tok(prompt)["input_ids"]
            a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            logits = model(torch.tensor([p + a])).logits[0]
            pred = logits[len(p) - 1:-1]
            target = torch.tensor(a)
            hits.append(float(torch.equal(pred.argmax(-1), target)))
            lps.append(float(torch.log_softmax(pred, -1)[torch.arange(len(a)), target].mean()))
    return np.array(hits, dtype=np.float32), np.array(lps, dtype=np.float32)


def test_registered():
    assert TASKS.get("lm_exact_match") is LMExactMatchTask
    assert TASKS.get("lm_answer_likelihood") is LMAnswerLikelihoodTask


def test_dimension_and_datapoints(tiny):
    task = LMExactMatchTask(_options(tiny))
    flat = flat_params_of(tiny / "models" / "expert_add")
    assert flat.dtype == np.float32 and task.dimension == flat.size
    assert task.dimension == sum(p.numel() for p in task.model.parameters())
    assert task.num_datapoints == 2 * LIMIT
    with pytest.raises(ValueError, match="flat vector"):
        task.evaluate(flat[:-1])


@pytest.mark.parametrize("expert", ["expert_add", "expert_rev"])
def test_exact_match_equals_unbatched_generate(tiny, expert):
    """Left padding and position ids are right iff batched answers equal one-at-a-time answers."""
    examples = _interleaved(tiny)
    task = LMExactMatchTask(_options(tiny))
    scores = task.evaluate(flat_params_of(tiny / "models" / expert))
    reference = _one_by_one_generate(tiny / "models" / expert, examples)
    assert task.last_answers == reference
    want = np.array([got.strip() == ans for got, (_, ans) in zip(reference, examples)], dtype=np.float32)
    np.testing.assert_array_equal(scores, want)
    assert scores.dtype == np.float32 and scores.shape == (2 * LIMIT,)


def test_exact_match_scores_a_right_answer(tiny, tmp_path):
    """Examples whose answer is the model's own greedy output must score 1 (and a wrong one 0)."""
    model, tok = load_causal_lm(str(tiny / "models" / "expert_rev"))
    examples = _interleaved(tiny)
    _, answers = exact_match_scores(model, tok, examples, batch_size=7)
    rows = [(p, a) for (p, _), a in zip(examples, answers) if a]
    assert rows
    path = tmp_path / "own.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows)
                    + "".join(json.dumps({"prompt": p, "answer": a + "0"}) + "\n" for p, a in rows))
    task = LMExactMatchTask(_options(tiny, data=[str(path)], limit=None, normalize="none"))
    scores = task.evaluate(flat_params_of(tiny / "models" / "expert_rev"))
    np.testing.assert_array_equal(scores, [1.0] * len(rows) + [0.0] * len(rows))


@pytest.mark.parametrize("expert", ["expert_add", "expert_rev"])
def test_likelihood_equals_unbatched_teacher_forcing(tiny, expert):
    examples = _interleaved(tiny)
    task = LMAnswerLikelihoodTask(_options(tiny))
    hits, logprobs = task.evaluate_detailed(flat_params_of(tiny / "models" / expert))
    want_hits, want_lps = _one_by_one_teacher_forced(tiny / "models" / expert, examples)
    np.testing.assert_array_equal(hits, want_hits)
    np.testing.assert_allclose(logprobs, want_lps, rtol=1e-4, atol=1e-4)
    assert np.all(logprobs < 0)


def test_likelihood_hits_greedy_outputs(tiny, tmp_path):
    """Teacher forcing on the model's own greedy answers (ending in EOS) is all argmax: 1s; altered: 0s."""
    folder = tiny / "models" / "expert_add"
    model, tok = load_causal_lm(str(folder))
    prompts = [p for p, _ in _interleaved(tiny)]
    with torch.no_grad():
        rows = []
        for prompt in prompts:
            ids = torch.tensor([tok(prompt)["input_ids"]])
            out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
            if tok.eos_token_id in out:  # the greedy answer stopped by itself
                text = tok.decode(out[:out.index(tok.eos_token_id)], skip_special_tokens=True)
                if text and tok(text, add_special_tokens=False)["input_ids"] == out[:out.index(tok.eos_token_id)]:
                    rows.append((prompt, text))
    path = tmp_path / "greedy.jsonl"
    lines = [{"prompt": p, "answer": a} for p, a in rows] + [{"prompt": p, "answer": a + "7"} for p, a in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    if not rows:
        pytest.skip("the test-scale expert never stops by itself on these prompts")
    task = LMAnswerLikelihoodTask(_options(tiny, data=[str(path)], limit=None))
    hits = task.evaluate(flat_params_of(folder))
    np.testing.assert_array_equal(hits, [1.0] * len(rows) + [0.0] * len(rows))


def test_flat_params_equal_direct_load(tiny):
    examples = _interleaved(tiny)
    for expert in ("expert_add", "expert_rev"):
        model, tok = load_causal_lm(str(tiny / "models" / expert))
        task = LMAnswerLikelihoodTask(_options(tiny))
        hits, lps = task.evaluate_detailed(flat_params_of(tiny / "models" / expert))
        want_hits, want_lps = answer_likelihood_scores(model, tok, examples, batch_size=5)
        np.testing.assert_array_equal(hits, want_hits)
        np.testing.assert_allclose(lps, want_lps, rtol=1e-6, atol=1e-6)


def test_parameters_are_views_into_the_candidate_buffer(tiny):
    task = LMAnswerLikelihoodTask(_options(tiny))
    flat_a = flat_params_of(tiny / "models" / "expert_add")
    flat_b = flat_params_of(tiny / "models" / "expert_rev")
    buffer = task.candidate_buffer()
    model_id = id(task.model)
    _, lp_a = task.evaluate_detailed(flat_a)
    for spec in task.layout.tensors:
        param = task.model.get_parameter(spec.name)
        assert param.data_ptr() == buffer.data_ptr() + 4 * spec.offset, spec.name  # a view, by name
    # Writing a candidate into the buffer is what changes the model: no rebinding, no copy.
    buffer.copy_(torch.from_numpy(flat_b))
    _, lp_b = task.evaluate_detailed(buffer)
    assert id(task.model) == model_id and not np.allclose(lp_a, lp_b)
    _, lp_a_again = task.evaluate_detailed(flat_a)
    np.testing.assert_array_equal(lp_a, lp_a_again)
    # Read-only input (as Ray hands arrays to workers) is copied in, without a warning.
    frozen = flat_b.copy()
    frozen.setflags(write=False)
    _, lp_frozen = task.evaluate_detailed(frozen)
    np.testing.assert_array_equal(lp_b, lp_frozen)


def test_nonfinite_params_score_zero(tiny):
    """Documented behaviour: NaN/inf anywhere -> all-zero scores (no exception), model left usable."""
    flat = flat_params_of(tiny / "models" / "expert_add")
    for task_cls in (LMExactMatchTask, LMAnswerLikelihoodTask):
        task = task_cls(_options(tiny))
        before = task.evaluate(flat)
        for bad in (np.nan, np.inf):
            broken = flat.copy()
            broken[len(broken) // 2] = bad
            scores = task.evaluate(broken)
            np.testing.assert_array_equal(scores, np.zeros(task.num_datapoints, dtype=np.float32))
            assert task.test_score(broken) == 0.0
        if task_cls is LMAnswerLikelihoodTask:
            assert np.all(np.isneginf(task.last_logprobs))
        np.testing.assert_array_equal(task.evaluate(flat), before)


def test_test_score_is_mean_over_test_data(tiny):
    task = LMExactMatchTask(_options(tiny))
    flat = flat_params_of(tiny / "models" / "expert_rev")
    test_examples = read_examples(tiny / "data" / "add_test.jsonl", LIMIT) + \
        read_examples(tiny / "data" / "rev_test.jsonl", LIMIT)
    model, tok = load_causal_lm(str(tiny / "models" / "expert_rev"))
    want, _ = exact_match_scores(model, tok, test_examples)
    assert task.test_score(flat) == pytest.approx(float(want.mean()))
    assert LMExactMatchTask(_options(tiny, test_data=[])).test_score(flat) is None


def test_export_round_trip(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = LMExactMatchTask(_options(tiny))
    flat = flat_params_of(tiny / "models" / "expert_rev")
    # A merge-like vector, so the export is not just a copy of a file that already exists.
    mixed = (0.5 * flat + 0.5 * flat_params_of(tiny / "models" / "expert_add")).astype(np.float32)
    task.evaluate(mixed)
    answers = list(task.last_answers)
    out = tmp_path / "exported"
    paths = task.export(mixed, out)
    assert out / "model.safetensors" in paths and (out / "config.json").is_file()
    np.testing.assert_array_equal(flat_params_of(out), mixed)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok.padding_side == "left"
    _, reloaded = exact_match_scores(model.eval(), tok, _interleaved(tiny), batch_size=5)
    assert reloaded == answers


def test_paths_resolve_from_anywhere(tiny, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    shipped = REPO / "fitness" / "data" / "add_train.jsonl"
    if shipped.is_file():
        for spelling in ("fitness/data/add_train.jsonl", "data/add_train.jsonl", "add_train.jsonl"):
            assert lm_data.resolve(spelling) == shipped.resolve()
    with pytest.raises(FileNotFoundError, match="looked in"):
        lm_data.resolve("no/such/file.jsonl")
    with pytest.raises(FileNotFoundError, match="fixtures tiny-lm"):
        LMExactMatchTask(_options(tiny, model="models/no-such-model"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1="}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_examples(bad)


def test_population_yaml_options_validate():
    config = yaml.safe_load((REPO / "populations" / "tiny-lm-skills.yaml").read_text())
    assert config["fitness"]["task"] == "lm_exact_match"
    opts = LMTaskOptions.model_validate(config["fitness"]["options"])
    assert len(opts.data) == 2 and len(opts.test_data) == 2
    for path in [*opts.data, *opts.test_data]:
        assert lm_data.resolve(path).is_file()


def test_a_subset_scores_only_those_prompts(tiny):
    """fitness.subsample: evaluate(params, indices) is the full evaluation read at those indices,
    and only those prompts are run (the answers logged are theirs)."""
    params = flat_params_of(tiny / "models" / "expert_add")
    idx = np.array([0, 3, 11, 12, 20])
    exact = LMExactMatchTask(_options(tiny))
    full, answers = exact.evaluate(params), list(exact.last_answers)
    np.testing.assert_array_equal(exact.evaluate(params, idx), full[idx])
    assert exact.last_answers == [answers[i] for i in idx]
    likely = LMAnswerLikelihoodTask(_options(tiny))
    hits, logprobs = likely.evaluate_detailed(params)
    np.testing.assert_array_equal(likely.evaluate(params, idx), hits[idx])
    np.testing.assert_allclose(likely.last_logprobs, logprobs[idx], rtol=1e-5, atol=1e-6)
