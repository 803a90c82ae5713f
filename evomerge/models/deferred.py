"""A tensor that a writer can plan with (name, shape, dtype) but whose values are made only when
it is written, so a model can be saved while holding one tensor at a time."""

from __future__ import annotations

from typing import Callable

import torch


class DeferredTensor:
    """Stands in for a tensor in `save_model_folder`: shard planning reads `shape`, `dtype` and
    `numel()`; the file writer calls `detach()`, which makes the values (and frees them after)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, make: Callable[[], torch.Tensor]) -> None:
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self._make = make

    def numel(self) -> int:
        return self.shape.numel()

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def detach(self) -> torch.Tensor:
        t = self._make()
        if tuple(t.shape) != tuple(self.shape) or t.dtype != self.dtype:
            raise RuntimeError(f"a deferred tensor made {tuple(t.shape)} {t.dtype}, not the planned "
                               f"{tuple(self.shape)} {self.dtype}")
        return t
