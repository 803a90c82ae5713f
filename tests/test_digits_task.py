"""The digits task must match the JAX reference's data, split and parameter layout exactly,
or our accuracies stop being comparable with the reference numbers in DESIGN.md."""

from __future__ import annotations

import warnings

import numpy as np
import pydantic
import pytest
import torch
from sklearn.datasets import load_digits

from evomerge.tasks import TASKS, build_task
from fitness.digits import NUM_PARAMS, DigitsTask, flatten, unflatten


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return d.data.astype(np.float64), d.target.astype(np.int64)


@pytest.fixture(scope="module")
def task() -> DigitsTask:
    return DigitsTask({}, seed=0)


@pytest.fixture(scope="module")
def seeds(task: DigitsTask) -> list[np.ndarray]:
    return task.make_seeds()


def torch_correct(params: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A float64 reference forward pass that slices the reference layout by hand, not via unflatten."""
    p = torch.from_numpy(np.asarray(params, dtype=np.float64))
    W1, b1 = p[:16384].reshape(64, 256), p[16384:16640]
    W2, b2 = p[16640:19200].reshape(256, 10), p[19200:]
    logits = torch.relu(torch.from_numpy(x) @ W1 + b1) @ W2 + b2
    return (logits.argmax(dim=1).numpy() == y).astype(np.float32)


def test_round_trip_and_reference_layout() -> None:
    rng = np.random.default_rng(0)
    W1, b1 = rng.normal(size=(64, 256)), rng.normal(size=256)
    W2, b2 = rng.normal(size=(256, 10)), rng.normal(size=10)
    flat = flatten(W1, b1, W2, b2)
    assert flat.dtype == np.float32 and flat.shape == (NUM_PARAMS,) == (19210,)
    for got, want in zip(unflatten(flat), (W1, b1, W2, b2)):
        np.testing.assert_array_equal(got, want.astype(np.float32))

    idx = np.arange(NUM_PARAMS, dtype=np.float32)
    uW1, ub1, uW2, ub2 = unflatten(idx)
    i, j = 5, 200
    assert uW1[i, j] == i * 256 + j  # kernel first, (in, out), row-major
    np.testing.assert_array_equal(ub1, np.arange(16384, 16640))
    i, j = 100, 7
    assert uW2[i, j] == 16640 + i * 10 + j
    np.testing.assert_array_equal(ub2, np.arange(19200, 19210))

    with pytest.raises(ValueError, match="W1"):
        flatten(W1.T, b1, W2, b2)


def test_evaluate_constant_bias_predicts_one_class(task: DigitsTask, data) -> None:
    _, y = data
    params = np.zeros(NUM_PARAMS, dtype=np.float32)
    params[19200 + 3] = 1.0  # b2[3]: every row predicts 3
    np.testing.assert_array_equal(task.evaluate(params), (y[:1437] == 3).astype(np.float32))


def test_evaluate_hand_built_network(task: DigitsTask, data) -> None:
    # Hidden unit c = relu(pixel[20 + c] - 8); logit c = -hidden c - 0.001 c.
    # So the prediction is the first c whose pixel is <= 8, or else the c with the smallest pixel.
    x, y = data
    W1, b1 = np.zeros((64, 256)), np.zeros(256)
    W2, b2 = np.zeros((256, 10)), -0.001 * np.arange(10)
    for c in range(10):
        W1[20 + c, c] = 1.0
        b1[c] = -8.0
        W2[c, c] = -1.0
    expected = []
    for row, label in zip(x[:1437], y[:1437]):
        scores = [-max(row[20 + c] - 8.0, 0.0) - 0.001 * c for c in range(10)]
        pred = scores.index(max(scores))
        expected.append(1.0 if pred == label else 0.0)
    expected = np.array(expected, dtype=np.float32)
    assert 0 < expected.sum() < len(expected)  # the check can tell right from wrong
    got = task.evaluate(flatten(W1, b1, W2, b2))
    assert got.dtype == np.float32 and got.shape == (task.num_datapoints,) == (1437,)
    np.testing.assert_array_equal(got, expected)


def test_scores_match_reference_forward_pass(task: DigitsTask, seeds, data) -> None:
    x, y = data
    rng = np.random.default_rng(1)
    for params in (rng.normal(0.0, 0.05, NUM_PARAMS).astype(np.float32), seeds[0], seeds[1]):
        assert task.test_score(params) == pytest.approx(torch_correct(params, x[-360:], y[-360:]).mean(), abs=1e-7)
        np.testing.assert_array_equal(task.evaluate(params), torch_correct(params, x[:1437], y[:1437]))


def test_rejects_wrong_length(task: DigitsTask) -> None:
    with pytest.raises(ValueError, match=r"19210.*19209"):
        task.evaluate(np.zeros(19209, dtype=np.float32))
    with pytest.raises(ValueError, match="19210"):
        task.test_score(np.zeros((2, NUM_PARAMS), dtype=np.float32))


def test_nan_never_counts_as_correct(task: DigitsTask) -> None:
    params = np.zeros(NUM_PARAMS, dtype=np.float32)
    params[19200] = np.nan  # b2[0]: a naive argmax would "predict" 0 everywhere
    assert task.evaluate(params).sum() == 0
    assert task.test_score(params) == 0.0
    assert task.evaluate(np.full(NUM_PARAMS, np.nan, dtype=np.float32)).sum() == 0


def test_overflowing_params_score_zero_without_warnings(task: DigitsTask) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a diverged candidate must not flood the log
        for value in (np.inf, -np.inf, 1e30):
            assert task.evaluate(np.full(NUM_PARAMS, value, dtype=np.float32)).sum() == 0


def test_seeds_are_deterministic(task: DigitsTask, seeds) -> None:
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    again = DigitsTask({}, seed=0).make_seeds()
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, det)
    other = DigitsTask({}, seed=1).make_seeds()
    assert len(seeds) == 2
    for a, b, c in zip(seeds, again, other):
        assert a.dtype == np.float32 and a.shape == (NUM_PARAMS,)
        assert a.tobytes() == b.tobytes()
        assert not np.array_equal(a, c)
    assert not np.array_equal(seeds[0], seeds[1])


def test_seeds_specialise_on_their_half(task: DigitsTask, seeds, data) -> None:
    x, y = data
    yt = y[-360:]
    low, high = yt < 5, yt >= 5
    for params, own, other in ((seeds[0], low, high), (seeds[1], high, low)):
        correct = torch_correct(params, x[-360:], yt)
        assert correct[own].mean() > correct[other].mean() + 0.5
        assert 0.3 < task.test_score(params) < 0.6


def test_registered_and_options_validated(data) -> None:
    assert TASKS.get("digits") is DigitsTask
    small = build_task("digits", {"train_size": 100})
    assert small.num_datapoints == 100 and small.dimension == NUM_PARAMS
    params = np.zeros(NUM_PARAMS, dtype=np.float32)
    params[19200 + 7] = 1.0  # bias2 of class 7
    _, y = data
    np.testing.assert_array_equal(small.evaluate(params), (y[:100] == 7).astype(np.float32))
    assert small.test_score(params) == pytest.approx((y[-360:] == 7).mean())
    with pytest.raises(pydantic.ValidationError):
        DigitsTask({"train_sise": 100})
    with pytest.raises(pydantic.ValidationError):
        DigitsTask({"train_size": 1438})  # would overlap the 360 test rows


def test_export_loads_into_torch_and_predicts_the_same(task: DigitsTask, seeds, data, tmp_path) -> None:
    from safetensors.torch import load_file

    (path,) = task.export(seeds[0], tmp_path)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    model.load_state_dict(load_file(str(path)))
    x, y = data
    with torch.no_grad():
        predicted = model(torch.from_numpy(x[-360:].astype(np.float32))).argmax(dim=1).numpy()
    assert (predicted == y[-360:]).mean() == pytest.approx(task.test_score(seeds[0]))
