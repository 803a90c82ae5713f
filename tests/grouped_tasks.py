"""Test-only fitness task with groups: digits whose datapoints fall into two skills of unequal size."""

from __future__ import annotations

import numpy as np

from fitness.digits import TEST_ROWS, DigitsTask, _as_params, _correct

HEAD = 100  # training rows in group "head"; the rest are "tail" (train_size 300: 100 + 200)
TEST_HEAD = 120  # test rows in "head"; the other 240 are "tail"


class GroupedDigits(DigitsTask):
    """Digits with `groups` head/tail over the training rows and per-group test scores, through
    the default `held_out` (test_score, then test_scores)."""

    @property
    def groups(self) -> list[tuple[str, int]]:
        return [("head", HEAD), ("tail", self.num_datapoints - HEAD)]

    def test_scores(self, params: np.ndarray) -> dict[str, float]:
        correct = _correct(_as_params(params), self._x_test, self._y_test)
        return {"head": float(correct[:TEST_HEAD].mean()), "tail": float(correct[TEST_HEAD:TEST_ROWS].mean())}


class BadGroups(DigitsTask):
    """Groups that do not cover the datapoints: the search must refuse to start."""

    @property
    def groups(self) -> list[tuple[str, int]]:
        return [("head", 10), ("tail", 10)]
