"""Dynamic batching: concurrent jobs that share a key run as one computation.

Callers ``await Batcher.submit(key, payload, size)``. Jobs wait in one bounded queue in
arrival order; one dispatcher task takes the oldest job, gathers the later jobs with the
same key until the batch holds ``max_batch_size`` samples or the oldest job has waited
``max_delay_s`` (whichever comes first), and hands the payloads to ``run_batch`` on the
batcher's own worker thread -- one thread per device, so the event loop stays free for
health checks while a large computation runs. ``run_batch`` returns one result per
payload, in order: each caller gets exactly its own.

Backpressure and limits live here too: a full queue raises ``QueueFull`` at once; a job
whose deadline passes raises ``DeadlineExceeded`` and frees its slot (a queued job is
dropped; a running one cannot be interrupted, its result is discarded); a job whose
caller disconnects or is cancelled is dropped the same way.

Nothing here knows about HTTP or torch: the service supplies keys, payloads and
``run_batch``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

P = TypeVar("P")
R = TypeVar("R")

# run_batch(key, payloads) -> one result per payload, in the same order.
BatchFn = Callable[[Hashable, list[P]], Sequence[R]]


class BatchingError(Exception):
    """Base of the batcher's refusals."""


class QueueFull(BatchingError):
    """The queue already holds ``max_queue`` waiting jobs."""


class DeadlineExceeded(BatchingError):
    """The job did not finish before its deadline."""


class Abandoned(BatchingError):
    """The caller went away (disconnected) before the job ran."""


@dataclass(frozen=True)
class Outcome(Generic[R]):
    """A job's result and where its time went."""

    result: R
    queue_s: float  # from submit to the start of its batch
    compute_s: float  # the whole batch's computation
    batch_samples: int  # samples in the batch it ran in
    batch_jobs: int  # jobs in the batch it ran in


@dataclass(eq=False)
class _Job(Generic[P, R]):
    key: Hashable
    payload: P
    size: int
    enqueued: float
    future: asyncio.Future[Outcome[R]]


@dataclass(frozen=True)
class BatchStats:
    """What one batch was: for metrics."""

    key: Hashable
    samples: int
    jobs: int
    compute_s: float
    failed: bool


