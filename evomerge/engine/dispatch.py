"""Sends children to the worker pool and collects scores.

Asynchronous by default (steady state): each worker keeps `depth` batches queued, so it starts
the next batch the moment it finishes one instead of waiting for a round trip through the
population. In sync mode children go out in rounds and are told in id order, so a fixed seed
reproduces the search exactly. A worker that dies mid-batch is restarted by Ray; its children go
out again, and a child that has killed its worker too often is recorded as failed.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import ray
from ray.exceptions import RayActorError

from evomerge.engine.population import EvalRecord, Population
from evomerge.strategies.base import Candidate, Evaluation

try:  # newer Ray raises this while an actor is restarting
    from ray.exceptions import ActorUnavailableError
    WORKER_ERRORS: tuple[type[BaseException], ...] = (RayActorError, ActorUnavailableError)
except ImportError:  # pragma: no cover
    WORKER_ERRORS = (RayActorError,)


class Dispatcher:
    def __init__(self, population: Population, workers: list[Any], batch: int, sync: bool,
                 max_retries_per_child: int, max_worker_deaths: int, depth: int = 2) -> None:
        self.population = population
        self.workers = list(workers)
        self.batch = batch
        self.sync = sync
        self.depth = depth
        self.max_retries = max_retries_per_child
        # A death fails every call queued on the worker, so allow that many failures per death.
        self.max_failed_calls = max_worker_deaths * depth
        self.load = [0] * len(workers)
        self.inflight: dict[Any, tuple[int, list[Candidate]]] = {}
        self.retry: deque[Candidate] = deque()
        self.attempts: dict[int, int] = {}
        self.failed_calls = [0] * len(workers)
        self.dead: set[int] = set()
        # A worker that died gets no children until Ray has restarted it and it answers a ping;
        # otherwise its re-sent children would burn their retries against a restarting actor.
        self.recovering: dict[Any, int] = {}

    # -- public ----------------------------------------------------------------------------
    def requeue(self, candidates: list[Candidate]) -> None:
        """Children issued before a snapshot but never told go out again after a resume."""
        self.retry.extend(sorted(candidates, key=lambda c: c.member_id))

    def advance(self, max_seconds: float) -> list[EvalRecord]:
        deadline = time.monotonic() + max_seconds
        records: list[EvalRecord] = []
        while not self.population.done and time.monotonic() < deadline:
            if self.sync:
                records.extend(self._sync_round())
            else:
                records.extend(self._async_step(deadline))
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
            batch.append(self.retry.popleft())
        while len(batch) < size:
            candidate = self.population.ask()
            if candidate is None:
                break
            batch.append(candidate)
        return batch

    def _submit(self, worker_index: int, batch: list[Candidate]) -> Any:
        ref = self.workers[worker_index].evaluate.remote([(c.member_id, c.genome) for c in batch])
        self.inflight[ref] = (worker_index, batch)
        self.load[worker_index] += 1
        return ref

    def _fill(self) -> None:
        for level in range(self.depth):
            for worker_index in self.ready_workers:
                if self.load[worker_index] <= level:
                    batch = self._next_batch(self.batch)
                    if not batch:
                        return
                    self._submit(worker_index, batch)

    def _async_step(self, deadline: float) -> list[EvalRecord]:
        self._fill()
        if not self.inflight and not self.recovering:
            self._raise_stalled()
            return []
        timeout = max(0.0, deadline - time.monotonic())
        ready, _ = ray.wait([*self.inflight, *self.recovering], num_returns=1, timeout=timeout)
        self._check_pings([ref for ref in ready if ref in self.recovering])
        records: list[EvalRecord] = []
        for ref in (r for r in ready if r in self.inflight):
            worker_index, batch = self.inflight.pop(ref)
            self.load[worker_index] -= 1
            try:
                evaluations: list[Evaluation] = ray.get(ref)
            except WORKER_ERRORS as exc:
                failed, again = self._handle_death(worker_index, batch, exc)
                self.retry.extend(again)
                evaluations = failed
            else:
                self.failed_calls[worker_index] = 0
            records.extend(self.population.tell(e) for e in evaluations)
        return records

    def _handle_death(self, worker_index: int, batch: list[Candidate],
                      exc: BaseException) -> tuple[list[Evaluation], list[Candidate]]:
        """Count the death; return the children that have used up their retries (as failures)
        and those that should go out again."""
        self.failed_calls[worker_index] += 1
        if self.failed_calls[worker_index] > self.max_failed_calls:
            self.dead.add(worker_index)
        else:
            self._ping(worker_index)
        if not self.live_workers:
            raise RuntimeError(f"every fitness worker has died (last error: {exc}); "
                               "check the worker logs and memory, or lower workers.count") from exc
        failed: list[Evaluation] = []
        again: list[Candidate] = []
        for candidate in batch:
            tries = self.attempts.get(candidate.member_id, 0) + 1
            self.attempts[candidate.member_id] = tries
            if tries > self.max_retries:
                failed.append(Evaluation(candidate.member_id, None, None,
                                         f"worker died {tries} times evaluating this child ({type(exc).__name__})"))
            else:
                again.append(candidate)
        return failed, again

    def _raise_stalled(self) -> None:
        if not self.population.done:
            raise RuntimeError("the strategy produced no candidate and nothing is in flight; "
                               "this is a bug in the strategy's ask()")

    # -- sync ------------------------------------------------------------------------------
    def _sync_round(self) -> list[EvalRecord]:
        candidates = self._next_batch(self.batch * len(self.live_workers))
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
            chunks = [todo[k::len(live)] for k in range(len(live))]
            refs = [self._submit(w, chunk) for w, chunk in zip(live, chunks) if chunk]
            for ref in refs:
                worker_index, batch = self.inflight.pop(ref)
                self.load[worker_index] -= 1
                try:
                    evaluations = ray.get(ref)
                    self.failed_calls[worker_index] = 0
                except WORKER_ERRORS as exc:
                    evaluations, _ = self._handle_death(worker_index, batch, exc)
                for evaluation in evaluations:
                    results[evaluation.member_id] = evaluation
                    pending.pop(evaluation.member_id)
        return [self.population.tell(results[k]) for k in sorted(results)]
