"""sklearn digits with a 64-256-10 MLP: the problem the M2N2 paper's reference numbers come from.

The data, split and parameter layout copy the public JAX reference so that our accuracies can be
compared with its numbers: unnormalised pixels, an unshuffled split (first rows train, last 360
test), and its flat parameter order [W1 (64x256), b1, W2 (256x10), b2]. The order matters: the
split point of M2N2's crossover falls somewhere in this vector.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from evomerge.tasks import TASKS, FitnessTask, check_indices

IN_DIM, HIDDEN, CLASSES = 64, 256, 10
NUM_ROWS, TEST_ROWS = 1797, 360
MAX_TRAIN = NUM_ROWS - TEST_ROWS  # 1437: more would leak test rows into training

# Each layer's kernel (in, out, row-major) comes before its bias, as in the reference code.
_W1 = slice(0, IN_DIM * HIDDEN)
_B1 = slice(_W1.stop, _W1.stop + HIDDEN)
_W2 = slice(_B1.stop, _B1.stop + HIDDEN * CLASSES)
_B2 = slice(_W2.stop, _W2.stop + CLASSES)
NUM_PARAMS = _B2.stop
assert NUM_PARAMS == 19210


def unflatten(params: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Views (no copies) into a flat vector, so the hot path never allocates for weights.

    Kernels are (in, out), as flax stores them; the forward pass is `x @ W + b`.
    """
    return (
        params[_W1].reshape(IN_DIM, HIDDEN),
        params[_B1],
        params[_W2].reshape(HIDDEN, CLASSES),
        params[_B2],
    )


def flatten(W1: np.ndarray, b1: np.ndarray, W2: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """Inverse of `unflatten`; shapes are checked because a transposed kernel would still fit."""
    expected = {"W1": (IN_DIM, HIDDEN), "b1": (HIDDEN,), "W2": (HIDDEN, CLASSES), "b2": (CLASSES,)}
    for name, arr in zip(expected, (W1, b1, W2, b2)):
        if np.shape(arr) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]}, got {np.shape(arr)}")
    parts = (W1, b1, W2, b2)
    return np.concatenate([np.asarray(p, dtype=np.float32).reshape(-1) for p in parts])


