"""The batching worker: one thread per model runs micro-batches from a bounded queue on its device.

Whenever the thread is free it takes every waiting structure (up to an atom budget) as one batch,
runs one batched forward pass and hands each result to its caller's event loop. Requests that
arrive during a forward pass form the next batch, so a lone client waits for nothing extra. Open
WebSocket sessions are expected back: while some have no step queued, the worker waits briefly for
them, so MD clients do not split into cohorts that alternate on the device at half the batch size.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from mlip import AtomicGraph, Potential

from .errors import ApiError
from .metrics import Metrics

log = logging.getLogger("mlip.server")
Outcome = dict[str, Any] | ApiError


class QueueFull(Exception):
    """The queue has no room for the request's structures."""


class DeviceTurns:
    """One forward pass at a time on a device, shared by the workers of every model served there.

    A ticket lock: workers get the device in the order they asked for it, so several models on one
    GPU neither run concurrently (competing for memory and cores) nor starve one another.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._now_serving = 0

    @contextmanager
    def turn(self) -> Iterator[None]:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._cond.wait_for(lambda: self._now_serving == ticket)
        try:
            yield
        finally:
            with self._cond:
                self._now_serving += 1
                self._cond.notify_all()


@dataclass(eq=False)
class Job:
    """One structure waiting for the worker, and where its result goes."""

    graph: AtomicGraph
    properties: frozenset[str]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    source: int  # which submit call (HTTP request, WebSocket message) it came from: the unit of fairness
    session: bool  # a WebSocket session's step: its session is not expected back until this is answered
    atoms: int = field(init=False)
    edges: int = field(init=False)
    enqueued: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.atoms = self.graph.positions.shape[0]
        self.edges = self.graph.edge_index.shape[1]


def _settle(outcomes: list[tuple[asyncio.Future, Outcome]]) -> None:
    """Runs on the event loop: resolve futures whose callers are still waiting."""
    for future, outcome in outcomes:
        if future.done():
            continue
        if isinstance(outcome, ApiError):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


class BatchWorker:
    """Runs ``potential.evaluate_graphs`` on batches gathered from a bounded queue, in its own thread."""

    def __init__(
        self,
        potential: Potential,
        metrics: Metrics,
        max_batch_atoms: int = 4096,
        max_wait_s: float = 0.0,
        max_queue: int = 1024,
        max_batch_edges: int = 1 << 62,
        device_turns: DeviceTurns | None = None,
        session_wait_s: float = 0.0,
    ) -> None:
        """``device_turns`` is shared by the workers of all models on the same device (default: this one alone).
        ``session_wait_s``: longest wait for open sessions' next steps (capped at half the last batch's time)."""
        self.potential, self.metrics, self.name = potential, metrics, potential.name
        self.device_turns = device_turns or DeviceTurns()
        self.max_batch_atoms, self.max_wait_s, self.max_queue = max_batch_atoms, max_wait_s, max_queue
        self.max_batch_edges = max_batch_edges  # memory scales with edges: a batch never exceeds this many
        self.session_wait_s = session_wait_s
        self._sessions = 0  # open WebSocket sessions on this model
        self._last_batch_s = 0.0
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._sources = itertools.count()
        self._busy_since: float | None = None  # monotonic time the running batch started; None when idle
        self.consecutive_failures = 0  # batches in a row with a device (non-input) failure
        self._thread = threading.Thread(target=self._loop, name=f"mlip-worker-{self.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the running batch, fail waiting jobs with 503 and join the thread."""
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        self._deliver([(job, ApiError(503, None, "server is shutting down")) for job in pending])
        if self._thread.is_alive():
            self._thread.join(timeout)

    def session_opened(self) -> None:
        with self._cond:
            self._sessions += 1

    def session_closed(self) -> None:
        with self._cond:
            self._sessions -= 1
            self._cond.notify()

    def submit(self, graphs: list[AtomicGraph], properties: set[str], session: bool = False) -> list[asyncio.Future]:
        """Enqueue all graphs or none (``QueueFull``); call from the event loop, await the futures.
        ``session``: the step of an open WebSocket session (``session_opened``)."""
        loop = asyncio.get_running_loop()
        source = next(self._sources)
        jobs = [Job(g, frozenset(properties), loop.create_future(), loop, source, session) for g in graphs]
        with self._cond:
            if self._stopping:
                raise QueueFull("server is shutting down")
            if len(self._queue) + len(jobs) > self.max_queue:  # drop abandoned jobs before refusing new ones
                self._queue = deque(job for job in self._queue if not job.future.done())
            if len(self._queue) + len(jobs) > self.max_queue:
                raise QueueFull(f"queue full ({len(self._queue)} of {self.max_queue} structures waiting)")
            self._queue.extend(jobs)
            self.metrics.queue_depth.labels(self.name).set(len(self._queue))
            self._cond.notify()
        return [job.future for job in jobs]

    def _take(self) -> list[Job] | None:
        """Block until work arrives; return everything waiting up to the atom budget (None: stopping)."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            if self.max_wait_s > 0:  # a fuller batch: until the atom budget is reached
                self._wait_until(self._budget_full, self._queue[0].enqueued + self.max_wait_s)
            # open sessions' next steps (at most half the last batch's time, so a fast model is not slowed by more)
            self._wait_until(
                lambda: self._budget_full() or sum(job.session for job in self._queue) >= self._sessions,
                time.perf_counter() + min(self.session_wait_s, self._last_batch_s / 2),
            )
            batch = self._fair_share()
            self.metrics.queue_depth.labels(self.name).set(len(self._queue))
            return batch

    def _budget_full(self) -> bool:
        return sum(job.atoms for job in self._queue) >= self.max_batch_atoms

    def _wait_until(self, done: Callable[[], bool], deadline: float) -> None:
        """Wait (holding ``_cond``) until ``done()``, the ``perf_counter`` ``deadline`` or a stop, whichever is first."""
        while not self._stopping and not done():
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _fair_share(self) -> list[Job]:
        """Up to the atom and edge budgets, one structure per waiting request in turn (oldest request first), so a
        request of a thousand structures cannot hold back the MD sessions queued behind it."""
        by_source: dict[int, deque[Job]] = {}
        for job in self._queue:
            if not job.future.done():  # caller gave up (timeout, disconnect)
                by_source.setdefault(job.source, deque()).append(job)
        batch, atoms, edges, taken = [], 0, 0, set()
        while by_source:
            for source in list(by_source):
                job = by_source[source][0]
                if batch and (atoms + job.atoms > self.max_batch_atoms or edges + job.edges > self.max_batch_edges):
                    by_source.clear()
                    break
                batch.append(by_source[source].popleft())
                atoms, edges = atoms + job.atoms, edges + job.edges
                taken.add(id(job))
                if not by_source[source]:
                    del by_source[source]
        self._queue = deque(job for job in self._queue if id(job) not in taken and not job.future.done())
        return batch

    def busy_for(self) -> float:
        """Seconds the running batch has taken so far (0 when idle): the liveness heartbeat."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    def failing(self, threshold: int) -> bool:
        return self.consecutive_failures >= threshold

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            self._busy_since = time.monotonic()
            try:
                self._run(batch)
            except Exception:  # keep serving whatever went wrong; callers then time out with 504
                log.exception("worker failed to run a batch of %d", len(batch))
            finally:
                self._busy_since = None

    def _run(self, batch: list[Job]) -> None:
        """Evaluate one batch and deliver every outcome; never lets an exception kill the thread."""
        start = time.perf_counter()
        with self.device_turns.turn():
            try:
                outcomes = self._evaluate(batch)
            except Exception as err:  # unexpected failure of the whole batch: isolate the culprit
                log.warning("batch of %d failed (%r); retrying one by one", len(batch), err)
                outcomes = None
            if outcomes is None:  # outside the except block: the failed pass's tensors are released first
                outcomes = [self._evaluate_alone(job) for job in batch]
        failed = all(isinstance(o, ApiError) and o.status >= 500 for o in outcomes)
        self.consecutive_failures = self.consecutive_failures + 1 if failed else 0
        seconds = self._last_batch_s = time.perf_counter() - start
        self.metrics.observe_batch(
            self.name, len(batch), sum(j.atoms for j in batch), [start - j.enqueued for j in batch], seconds
        )
        self._deliver(list(zip(batch, outcomes)))

    def _evaluate(self, batch: list[Job]) -> list[Outcome]:
        """One forward pass for the batch; on device out-of-memory, halves until each part fits."""
        properties = set().union(*(job.properties for job in batch))
        try:
            results = self.potential.evaluate_graphs([job.graph for job in batch], properties)
        except torch.cuda.OutOfMemoryError:
            results = None  # handled below, once the exception (and the activations it holds) is gone
        if results is None:
            if self.potential.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(batch) == 1:
                message = f"structure of {batch[0].atoms} atoms does not fit in {self.potential.device} memory"
                return [ApiError(413, None, message)]
            half = len(batch) // 2
            log.info("out of memory on a batch of %d structures; splitting", len(batch))
            return self._evaluate(batch[:half]) + self._evaluate(batch[half:])
        return [{k: v for k, v in r.items() if k in job.properties} for job, r in zip(batch, results)]

    def _evaluate_alone(self, job: Job) -> Outcome:
        """Evaluate one structure by itself. Input was validated before queueing, so a failure here is
        the server's (device fault, bug): a 500 that is counted, never a 4xx the client would treat as final."""
        try:
            return self._evaluate([job])[0]
        except Exception as err:
            log.exception("structure of %d atoms failed", job.atoms)
            self.metrics.worker_failures.labels(self.name).inc()
            return ApiError(500, None, f"the server failed to evaluate this structure: {type(err).__name__}: {err}")

    @staticmethod
    def _deliver(pairs: list[tuple[Job, Outcome]]) -> None:
        """Hand outcomes to each caller's event loop (one callback per loop)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, Outcome]]] = {}
        for job, outcome in pairs:
            by_loop.setdefault(job.loop, []).append((job.future, outcome))
        for loop, outcomes in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, outcomes)
            except RuntimeError:  # the caller's event loop has closed: nobody is waiting
                continue
