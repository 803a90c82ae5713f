"""DAM: column genomes checked by hand, the loss terms checked by hand, and training on the digits seeds."""

from __future__ import annotations

import itertools
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evomerge.genomes.basis import Basis, Piece
from evomerge.genomes.columns import (ColumnGenome, ColumnGroup, ColumnLayout, ColumnSpace, pack_columns,
                                      unpack_columns)
from evomerge.genomes.spaces import RecipeSpace
from evomerge.strategies.base import Evaluation, Problem
from evomerge.strategies.dam import DAM, cosine_penalty, kl_loss
from fitness.digits import DigitsTask


@pytest.fixture(scope="module")
def digits():
    task = DigitsTask({})  # the full 1,437 training rows
    return task, task.make_seeds()


def _problem(task, seeds) -> Problem:
    problem = Problem(dimension=task.dimension, num_datapoints=task.num_datapoints, initial=list(seeds))
    problem.task = task
    return problem


def _drive(strategy, start: int, count: int, task=None) -> list:
    out = []
    for member_id in range(start, start + count):
        candidate = strategy.ask()
        assert candidate is not None
        candidate.member_id = member_id
        if task is not None:
            vec = candidate.genome
            strategy.tell(candidate, Evaluation(member_id, task.evaluate(vec), task.test_score(vec)))
        out.append(candidate)
    return out


# ---- column genomes by hand ---------------------------------------------------------------------

def test_materialise_in_out_kernel_uses_rows_as_input_columns():
    """Digits/flax kernels are (in, out): input column i is row i."""
    w0 = np.arange(6, dtype=np.float32).reshape(2, 3)
    w1 = -np.arange(6, dtype=np.float32).reshape(2, 3) * 10
    b0, b1 = np.array([1.0, 2.0], np.float32), np.array([3.0, 5.0], np.float32)
    layout = ColumnLayout([ColumnGroup("W", 0, (2, 3), 0), ColumnGroup("b", 6, (2,), None)])
    assert layout.num_coeffs == 3 and layout.size == 8
    coeffs = np.array([[0.5, 2.0, 0.25], [1.0, -1.0, 4.0]], np.float32)  # per seed: row0, row1, bias scalar
    genome = ColumnGenome(layout, coeffs)
    seeds = [np.concatenate([w0.ravel(), b0]), np.concatenate([w1.ravel(), b1])]
    got = genome.materialise_dense(seeds)
    want_w = np.stack([0.5 * w0[0] + 1.0 * w1[0], 2.0 * w0[1] - 1.0 * w1[1]])
    want_b = 0.25 * b0 + 4.0 * b1
    np.testing.assert_array_equal(got, np.concatenate([want_w.ravel(), want_b]))


def test_materialise_hf_linear_uses_last_axis_as_input_columns():
    """HF nn.Linear.weight is (out, in): input column j is the last axis."""
    rng = np.random.default_rng(0)
    w = [rng.normal(size=(3, 2)).astype(np.float32) for _ in range(3)]
    layout = ColumnLayout.from_tensors([("q.weight", (3, 2))], lambda n, s: 1)
    coeffs = np.array([[1.0, 0.0], [0.5, 2.0], [0.0, -1.0]], np.float32)  # (K=3, in=2)
    got = ColumnGenome(layout, coeffs).materialise_dense([x.ravel() for x in w]).reshape(3, 2)
    want = np.empty((3, 2), np.float32)
    for j in range(2):
        want[:, j] = sum(coeffs[k, j] * w[k][:, j] for k in range(3))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got[:, 0], w[0][:, 0] + 0.5 * w[1][:, 0])


def test_materialise_across_pieces_and_bf16_seeds():
    """A group split over two basis pieces, with bf16 seeds: same as the in-memory float32 result."""
    rng = np.random.default_rng(1)
    seeds = [rng.normal(size=10).astype(np.float32) for _ in range(2)]
    layout = ColumnLayout([ColumnGroup("W", 0, (2, 4), 1), ColumnGroup("s", 8, (2,), None)])
    genome = ColumnGenome(layout, rng.normal(size=(2, layout.num_coeffs)).astype(np.float32))
    bf = [torch.from_numpy(s).to(torch.bfloat16) for s in seeds]
    pieces = [Piece(0, 5, [b[:5] for b in bf]), Piece(5, 10, [b[5:] for b in bf])]  # the cut is inside W
    got = genome.materialise(Basis(pieces, 10, 2)).numpy()
    want = genome.materialise_dense([b.float().numpy() for b in bf])
    np.testing.assert_array_equal(got, want)


