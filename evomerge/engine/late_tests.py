"""`fitness.test_every: archive`: held-out tests decided after the tell, run as test-only jobs.

Whether a child enters an M2N2 archive is known only once the population has told it (the
competition runs there), so a worker scoring the child cannot decide whether to test it, as it
does for `best`. Instead the population queues a test job for every member the strategy admits
(and for every new best, so the summary's best always has its own score), the dispatcher sends
it to a worker, which rebuilds the candidate and runs only the held-out test, and the result is
recorded against the member after its trial was written (tracking/late_tests.py). Test jobs are
not evaluations: budgets and counters never see them. The queue is in every snapshot, so a
resume sends again the tests that were asked for but not recorded.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class TestJob:
    __test__ = False  # not a pytest class

    member_id: int
    genome: Any = field(repr=False)
    attempts: int = 0  # worker deaths while testing it


@dataclass
class TestRecord:
    """One held-out test of a member, as the study records it (None scores: not measured)."""

    __test__ = False

    member_id: int
    test_score: float | None
    test_scores: dict[str, float] | None = None  # per group, for a task with groups
    error: str | None = None
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.error is not None


class LateTests:
    """The members to test, in the order they were admitted, and those already asked for.

    `asked` holds every member ever queued (or found measured in the study on resume), so that
    a member admitted twice (a guide's best that was already the new best) is tested once."""

    def __init__(self) -> None:
        self.pending: deque[TestJob] = deque()
        self.inflight: dict[int, TestJob] = {}
        self.asked: set[int] = set()
        self.measured = 0
        self.failed = 0

    @property
    def outstanding(self) -> bool:
        return bool(self.pending or self.inflight)

    def want(self, member_id: int, genome: Any) -> None:
        if member_id in self.asked:
            return
        self.asked.add(member_id)
        self.pending.append(TestJob(member_id, genome))

    def take(self, size: int) -> list[TestJob]:
        """Up to `size` jobs to send; they stay in flight until `back` or `again`."""
        jobs = [self.pending.popleft() for _ in range(min(size, len(self.pending)))]
        self.inflight.update((job.member_id, job) for job in jobs)
        return jobs

    def again(self, jobs: list[TestJob]) -> None:
        """Jobs whose worker died or hung: out again, before newer ones."""
        for job in sorted(jobs, key=lambda j: j.member_id, reverse=True):
            self.inflight.pop(job.member_id, None)
            self.pending.appendleft(job)

    def back(self, record: TestRecord) -> None:
        self.inflight.pop(record.member_id, None)
        if record.failed:
            self.failed += 1
        elif record.test_score is not None:
            self.measured += 1

    def known(self, member_ids: set[int]) -> None:
        """Members whose test the study already holds (recorded before a crash): never again."""
        self.asked.update(member_ids)
        self.pending = deque(job for job in self.pending if job.member_id not in member_ids)

    # -- snapshots ---------------------------------------------------------------------------
    def state_dict(self, space: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Jobs not yet back (in flight ones first, as they were taken first), with genomes."""
        jobs = [*sorted(self.inflight.values(), key=lambda j: j.member_id), *self.pending]
        meta = {"jobs": [[j.member_id, j.attempts] for j in jobs], "asked": sorted(self.asked),
                "counts": [self.measured, self.failed]}
        return meta, (space.pack([j.genome for j in jobs], "late_tests") if jobs else {})

    def load_state_dict(self, meta: dict[str, Any] | None, arrays: dict[str, np.ndarray], space: Any) -> None:
        self.__init__()  # type: ignore[misc]
        if not meta:
            return
        genomes = space.unpack(arrays, "late_tests") if meta["jobs"] else []
        self.pending = deque(TestJob(int(m), g, int(a)) for (m, a), g in zip(meta["jobs"], genomes))
        self.asked = {int(m) for m in meta["asked"]}
        self.measured, self.failed = (int(v) for v in meta["counts"])
