"""Sends children to the worker pool and collects scores.

Asynchronous by default (steady state): each worker keeps `depth` batches queued, so it starts
the next batch the moment it finishes one instead of waiting for a round trip through the
population. In sync mode children go out in rounds and are told in id order, so a fixed seed
reproduces the search exactly. A worker that dies mid-batch is restarted by Ray; its children go
out again, and a child that has killed its worker too often is recorded as failed. With
`workers.timeout_seconds`, a worker whose call outlives its children's limits (plus a grace: the
worker's own alarm should have stopped them, see timeouts.py) is killed the same way; its queued
calls go out again free, and the stuck call's children go out alone, so that a child that hangs
takes no other child down with it.

With `fitness.test_every: archive` the population also queues test-only jobs (engine/late_tests.py);
they go out before new children, on the same workers and with the same death and hang handling,
and the search is over only once they are back.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from typing import Any, Sequence

import ray
from ray.exceptions import RayActorError

from evomerge.engine.late_tests import TestJob, TestRecord
from evomerge.engine.population import EvalRecord, Population
from evomerge.engine.timeouts import HangWatch
from evomerge.genomes.offspring import ParentMirror, realise
from evomerge.strategies.base import Candidate, Evaluation

try:  # newer Ray raises this while an actor is restarting
    from ray.exceptions import ActorUnavailableError
    WORKER_ERRORS: tuple[type[BaseException], ...] = (RayActorError, ActorUnavailableError)
except ImportError:  # pragma: no cover
    WORKER_ERRORS = (RayActorError,)


SYNC_AUTO_BATCH = 4  # `auto` in sync mode: round sizes must not depend on timing


class BatchSizer:
    """How many children go in one worker call.

    A call costs about 1-2 ms of CPU (population actor, raylet, worker) whatever its size, so a
    cheap fitness (digits: ~1.3 ms) needs dozens of children per call, while a slow one needs one
    per call: a 5 s child must not wait behind others, and every child in flight is bred from an
    older archive. `auto` aims at `TARGET_SECONDS` of fitness work per call, measured from the
    evaluations' own `seconds` (so Ray's overhead does not feed back), capped. The median of the
    last few calls' means shrugs off a slow first call (imports, warm-up) within a few calls.
    """

    TARGET_SECONDS = 0.025
    CAP = 64

    def __init__(self, batch: int | str, sync: bool) -> None:
        if batch == "auto":
            self.fixed: int | None = SYNC_AUTO_BATCH if sync else None
        else:
            self.fixed = int(batch)
        self.recent: deque[float] = deque(maxlen=7)  # mean seconds of one evaluation, per call

    def observe(self, evaluations: Sequence[Evaluation]) -> None:
        times = [e.seconds for e in evaluations if e.seconds > 0]
        if times:
            self.recent.append(sum(times) / len(times))

    def size(self, unissued: int, slots: int) -> int:
        """Children for the next call, with `unissued` children left in the budget and `slots`
        calls (workers x depth) to share them: the last ones are split evenly, not sent to one."""
        if self.fixed is not None:
            return self.fixed
        if not self.recent:
            return 1  # nothing measured yet: the first results set the pace
        seconds = statistics.median(self.recent)
        size = min(self.CAP, max(1, int(self.TARGET_SECONDS / seconds))) if seconds > 0 else self.CAP
        return max(1, min(size, math.ceil(unissued / max(1, slots))))


SLOW_SECONDS = 1.0  # `pipeline: auto`: from this many seconds per evaluation, nothing is queued ahead
AUTO_DEPTH = 2  # `pipeline: auto` below that: what `pipeline: 2` queues


def auto_depth(sizer: BatchSizer) -> int:
    """`workers.pipeline: auto`: one call per worker (a child is asked the moment a worker frees
    up) while nothing is measured yet or an evaluation takes SLOW_SECONDS or more, else
    AUTO_DEPTH. A queued call saves a worker the round trip to the population (about a
    millisecond), which matters for a 2 ms fitness and not at all for a 5 s one; but every child
    queued is bred from an archive one call older, and at LLM budgets (a few thousand
    evaluations) that staleness costs accuracy (benchmarks/staleness.py)."""
    if not sizer.recent:
        return 1
    return 1 if statistics.median(sizer.recent) >= SLOW_SECONDS else AUTO_DEPTH


class Dispatcher:
    def __init__(self, population: Population, workers: list[Any], batch: int | str, sync: bool,
                 max_retries_per_child: int, max_worker_deaths: int, depth: int | str = 2,
                 timeout: float | None = None, grace_seconds: float | None = None) -> None:
        self.population = population
        self.workers = list(workers)
        self.sizer = BatchSizer(batch, sync)
        self.sync = sync
        self.auto_depth = depth == "auto"
        self.depth = AUTO_DEPTH if self.auto_depth else int(depth)
        self.max_retries = max_retries_per_child
        # A death fails every call queued on the worker, so allow that many failures per death.
        self.max_failed_calls = max_worker_deaths * self.depth
        self.load = [0] * len(workers)
        self.inflight: dict[Any, tuple[int, list[Candidate]]] = {}
        self.test_calls: dict[Any, tuple[int, list[TestJob]]] = {}  # test-only calls out
        self.test_records: list[TestRecord] = []  # test results not yet taken by the caller
        self.retry: deque[Candidate] = deque()
        self.attempts: dict[int, int] = {}
        self.failed_calls = [0] * len(workers)
        self.dead: set[int] = set()
        # A worker that died gets no children until Ray has restarted it and it answers a ping;
        # otherwise its re-sent children would burn their retries against a restarting actor.
        self.recovering: dict[Any, int] = {}
        self._elements_ref: tuple[int, list[Any]] | None = None
        self.hangs = HangWatch(len(workers), timeout, grace_seconds)  # workers.timeout_seconds
        self.mirror = ParentMirror(len(workers))  # which archive members each worker holds

    # -- public ----------------------------------------------------------------------------
    def requeue(self, candidates: list[Candidate]) -> None:
        """Children asked but never told go out again after a resume: the snapshot's, and the
        ones the replay asked again (engine/replay.py)."""
        self.retry.extend(sorted(candidates, key=lambda c: c.member_id))

    def advance(self, max_seconds: float) -> list[EvalRecord]:
        """At least one step (a sync round, or one async wait), then more until `max_seconds`
        are up: a stretch of 0 seconds is one round, not a driver spinning on empty stretches."""
        deadline = time.monotonic() + max_seconds
        records: list[EvalRecord] = []
        while not self.over:
            if self.sync and self.population.pending_tests:  # left by a resume
                self._sync_tests()
            elif self.sync:
                records.extend(self._sync_round())
            else:
                records.extend(self._async_step(deadline))
            if time.monotonic() >= deadline:
                break
        return records

    @property
    def over(self) -> bool:
        """The budget is spent (or the strategy is done) and every test job is back."""
        return self.population.done and not self.population.tests_outstanding

    def take_test_records(self) -> list[TestRecord]:
        """The test results since the last call, for the study (tracking/late_tests.py)."""
        records, self.test_records = self.test_records, []
        return records

    @property
    def live_workers(self) -> list[int]:
        return [i for i in range(len(self.workers)) if i not in self.dead]

    @property
    def ready_workers(self) -> list[int]:
        pinging = set(self.recovering.values())
        return [i for i in self.live_workers if i not in pinging]

    def _ping(self, worker_index: int) -> None:
        if worker_index not in self.recovering.values() and worker_index not in self.dead:
            self.recovering[self.workers[worker_index].pid.remote()] = worker_index

    def _check_pings(self, refs: list[Any]) -> None:
        for ref in refs:
            worker_index = self.recovering.pop(ref)
            try:
                ray.get(ref)
            except WORKER_ERRORS:
                self.failed_calls[worker_index] += 1
                if self.failed_calls[worker_index] > self.max_failed_calls:
                    self.dead.add(worker_index)
                else:
                    time.sleep(0.05)
                    self._ping(worker_index)

    def _wait_for_recovery(self) -> None:
        while self.recovering:
            ready, _ = ray.wait(list(self.recovering), num_returns=1)
            self._check_pings(ready)

    # -- async -----------------------------------------------------------------------------
    def _next_batch(self, size: int) -> list[Candidate]:
        batch: list[Candidate] = []
        while len(batch) < size and self.retry:
            if self.retry[0].member_id in self.hangs.suspects:
                return batch or [self.retry.popleft()]  # a child that may hang goes alone
            batch.append(self.retry.popleft())
        # Sync mode: children re-sent after a resume make a round of their own, as the search
        # that ran straight through told them before asking more.
        if len(batch) < size and not (self.sync and batch):
            batch.extend(self.population.ask_batch(size - len(batch)))
        return batch

    def _elements(self) -> Any:
        """What workers need to hold the population's added basis elements (None: there are none).

        The genomes go into the object store once per change; each call carries only the count
        and a nested ref, which a worker resolves only when it is behind."""
        elements = self.population.basis_elements
        if not elements:
            return None
        if self._elements_ref is None or self._elements_ref[0] != len(elements):
            self._elements_ref = (len(elements), [ray.put(elements)])
        return self._elements_ref

    def _submit(self, worker_index: int, batch: list[Candidate]) -> Any:
        genomes, parents = self.mirror.wire(worker_index, [c.genome for c in batch])
        # The best's train score now: a child told later is judged against this or a higher one.
        items = [(c.member_id, g) if c.indices is None else (c.member_id, g, self.population.job(c))
                 for c, g in zip(batch, genomes)]
        ref = self.workers[worker_index].evaluate.remote(items,
                                                         self._elements(), *parents,
                                                         test_above=self.population.test_threshold())
        self.inflight[ref] = (worker_index, batch)
        self.load[worker_index] += 1
        self.hangs.started(worker_index, ref, len(batch))
        return ref

    def _finish(self, ref: Any, calls: dict[Any, Any] | None = None) -> tuple[int, list[Any]]:
        """Take a call that came back (or failed) off the books."""
        worker_index, batch = (self.inflight if calls is None else calls).pop(ref)
        self.load[worker_index] -= 1
        self.hangs.finished(worker_index, ref)
        return worker_index, batch

    # -- test-only jobs (test_every: archive) ------------------------------------------------
    def _submit_tests(self, worker_index: int, slots: int) -> Any:
        """One test call of the queued jobs' share for this worker; None when none are queued."""
        jobs = self.population.take_tests(self.sizer.size(self.population.pending_tests, slots))
        if not jobs:
            return None
        ref = self.workers[worker_index].test.remote([(job.member_id, job.genome) for job in jobs],
                                                     self._elements())
        self.test_calls[ref] = (worker_index, jobs)
        self.load[worker_index] += 1
        self.hangs.started(worker_index, ref, len(jobs))
        return ref

    def _collect_tests(self, ref: Any) -> None:
        """Tell a test call's results; a dead or hung worker's jobs go out again, and one that
        has used up its retries is recorded as a failed test (the search goes on)."""
        worker_index, jobs = self._finish(ref, self.test_calls)
        try:
            results = ray.get(ref)
        except WORKER_ERRORS as exc:
            hung, behind = self._count_death(worker_index, exc, ref)
            results, again = [], []
            for job in jobs:
                job.attempts += 0 if behind else 1
                if job.attempts > self.max_retries:
                    why = "was stuck past workers.timeout_seconds" if hung else f"died ({type(exc).__name__})"
                    results.append(TestRecord(job.member_id, None, error=f"the worker testing this member {why} "
                                                                        f"{job.attempts} times"))
                else:
                    again.append(job)
            self.population.retry_tests(again)
        else:
            self.failed_calls[worker_index] = 0
        self.test_records.extend(self.population.tell_test(r) for r in results)

    def _sync_tests(self) -> None:
        """Sync mode: every queued test, spread over the workers, told in a fixed order."""
        while self.population.pending_tests:
            self._wait_for_recovery()
            live = self.live_workers
            if not live:
                raise RuntimeError("every fitness worker has died; check the worker logs and memory")
            refs = [ref for w in live if (ref := self._submit_tests(w, len(live))) is not None]
            for ref in refs:
                self._wait_within_limit(ref)
                self._collect_tests(ref)

    def _stop_hung(self) -> None:
        """Kill every worker whose oldest call has outlived its limit; Ray restarts it.

        A call that is back but not yet taken is not stuck: it outlived its limit on our clock
        only because this actor was busy elsewhere (DAM training inline on a worker, say), so
        it is left to be collected and its worker is spared."""
        for worker_index in self.hangs.overdue(done=lambda ref: bool(ray.wait([ref], timeout=0)[0])):
            ray.kill(self.workers[worker_index], no_restart=False)

    def _fill(self) -> None:
        ready = self.ready_workers
        if self.auto_depth:
            self.depth = auto_depth(self.sizer)
        for level in range(self.depth):
            for worker_index in ready:
                if self.load[worker_index] <= level:
                    if self._submit_tests(worker_index, len(ready) * self.depth) is not None:
                        continue  # a test job goes out before new children
                    unissued = self.population.unasked + len(self.retry)
                    batch = self._next_batch(self.sizer.size(unissued, len(ready) * self.depth))
                    if not batch:
                        return
                    self._submit(worker_index, batch)

    def _async_step(self, deadline: float) -> list[EvalRecord]:
        self._fill()
        if not self.inflight and not self.test_calls and not self.recovering:
            strategy = self.population.strategy
            if strategy.busy:  # e.g. DAM training its next chunk, with nothing out to wait for
                strategy.wait(max(0.0, min(0.05, deadline - time.monotonic())))
                return []
            self._raise_stalled()
            return []
        timeout = max(0.0, deadline - time.monotonic())
        hang = self.hangs.until_hang()
        if hang is not None:
            timeout = min(timeout, max(0.0, hang) + 0.01)
        ready, _ = ray.wait([*self.inflight, *self.test_calls, *self.recovering], num_returns=1, timeout=timeout)
        self._check_pings([ref for ref in ready if ref in self.recovering])
        for ref in (r for r in ready if r in self.test_calls):
            self._collect_tests(ref)
        records: list[EvalRecord] = []
        for ref in (r for r in ready if r in self.inflight):
            worker_index, batch = self._finish(ref)
            try:
                evaluations, stale = ray.get(ref)
            except WORKER_ERRORS as exc:
                failed, again = self._handle_death(worker_index, batch, exc, ref)
                self.retry.extend(again)
                evaluations = failed
            else:
                self.failed_calls[worker_index] = 0
                self.sizer.observe(evaluations)
                self.retry.extend(self._stale(worker_index, batch, stale))
            if self.hangs.suspects:
                self.hangs.suspects.difference_update(e.member_id for e in evaluations)
            records.extend(self.population.tell(e) for e in evaluations)
        self._stop_hung()
        return records

    def _stale(self, worker_index: int, batch: list[Candidate], stale: list[int]) -> list[Candidate]:
        """Children the worker could not breed (its parent cache was not what we thought: it
        restarted unnoticed): not its fault, so no retry is used up. Its cache is sent afresh, and
        the children go again whole, so that no cache can send them round for ever."""
        if not stale:
            return []
        self.mirror.forget(worker_index)
        wanted = set(stale)
        again = [c for c in batch if c.member_id in wanted]
        for candidate in again:
            candidate.genome = realise(candidate.genome)
        return again

    def _handle_death(self, worker_index: int, batch: list[Candidate], exc: BaseException,
                      ref: Any = None) -> tuple[list[Evaluation], list[Candidate]]:
        """Count the death; return the children that have used up their retries (as failures)
        and those that should go out again."""
        hung, behind = self._count_death(worker_index, exc, ref)
        batch, innocent = ([], batch) if behind else (batch, [])  # behind a hung call: out again, free
        failed: list[Evaluation] = []
        again: list[Candidate] = list(innocent)
        for candidate in batch:
            tries = self.attempts.get(candidate.member_id, 0) + 1
            self.attempts[candidate.member_id] = tries
            if hung:
                self.hangs.suspects.add(candidate.member_id)
            if tries > self.max_retries:
                why = (f"worker was stuck past workers.timeout_seconds={self.hangs.timeout:g} s and restarted "
                       f"{tries} times evaluating this child" if hung else
                       f"worker died {tries} times evaluating this child ({type(exc).__name__})")
                failed.append(Evaluation(candidate.member_id, None, None, why))
            else:
                again.append(candidate)
        return failed, again

    def _count_death(self, worker_index: int, exc: BaseException, ref: Any) -> tuple[bool, bool]:
        """Book a failed call's worker death (it is pinged until Ray has restarted it, or given up
        on); returns (its worker was killed for this call, it died behind a hung call)."""
        hung, behind = self.hangs.verdict(ref)
        self.mirror.forget(worker_index)
        self.failed_calls[worker_index] += 1
        if self.failed_calls[worker_index] > self.max_failed_calls:
            self.dead.add(worker_index)
        else:
            self._ping(worker_index)
        if not self.live_workers:
            raise RuntimeError(f"every fitness worker has died (last error: {exc}); "
                               "check the worker logs and memory, or lower workers.count") from exc
        return hung, behind

    def _raise_stalled(self) -> None:
        if not self.population.done:
            raise RuntimeError("the strategy produced no candidate and nothing is in flight; "
                               "this is a bug in the strategy's ask()")

    # -- sync ------------------------------------------------------------------------------
    def _sync_round(self) -> list[EvalRecord]:
        assert self.sizer.fixed is not None  # sync mode never sizes by timing
        candidates = self._next_batch(self.sizer.fixed * len(self.live_workers))
        if not candidates:
            self._raise_stalled()
            return []
        pending = {c.member_id: c for c in candidates}
        results: dict[int, Evaluation] = {}
        while pending:
            self._wait_for_recovery()
            live = self.live_workers
            if not live:
                raise RuntimeError("every fitness worker has died; check the worker logs and memory")
            todo = sorted(pending.values(), key=lambda c: c.member_id)
            alone = [c for c in todo if c.member_id in self.hangs.suspects]
            if alone:  # children of a stuck call go out one per worker before the rest
                chunks = [[c] for c in alone[:len(live)]]
            else:
                chunks = [todo[k::len(live)] for k in range(len(live))]
            refs = [self._submit(w, chunk) for w, chunk in zip(live, chunks) if chunk]
            for ref in refs:
                self._wait_within_limit(ref)
                worker_index, batch = self._finish(ref)
                try:
                    evaluations, stale = ray.get(ref)
                    self.failed_calls[worker_index] = 0
                    self._stale(worker_index, batch, stale)  # they stay pending: sent again below
                except WORKER_ERRORS as exc:
                    evaluations, _ = self._handle_death(worker_index, batch, exc, ref)
                for evaluation in evaluations:
                    results[evaluation.member_id] = evaluation
                    pending.pop(evaluation.member_id)
        self.hangs.suspects.difference_update(results)
        told = [self.population.tell(results[k]) for k in sorted(results)]
        self._sync_tests()  # the round's admissions, before the next round is asked
        return told

    def _wait_within_limit(self, ref: Any) -> None:
        """Sync mode: wait for a call, killing its worker if it outlives its limit."""
        left = self.hangs.until_hang()
        while left is not None and not ray.wait([ref], timeout=max(0.0, left) + 0.01)[0]:
            self._stop_hung()
            left = self.hangs.until_hang()