def test_pack_unpack_round_trip_without_pickle():
    layout = ColumnLayout([ColumnGroup("W", 0, (3, 2), 1), ColumnGroup("b", 6, (3,), None)])
    space = ColumnSpace(layout, 2)
    a = ColumnGenome(layout, np.arange(6, dtype=np.float32).reshape(2, 3))
    arrays = space.pack([a, None, space.seed_genome(1)], "g")
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in arrays.values())
    back = space.unpack(arrays, "g")
    assert back[0].equals(a) and back[1] is None and back[2].equals(space.seed_genome(1))
    alone = unpack_columns(pack_columns([a], "best"), "best")[0]  # self-contained: layout from the arrays
    assert alone.layout.fingerprint() == layout.fingerprint() and np.array_equal(alone.coeffs, a.coeffs)
    other = ColumnLayout([ColumnGroup("W", 0, (2, 3), 1), ColumnGroup("b", 6, (3,), None)])
    with pytest.raises(ValueError, match="does not match"):
        unpack_columns(arrays, "g", other)


# ---- loss terms by hand -------------------------------------------------------------------------

def test_kl_with_temperature_by_hand():
    merged = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    seed = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    t = 2.0

    def softmax(row):
        e = [math.exp(v / t) for v in row]
        return [x / sum(e) for x in e]

    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q))

    forward = t * t * np.mean([kl(softmax(s), softmax(m)) for m, s in zip(merged.tolist(), seed.tolist())])
    reverse = t * t * np.mean([kl(softmax(m), softmax(s)) for m, s in zip(merged.tolist(), seed.tolist())])
    assert kl_loss(merged, seed, t, "forward").item() == pytest.approx(forward, rel=1e-6)
    assert kl_loss(merged, seed, t, "reverse").item() == pytest.approx(reverse, rel=1e-6)
    assert forward != pytest.approx(reverse, rel=1e-3)
    # forward is what the DAM reference computes with F.kl_div
    ref = F.kl_div(F.log_softmax(merged / t, -1), F.softmax(seed / t, -1), reduction="batchmean") * t * t
    assert kl_loss(merged, seed, t).item() == pytest.approx(ref.item(), rel=1e-6)
    assert kl_loss(seed, seed, t).item() == pytest.approx(0.0, abs=1e-7)


def test_cosine_penalty_by_hand():
    layout = ColumnLayout([ColumnGroup("W", 0, (2, 3), 0), ColumnGroup("b", 6, (3,), None),
                           ColumnGroup("V", 9, (4, 3), 1)])  # widths 2, 1 (left out), 3
    coeffs = torch.tensor([[1.0, 0.0, 9.0, 1.0, 2.0, 2.0],
                           [1.0, 1.0, -9.0, 0.0, 1.0, 0.0],
                           [0.0, 2.0, 5.0, 3.0, 0.0, 4.0]])

    def cos(a, b):
        return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))

    c = coeffs.numpy()
    expected = 0.0
    for cols in (slice(0, 2), slice(3, 6)):
        expected += np.mean([cos(c[a, cols], c[b, cols]) for a, b in itertools.combinations(range(3), 2)])
    assert cosine_penalty(coeffs, layout, 0.01).item() == pytest.approx(0.01 * expected, rel=1e-6)
    # identical vectors (DAM's start) give the maximum, 1 per column group
    start = torch.full((2, 6), 0.5)
    assert cosine_penalty(start, layout, 0.01).item() == pytest.approx(0.02, rel=1e-6)


# ---- training on the digits seeds ---------------------------------------------------------------

def test_coefficients_are_exactly_one_over_k_at_start(digits):
    task, seeds = digits
    dam = DAM({}, _problem(task, seeds), seed=0)
    assert dam.coeffs.dtype == np.float32
    assert bool((dam.coeffs == 0.5).all()) and dam.genome().equals(ColumnGenome.uniform(dam.layout, 2))
    first = _drive(dam, 0, 3)
    assert [c.parents for c in first] == [(), (), (0, 1)] and first[2].params == {"step": 0}
    np.testing.assert_array_equal(first[0].genome, seeds[0])
    np.testing.assert_array_equal(first[2].genome, (seeds[0] + seeds[1]) / np.float32(2))  # the plain average
    three = [*seeds, (seeds[0] - seeds[1]).astype(np.float32)]
    dam3 = DAM({}, _problem(task, three), seed=0)
    assert bool((dam3.coeffs == np.float32(1 / 3)).all())