@functools.lru_cache(maxsize=1)
def _dataset() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.ascontiguousarray(digits.data, dtype=np.float32)
    y = np.asarray(digits.target, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _correct(params: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    W1, b1, W2, b2 = unflatten(params)
    # Overflow and inf*0 are expected from wild candidates and are handled below, not warned about.
    with np.errstate(over="ignore", invalid="ignore"):
        h = x @ W1
        h += b1
        np.maximum(h, 0.0, out=h)
        logits = h @ W2
        logits += b2
    hit = logits.argmax(axis=1) == y
    # argmax of a row holding NaN points at the NaN, which could match the label by accident.
    hit &= np.isfinite(logits).all(axis=1)
    return hit.astype(np.float32)


def _as_params(params: np.ndarray) -> np.ndarray:
    arr = np.asarray(params, dtype=np.float32)
    if arr.ndim != 1 or arr.shape[0] != NUM_PARAMS:
        raise ValueError(
            f"digits task expects a flat vector of {NUM_PARAMS} parameters, "
            f"got shape {arr.shape} ({arr.size} values)"
        )
    return arr


class DigitsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train_size: int = Field(
        default=MAX_TRAIN,
        ge=10,
        le=MAX_TRAIN,
        description="use only the first N rows for training, to shrink the problem; the last 360 rows stay the test set",
    )
    seed_steps: int = Field(default=10, ge=0, description="full-batch Adam steps per pretrained seed")
    seed_lr: float = Field(default=0.003, gt=0, description="Adam learning rate for the pretrained seeds")


@TASKS.register("digits")
class DigitsTask(FitnessTask):
    """Per-row 0/1 correctness, because M2N2's niches are built from which rows each member gets right."""

    Options = DigitsOptions
    supports_subsample = True

    def __init__(self, options: dict[str, Any] | BaseModel | None = None, seed: int = 0) -> None:
        super().__init__(options, seed=seed)
        x, y = _dataset()
        n = self.options.train_size
        self._x_train, self._y_train = x[:n], y[:n]
        self._x_test, self._y_test = x[-TEST_ROWS:], y[-TEST_ROWS:]

    @property
    def dimension(self) -> int:
        return NUM_PARAMS

    @property
    def num_datapoints(self) -> int:
        return int(self._y_train.shape[0])

    @property
    def layout(self):
        """The four tensors of the flat vector, so layer-wise strategies group by tensor."""
        from evomerge.models import Layout, TensorSpec

        shapes = {"W1": (IN_DIM, HIDDEN), "b1": (HIDDEN,), "W2": (HIDDEN, CLASSES), "b2": (CLASSES,)}
        tensors = []
        for (name, shape), part in zip(shapes.items(), (_W1, _B1, _W2, _B2)):
            tensors.append(TensorSpec(name, shape, "F32", part.start, part.stop - part.start))
        return Layout(tensors, NUM_PARAMS)

    def train_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Training inputs and labels (read-only), e.g. for DAM's per-seed distillation data."""
        return self._x_train, self._y_train

    def evaluate(self, params: np.ndarray, indices: np.ndarray | None = None) -> np.ndarray:
        idx = check_indices(self, indices)
        if idx is None:
            return _correct(_as_params(params), self._x_train, self._y_train)
        return _correct(_as_params(params), self._x_train[idx], self._y_train[idx])

    def test_score(self, params: np.ndarray) -> float:
        return float(_correct(_as_params(params), self._x_test, self._y_test).mean())

    def export(self, params: np.ndarray, out_dir: Path) -> list[Path]:
        """Save as the state dict of `nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))`."""
        from safetensors.numpy import save_file

        W1, b1, W2, b2 = unflatten(_as_params(params))
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "model.safetensors"
        tensors = {"0.weight": W1.T, "0.bias": b1, "2.weight": W2.T, "2.bias": b2}
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
                  metadata={"architecture": "Sequential(Linear(64,256), ReLU, Linear(256,10))",
                            "input": "8x8 pixels 0..16, unnormalised, flattened row-major"})
        return [path]

    def make_seeds(self) -> list[np.ndarray]:
        """Two specialists (digits 0-4 and 5-9) whose merge must combine disjoint skills."""
        return [
            self._train_specialist(stream=0, labels=range(0, 5)),
            self._train_specialist(stream=1, labels=range(5, 10)),
        ]

    def _train_specialist(self, stream: int, labels: range) -> np.ndarray:
        import torch  # only seed making needs torch; evaluation stays numpy

        from evomerge.determinism import deterministic_torch

        mask = np.isin(self._y_train, list(labels))
        x = torch.from_numpy(self._x_train[mask].copy())
        y = torch.from_numpy(self._y_train[mask].copy())
        # Independent, reproducible streams per (task seed, specialist) without touching torch's global RNG.
        state = np.random.SeedSequence([self.seed, stream]).generate_state(1, dtype=np.uint64)[0]
        gen = torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)

        # As the reference: every parameter starts N(0, 0.01^2), then a few Adam steps.
        flat = torch.randn(NUM_PARAMS, generator=gen) * 0.01
        W1, b1, W2, b2 = (torch.from_numpy(p.copy()) for p in unflatten(flat.numpy()))
        weights = [t.requires_grad_() for t in (W1, b1, W2, b2)]

        with deterministic_torch():
            opt = torch.optim.Adam(weights, lr=self.options.seed_lr)
            for _ in range(self.options.seed_steps):
                opt.zero_grad()
                logits = torch.relu(x @ W1 + b1) @ W2 + b2
                torch.nn.functional.cross_entropy(logits, y).backward()
                opt.step()
        return flatten(*(t.detach().numpy() for t in weights))
