"""The in-process loop, serial and with children held in flight (benchmarks/staleness.py)."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from _common import load_population  # noqa: E402

from evomerge.engine.local import run_local  # noqa: E402


def _config(budget: int = 120):
    return load_population("digits-scratch", {"budget.evaluations": budget, "seed": 3})


def test_serial_loop_has_no_staleness_and_spends_the_budget() -> None:
    population = run_local(_config())
    assert population.told == 120 and population.staleness_total == 0
    assert population.staleness_count == 120


def test_children_in_flight_are_told_oldest_first_with_k_minus_1_staleness() -> None:
    records = []
    population = run_local(_config(), on_record=records.append, in_flight=5)
    assert population.told == 120 and [r.number for r in records] == list(range(120))
    # Oldest first: member ids come back in the order they were issued.
    assert [r.member_id for r in records] == sorted(r.member_id for r in records)
    # A child's staleness is the number queued ahead of it at its ask. The two initial members go
    # out together (children wait for their scores): 0 and 1. Then the queue refills from empty:
    # the first four children have 0, 1, 2 and 3 ahead, and every later one has 4. The queue
    # draining at the end of the budget changes nothing, since nothing is asked then.
    expected = (0 + 1) + (0 + 1 + 2 + 3) + 4 * (120 - 2 - 4)
    assert population.staleness_total == expected


def test_in_flight_must_be_positive() -> None:
    with pytest.raises(ValueError, match="in_flight must be >= 1"):
        run_local(_config(), in_flight=0)