def test_loss_decreases_and_dam_beats_the_plain_average(digits):
    task, seeds = digits
    dam = DAM({"steps": 100, "eval_every": 50}, _problem(task, seeds), seed=0)
    candidates = _drive(dam, 0, 5, task)
    assert [c.params.get("step") for c in candidates[2:]] == [0, 50, 100] and dam.exhausted
    curve = dam.training_curve()
    assert len(curve) == 100 and all(math.isfinite(v) for v in curve)
    assert np.mean(curve[-5:]) < 0.5 * np.mean(curve[:5])
    average, final = candidates[2].genome, candidates[-1].genome
    avg_train, dam_train = task.evaluate(average).mean(), task.evaluate(final).mean()
    assert dam_train > avg_train + 0.03, (avg_train, dam_train)
    assert task.test_score(final) > task.test_score(average)
    # the evaluated genome is exactly the model DAM trained
    merged = dam.trainer.merged_weights(torch.from_numpy(dam.coeffs))
    flat = np.concatenate([merged[g.name].numpy().ravel() for g in dam.layout.groups])
    np.testing.assert_array_equal(flat, final)
    # after training, asks keep offering the final merge rather than stalling
    again = _drive(dam, 5, 2, task)
    assert all(np.array_equal(c.genome, final) and c.params["step"] == 100 for c in again)
    # the curve goes on exactly one trial: the first offer of the trained merge
    assert dam.intermediate_values(candidates[-1]) == dict(enumerate(curve))
    assert all(dam.intermediate_values(c) is None for c in [*candidates[:-1], *again])


def test_snapshot_mid_training_resumes_bit_identically(digits):
    from evomerge.snapshots import load_snapshot, write_snapshot

    task, seeds = digits
    opts = {"steps": 40, "eval_every": 4, "batch_size": 32, "lr": 0.02}
    straight = DAM(opts, _problem(task, seeds), seed=7)
    _drive(straight, 0, 6, task)  # seeds, step 0, then 3 chunks: mid-epoch, Adam state warm
    meta, arrays = straight.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        meta, arrays = load_snapshot(write_snapshot(Path(tmp), 6, json.loads(json.dumps(meta)), arrays))
    resumed = DAM(opts, _problem(task, seeds), seed=999)
    resumed.load_state_dict(meta, arrays)
    a, b = _drive(straight, 6, 10, task), _drive(resumed, 6, 10, task)
    assert [(c.params, c.parents, c.genome.tobytes()) for c in a] == [(c.params, c.parents, c.genome.tobytes())
                                                                       for c in b]
    assert straight.training_curve() == resumed.training_curve() and straight.step == 40
    final = next(c for c in b if c.params["step"] == 40)
    assert resumed.intermediate_values(final) == straight.intermediate_values(final) == dict(enumerate(
        straight.training_curve()))


def _background_problem(task, seeds) -> Problem:
    problem = _problem(task, seeds)
    problem.background = True  # as the engine sets it in async mode
    return problem


def _ask_waiting(dam, member_id: int):
    """ask(), waiting out the chunks that train on their thread; also returns how many asks
    came back None meanwhile."""
    nones = 0
    while (candidate := dam.ask()) is None:
        assert dam.busy, "None from ask() while DAM is not training"
        nones += 1
        dam.wait(5.0)
    candidate.member_id = member_id
    return candidate, nones


def test_background_training_offers_the_inline_merges_bit_for_bit(digits):
    task, seeds = digits
    opts = {"steps": 30, "eval_every": 10, "batch_size": 64}
    inline = _drive(DAM(opts, _problem(task, seeds), seed=2), 0, 6)
    dam = DAM(opts, _background_problem(task, seeds), seed=2)
    asked = [_ask_waiting(dam, k) for k in range(6)]
    assert [c.params for c, _ in asked] == [c.params for c in inline]
    assert all(np.array_equal(c.genome, d.genome) for (c, _), d in zip(asked, inline))
    # each of the 3 trained merges came after at least one None; seeds and uniform at once
    assert [n > 0 for _, n in asked] == [False, False, False, True, True, True]
    assert dam.exhausted and not dam.busy


