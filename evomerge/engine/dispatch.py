"""Sends children to the worker pool and collects scores.

Asynchronous by default (steady state: a worker that finishes gets the next batch at once).
In sync mode children go out in rounds and are told in id order, so a fixed seed reproduces the
search exactly. A worker that dies mid-batch is restarted by Ray; its children go out again, and
a child that has killed its worker too often is recorded as failed instead of looping.
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
                 max_retries_per_child: int, max_worker_deaths: int) -> None:
        self.population = population
        self.workers = list(workers)
        self.batch = batch
        self.sync = sync
        self.max_retries = max_retries_per_child
        self.max_worker_deaths = max_worker_deaths
        self.idle: deque[int] = deque(range(len(workers)))
        self.inflight: dict[Any, tuple[int, list[Candidate]]] = {}
        self.retry: deque[Candidate] = deque()
        self.attempts: dict[int, int] = {}
        self.worker_deaths = [0] * len(workers)
        self.dead: set[int] = set()

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

    def drain(self) -> list[EvalRecord]:
        """Wait for every child in flight (before an async snapshot or on shutdown)."""
        records: list[EvalRecord] = []
        while self.inflight:
            ready, _ = ray.wait(list(self.inflight), num_returns=1)
            records.extend(self._collect(ready[0]))
        return records

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
        return ref

    def _async_step(self, deadline: float) -> list[EvalRecord]:
        while self.idle:
            batch = self._next_batch(self.batch)
            if not batch:
                break
            self._submit(self.idle.popleft(), batch)
        if not self.inflight:
            self._raise_stalled()
        timeout = max(0.0, deadline - time.monotonic())
        ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=timeout)
        records: list[EvalRecord] = []
        for ref in ready:
            records.extend(self._collect(ref))
        return records

    def _collect(self, ref: Any) -> list[EvalRecord]:
        worker_index, batch = self.inflight.pop(ref)
        try:
            evaluations: list[Evaluation] = ray.get(ref)
        except WORKER_ERRORS as exc:
            return self._worker_died(worker_index, batch, exc)
        self.worker_deaths[worker_index] = 0
        self.idle.append(worker_index)
        return [self.population.tell(e) for e in evaluations]

    def _worker_died(self, worker_index: int, batch: list[Candidate], exc: BaseException) -> list[EvalRecord]:
        failed, again = self._handle_death(worker_index, batch, exc)
        self.retry.extend(again)
        return [self.population.tell(e) for e in failed]

    def _handle_death(self, worker_index: int, batch: list[Candidate],
                      exc: BaseException) -> tuple[list[Evaluation], list[Candidate]]:
        """Count the death; return the children that have used up their retries (as failures)
        and those that should go out again."""
        self.worker_deaths[worker_index] += 1
        if self.worker_deaths[worker_index] > self.max_worker_deaths:
            self.dead.add(worker_index)
        else:
            self.idle.append(worker_index)
        if len(self.dead) == len(self.workers):
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
        live = [i for i in range(len(self.workers)) if i not in self.dead]
        candidates = self._next_batch(self.batch * len(live))
        if not candidates:
            self._raise_stalled()
            return []
        pending = {c.member_id: c for c in candidates}
        results: dict[int, Evaluation] = {}
        while pending:
            live = [i for i in range(len(self.workers)) if i not in self.dead]
            todo = sorted(pending.values(), key=lambda c: c.member_id)
            chunks = [todo[k::len(live)] for k in range(len(live))]
            refs = [self._submit(w, chunk) for w, chunk in zip(live, chunks) if chunk]
            for ref in refs:
                worker_index, batch = self.inflight.pop(ref)
                try:
                    evaluations = ray.get(ref)
                    self.worker_deaths[worker_index] = 0
                except WORKER_ERRORS as exc:
                    evaluations, _ = self._handle_death(worker_index, batch, exc)
                for evaluation in evaluations:
                    results[evaluation.member_id] = evaluation
                    pending.pop(evaluation.member_id)
        self.idle = deque(i for i in range(len(self.workers)) if i not in self.dead)
        return [self.population.tell(results[k]) for k in sorted(results)]