class Batcher(Generic[P, R]):
    """Merge concurrent jobs with equal keys; run batches one at a time on one thread.

    ``max_batch_size``: most samples in one batch (1 turns merging off; a single job
    larger than this still runs, alone). ``max_delay_s``: how long the oldest job may
    wait for company. ``max_queue``: most jobs waiting (not counting the running batch).
    ``on_batch`` is called on the event loop after every batch.
    """

    def __init__(
        self,
        run_batch: BatchFn[P, R],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        on_batch: Callable[[BatchStats], None] | None = None,
        thread_name: str = "compute",
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_delay_s < 0:
            raise ValueError("Batcher: max_batch_size and max_queue >= 1, max_delay_s >= 0")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._queue: list[_Job[P, R]] = []
        self._arrived: asyncio.Event | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._running = 0  # jobs in the batch now computing
        # Jobs refused or dropped, by reason; "discarded": results computed for callers
        # already gone. Read by metrics from other threads, hence the lock.
        self._lock = threading.Lock()
        self.counters = {"queue_full": 0, "deadline": 0, "abandoned": 0, "discarded": 0}

    @property
    def depth(self) -> int:
        """Jobs waiting in the queue (not counting the batch that is running)."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """Jobs in the batch that is computing now."""
        return self._running

    def close(self) -> None:
        """Stop the dispatcher and the worker thread; waiting callers get cancelled."""
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        for job in self._queue:
            job.future.cancel()
        self._queue.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _count(self, reason: str) -> None:
        with self._lock:
            self.counters[reason] += 1

    async def submit(
        self,
        key: Hashable,
        payload: P,
        size: int = 1,
        *,
        timeout_s: float | None = None,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
        poll_s: float = 0.05,
    ) -> Outcome[R]:
        """Queue one job and wait for its own result.

        Raises ``QueueFull`` at once when the queue is full, ``DeadlineExceeded`` after
        ``timeout_s``, ``Abandoned`` when ``disconnected()`` (polled every ``poll_s``)
        turns true, or whatever ``run_batch`` raised for the job's batch.
        """
        loop = asyncio.get_running_loop()
        if len(self._queue) >= self.max_queue:
            self._count("queue_full")
            raise QueueFull(f"{len(self._queue)} jobs are waiting (the limit is {self.max_queue})")
        self._ensure_dispatcher()
        assert self._arrived is not None
        job: _Job[P, R] = _Job(key, payload, size, time.perf_counter(), loop.create_future())
        self._queue.append(job)
        self._arrived.set()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        try:
            while True:
                wait = poll_s if disconnected is not None else None
                if deadline is not None:
                    left = deadline - loop.time()
                    if left <= 0:
                        self._count("deadline")
                        raise DeadlineExceeded(f"no result within {timeout_s:g} s")
                    wait = left if wait is None else min(wait, left)
                done, _ = await asyncio.wait({job.future}, timeout=wait)
                if done:
                    return job.future.result()
                if disconnected is not None and await disconnected():
                    self._count("abandoned")
                    raise Abandoned("the client disconnected")
        finally:
            self._forget(job)

    def _forget(self, job: _Job[P, R]) -> None:
        """Drop a job whose caller stopped waiting (no-op once it has its result)."""
        if job.future.done():
            if not job.future.cancelled():
                job.future.exception()  # retrieved: no "never retrieved" warning
            return
        job.future.cancel()  # a running batch sees this and discards the job's result
        with contextlib.suppress(ValueError):
            self._queue.remove(job)

    def _ensure_dispatcher(self) -> None:
        # (Re)start the dispatcher on the running loop: after a failure, or when the app
        # is served by a new event loop (e.g. a second TestClient on the same app).
        loop = asyncio.get_running_loop()
        if (
            self._dispatcher is None
            or self._dispatcher.done()
            or self._dispatcher.get_loop() is not loop
        ):
            self._queue = [job for job in self._queue if job.future.get_loop() is loop]
            self._arrived = asyncio.Event()
            self._dispatcher = asyncio.get_running_loop().create_task(
                self._dispatch(), name="batch-dispatcher"
            )

    async def _dispatch(self) -> None:
        assert self._arrived is not None
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            batch = await self._collect()
            if batch:
                await self._run(batch)

    def _candidates(self, key: Hashable) -> list[_Job[P, R]]:
        """The oldest job's batch: later jobs with its key, in order, while they fit."""
        batch: list[_Job[P, R]] = []
        samples = 0
        for job in self._queue:
            if job.key != key:
                continue
            if batch and samples + job.size > self.max_batch_size:
                break
            batch.append(job)
            samples += job.size
            if samples >= self.max_batch_size:
                break
        return batch

    async def _collect(self) -> list[_Job[P, R]]:
        """Wait (at most ``max_delay_s`` after the oldest job arrived) for a full batch."""
        assert self._arrived is not None
        first = self._queue[0]
        while True:
            batch = self._candidates(first.key)
            samples = sum(job.size for job in batch)
            left = first.enqueued + self.max_delay_s - time.perf_counter()
            if samples >= self.max_batch_size or left <= 0:
                break
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)
            if not self._queue or self._queue[0] is not first:
                return []  # the oldest job left (timeout, disconnect): start over
        for job in batch:
            self._queue.remove(job)
        return batch

    async def _run(self, batch: list[_Job[P, R]]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        samples = sum(job.size for job in batch)
        self._running = len(batch)
        failed = False
        try:
            results = await loop.run_in_executor(
                self._executor, self._call, batch[0].key, [job.payload for job in batch]
            )
        except Exception as exc:  # the batch failed: every job in it gets the error
            failed = True
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
        else:
            compute_s = time.perf_counter() - started
            for job, result in zip(batch, results, strict=True):
                if job.future.done():
                    self._count("discarded")
                    continue
                job.future.set_result(
                    Outcome(result, started - job.enqueued, compute_s, samples, len(batch))
                )
        finally:
            self._running = 0
        if self._on_batch is not None:
            self._on_batch(
                BatchStats(batch[0].key, samples, len(batch), time.perf_counter() - started, failed)
            )

    def _call(self, key: Hashable, payloads: list[P]) -> Sequence[R]:
        results = self._run_batch(key, payloads)
        if len(results) != len(payloads):
            raise RuntimeError(
                f"run_batch returned {len(results)} results for {len(payloads)} payloads"
            )
        return results