def test_a_snapshot_while_a_chunk_trains_holds_the_state_before_it(digits):
    task, seeds = digits
    opts = {"steps": 30, "eval_every": 10, "batch_size": 64}
    straight = DAM(opts, _problem(task, seeds), seed=4)
    expected = _drive(straight, 0, 6)
    dam = DAM(opts, _background_problem(task, seeds), seed=4)
    for k in range(4):
        _ask_waiting(dam, k)  # seeds, uniform, the step-10 merge
    assert dam.ask() is None  # the chunk to step 20 is training (or done, not yet taken)
    meta, arrays = dam.state_dict()
    assert meta["step"] == meta["offered_step"] == 10 and len(arrays["curve"]) == 10
    resumed = DAM(opts, _problem(task, seeds), seed=99)  # inline: trains the chunk again
    resumed.load_state_dict(json.loads(json.dumps(meta)), arrays)
    rest = _drive(resumed, 4, 2)
    assert [c.params for c in rest] == [c.params for c in expected[4:]]
    assert all(np.array_equal(c.genome, d.genome) for c, d in zip(rest, expected[4:]))
    dam.wait(30.0)
    assert not dam.busy and dam.state_dict()[0]["step"] == 10  # until ask() takes the chunk's result
    taken = dam.ask()
    assert taken.params == expected[4].params and np.array_equal(taken.genome, expected[4].genome)
    assert dam.state_dict()[0]["step"] == dam.state_dict()[0]["offered_step"] == 20


def test_a_chunk_that_fails_on_its_thread_fails_the_next_ask(digits):
    task, seeds = digits
    dam = DAM({"steps": 20, "eval_every": 10, "lr": 1e30}, _background_problem(task, seeds), seed=0)
    for k in range(3):
        _ask_waiting(dam, k)
    with pytest.raises(FloatingPointError, match="lower strategy.options.lr"):
        _ask_waiting(dam, 3)


def test_checkpoint_seeds_get_column_genomes(digits):
    """Over a basis (recipe problem), candidates are column genomes that materialise to the dense run's."""
    task, seeds = digits
    basis = Basis.from_arrays(seeds)
    problem = Problem(dimension=task.dimension, num_datapoints=task.num_datapoints,
                      space=RecipeSpace(basis.prefix_gram(max_boundaries=64)))
    problem.task, problem.basis = task, basis
    opts = {"steps": 20, "eval_every": 10}
    cols = _drive(DAM(opts, problem, seed=3), 0, 5)
    assert problem.space.kind == "columns"
    assert all(isinstance(c.genome, ColumnGenome) for c in cols)
    np.testing.assert_array_equal(cols[1].genome.materialise(basis).numpy(), seeds[1])
    dense = _drive(DAM(opts, _problem(task, seeds), seed=3), 0, 5)
    for c, d in zip(cols, dense):
        np.testing.assert_array_equal(c.genome.materialise(basis).numpy(), d.genome)
    packed = problem.space.pack([c.genome for c in cols], "inflight")
    assert all(x.equals(c.genome) for x, c in zip(problem.space.unpack(packed, "inflight"), cols))


def test_registered_and_refuses_scratch():
    from evomerge.strategies import STRATEGIES

    assert STRATEGIES.get("dam") is DAM and not DAM.supports_scratch and DAM.supports_seeds
    with pytest.raises(ValueError, match="at least two"):
        DAM({}, Problem(dimension=19210, num_datapoints=100), seed=0)


# ---- transformers (best effort): functional_call over a tiny Llama --------------------------------

def test_dam_on_tiny_llamas(tmp_path):
    lm_tasks = pytest.importorskip("fitness.lm_tasks")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(tmp_path / f"m{seed}")
        folders.append(tmp_path / f"m{seed}")
    vocab = {c: i for i, c in enumerate(["[UNK]", "[PAD]", *"0123456789+="])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folders[0])
    files = []
    for name, rows in (("add", [("1+2=", "3"), ("2+2=", "4"), ("3+4=", "7")]), ("rev", [("12=", "21"), ("345=", "543")])):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows))
        files.append(str(path))
    task = lm_tasks.LMAnswerLikelihoodTask({"model": str(folders[0]), "data": files})
    seeds = [lm_tasks.flat_params_of(f) for f in folders]
    problem = _problem(task, seeds)
    dam = DAM({"steps": 8, "eval_every": 4, "batch_size": None, "lr": 0.05}, problem, seed=0)
    axes = {g.name: g.axis for g in dam.layout.groups}
    assert axes["model.layers.0.self_attn.q_proj.weight"] == 1 and axes["model.embed_tokens.weight"] == 1
    assert axes["model.layers.0.input_layernorm.weight"] is None
    candidates = _drive(dam, 0, 5)
    curve = dam.training_curve()
    assert len(curve) == 8 and curve[-1] < curve[0]
    np.testing.assert_array_equal(candidates[2].genome, (seeds[0] + seeds[1]) / np.float32(2))
    final = candidates[-1].genome
    assert final.dtype == np.float32 and final.shape == (task.dimension,) and np.isfinite(final).all()
    assert task.evaluate(final).shape == (5,)


# ---- the seeds' dtype: no float32 copies of the seeds -----------------------------------------------

def test_trainable_combine_saves_the_seeds_themselves_and_matches_autograd():
    """bf16 seeds: same forward bits and gradient as autograd through `combine`, which saves a
    float32 upcast of every seed; combine_trainable saves only views of the seeds."""
    from evomerge.genomes.columns import combine, combine_trainable

    rng = np.random.default_rng(4)
    group = ColumnGroup("W", 0, (3, 4), 1)
    seeds = [torch.from_numpy(rng.normal(size=(3, 4)).astype(np.float32)).to(torch.bfloat16) for _ in range(2)]
    coeffs = torch.tensor(rng.normal(size=(2, 4)), dtype=torch.float32, requires_grad=True)
    upstream = torch.from_numpy(rng.normal(size=(3, 4)).astype(np.float32))

    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = combine_trainable(group, coeffs, seeds)
    out.backward(upstream)
    got = coeffs.grad.clone()
    assert {t.data_ptr() for t in saved} == {s.data_ptr() for s in seeds}
    assert all(t.dtype == torch.bfloat16 for t in saved)

    coeffs.grad = None
    plain_saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: plain_saved.append(t) or t, lambda t: t):
        ref = combine(group, coeffs, seeds)
    ref.backward(upstream)
    assert torch.equal(out, ref)
    assert torch.equal(got, coeffs.grad)
    assert any(t.dtype == torch.float32 and t.shape == (3, 4) for t in plain_saved)  # what it avoids
    # by hand: d/dc_k[col] = sum over rows of upstream * seed_k
    by_hand = torch.stack([(upstream * s.float()).sum(0) for s in seeds])
    torch.testing.assert_close(got, by_hand, rtol=0, atol=1e-6)


def test_dam_on_bf16_llama_seeds_trains_in_bf16(tmp_path):
    """bf16 checkpoint seeds: the merged weights DAM runs are bf16 (the seeds' dtype), and the
    seeds it trains against are the basis' own bf16 views, not float32 copies."""
    lm_tasks = pytest.importorskip("fitness.lm_tasks")
    from evomerge.engine.basis_spec import checkpoint_basis
    from evomerge.fixtures.synthetic_llama import make_synthetic_llama

    made = make_synthetic_llama(tmp_path / "llama", params="3M", experts=2, dtype="bfloat16", shard_size="2MB")
    seeds = [str(made["expert_1"]), str(made["expert_2"])]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + {i} =", "answer": f" {2 * i}"}) + "\n" for i in range(3)))
    task = lm_tasks.LMAnswerLikelihoodTask({"data": [str(data), str(data)]})
    basis = checkpoint_basis(seeds, allow_pickle=False)
    from evomerge.engine.basis_spec import seeds_layout
    from evomerge.tasks import TaskContext

    task.attach(TaskContext(seeds=seeds, layout=seeds_layout(seeds), num_cpus=1, num_gpus=0, role="population"))
    problem = Problem(dimension=task.dimension, num_datapoints=task.num_datapoints,
                      space=RecipeSpace(basis.prefix_gram(max_boundaries=8)))
    problem.task, problem.basis = task, basis
    dam = DAM({"steps": 2, "eval_every": 1, "batch_size": None, "lr": 0.01}, problem, seed=0)
    trainer = dam.trainer
    assert task.dtype == torch.bfloat16 and trainer.model.weight_dtype == torch.bfloat16
    assert all(w.dtype == torch.bfloat16 for weights in trainer.seed_weights for w in weights.values())
    coeffs = torch.from_numpy(dam.coeffs).requires_grad_(True)
    merged = trainer.merged_weights(coeffs)
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    loss = trainer.loss(coeffs, 0, dam.state.batch_seed)
    assert torch.isfinite(loss)
    loss.backward()
    assert coeffs.grad is not None and torch.isfinite(coeffs.grad).all() and coeffs.grad.abs().sum() > 0
