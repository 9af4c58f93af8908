"""Long derivative work as jobs: queued, run in chunks with progress, cancellable, bounded.

Any derivative request can be a job (``POST /jobs`` names its operation, as the endpoint's
path or kind, and carries the endpoint's body). ``JobStore.submit`` checks it exactly as
the endpoint does -- ``DerivativeService.prepare``, so a 404, 413 or 422 comes back at
once, before any work -- and queues it. A job thread runs it in chunks:

- dense kinds (``Operation.chunks_by_sample``: /jacobian, /hessian) a few samples at a
  time, ``HESSIAN_JOB_CHUNK_PRODUCTS`` products a chunk (one product: one matrix row;
  at least one sample), and the parts are joined into the one result;
- the matrix-free operators in one call that gets the job's ``Progress`` through
  ``Selection.progress``; their engine function advances it per chunk.

Between chunks the autodiff lock is free (each engine call takes it itself) and the job
waits while ordinary requests are queued or computing, so they are served within one
chunk; ``cancel`` sets the progress's flag and the engine (or the chunk loop) stops with
``Cancelled`` at the next chunk. A job ends ``succeeded`` (its result kept as
``job_results.StoredResult``, fetched in any encoding), ``failed`` (with the problem
body the endpoint would have answered) or ``cancelled``.

Bounded: ``max_jobs`` kept (the oldest finished one is evicted for a new job; 503 when
every kept one is live), ``max_queued`` waiting (503), ``ttl_s`` after a job finished
(then it is gone: 404), ``timeout_s`` of running (then it fails, 504), and
``max_result_bytes`` of results held together (older finished jobs are evicted to fit).
Jobs live in this process's memory unless a job folder is given: then each job's record
and result are written there and reloaded at start (a job that was queued or running
when the server stopped comes back ``failed``, saying so); every job body says which
(``persistent``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from hessian_service.config import Settings
from hessian_service.engine import AUTODIFF_LOCK, DerivativeResult, Objective
from hessian_service.engine.progress import Cancelled, Progress, ProgressSnapshot
from hessian_service.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    Overloaded,
    ServiceError,
    TooLarge,
    problem,
    problem_of,
)
from hessian_service.serving.job_results import ENCODINGS, JobFolder, StoredResult
from hessian_service.serving.operations import OPERATIONS, Operation, operation_for
from hessian_service.serving.request import PreparedRequest
from hessian_service.serving.service import DerivativeService
from hessian_service.units import format_bytes
from hessian_service.wire.binary import Encoded

logger = logging.getLogger("hessian_service.jobs")

# Between two chunks a job waits while ordinary requests are queued or computing, at most
# this long (so that a steady stream of requests slows a job down but never stops it).
YIELD_MAX_S = 2.0
_YIELD_POLL_S = 0.002


class JobState(str, Enum):
    """Where a job is: waiting, computing, or one of the three ends."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return str(self.value)

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobLimits:
    """The bounds of a job store (from ``Settings``: HESSIAN_MAX_JOBS, ...)."""

    max_jobs: int = 64
    max_queued: int = 16
    workers: int = 1
    ttl_s: float = 3600.0
    timeout_s: float = 3600.0
    chunk_products: int = 1024
    max_result_bytes: int = 2 << 30

    @classmethod
    def from_settings(cls, settings: Settings) -> JobLimits:
        return cls(
            max_jobs=settings.max_jobs,
            max_queued=settings.max_queued_jobs,
            workers=settings.job_workers,
            ttl_s=settings.job_ttl_s,
            timeout_s=settings.job_timeout_s,
            chunk_products=settings.job_chunk_products,
            max_result_bytes=settings.max_job_result_bytes,
        )


def job_operation(name: str) -> Operation:
    """The operation a job names: its endpoint's path (``/hessian/trace``) or kind
    (``hessian/trace``, ``hessian_trace``); 422 naming ``operation`` otherwise."""
    text = name.strip().strip("/")
    for candidate in dict.fromkeys((text, text.replace("_", "/"), text.replace("-", "/"))):
        try:
            return operation_for(candidate)
        except (KeyError, ValueError):
            continue
    known = ", ".join(f"/{kind}" for kind in OPERATIONS)
    raise InvalidInput(
        f"operation: {name!r} is not a derivative operation; expected one of {known}",
        field="operation",
    )


def within_request(error: ServiceError) -> ServiceError:
    """``error`` of an endpoint's check, its field as the job body names it: ``model``
    becomes ``request.model``, ``inputs[0].shape`` ``request.inputs[0].shape``."""
    if error.field:
        if error.detail.startswith(f"{error.field}:"):
            error.detail = f"request.{error.detail}"
            error.args = (error.detail,)
        error.field = f"request.{error.field}"
    return error


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


def _holds_autodiff_lock() -> bool:
    """True when this thread holds the engine's lock (then waiting would block others)."""
    owned: Callable[[], bool] | None = getattr(AUTODIFF_LOCK, "_is_owned", None)
    return bool(owned()) if owned is not None else False


class JobProgress(Progress):
    """A job's ``Progress``: also stops the work at its deadline (``timed_out``), and
    after each chunk yields to ordinary requests (``between_chunks``)."""

    def __init__(
        self, total: int, *, deadline: float, between_chunks: Callable[[JobProgress], None]
    ) -> None:
        super().__init__(total)
        self.deadline = deadline
        self.timed_out = False
        self._between_chunks = between_chunks

    def check(self) -> None:
        if not self.cancelled and time.monotonic() > self.deadline:
            self.timed_out = True
            self.cancel()
        super().check()

    def advance(self, products: int = 1) -> None:
        super().advance(products)
        self._between_chunks(self)


@dataclass(eq=False)
class Job:
    """One job: what it computes, where it is, and (once it succeeded) its result."""

    id: str
    operation: str  # the kind, e.g. "hessian" or "hessian/trace"
    model: str
    model_version: str
    samples: int
    encoding: str  # the request's: what GET /jobs/{id}/result answers by default
    created: float  # wall-clock seconds (time.time)
    planned_products: int  # the total before it starts (0: the engine plans it)
    persistent: bool
    state: JobState = JobState.QUEUED
    started: float | None = None
    finished: float | None = None
    progress: JobProgress | None = None
    final: ProgressSnapshot | None = None  # the progress when it ended
    problem: dict[str, Any] | None = None  # failed: the endpoint's problem body
    result: StoredResult | None = None  # in memory (None in a job folder: on disk)
    result_bytes: int | None = None
    header_length: int | None = None
    # What DerivativeService.prepare gave (a dense PreparedRequest, or an operator's
    # prepared request); dropped once the job ran.
    prepared: Any = field(default=None, repr=False)
    cancel_requested: bool = False

    def snapshot(self) -> ProgressSnapshot:
        if self.final is not None:
            return self.final
        if self.progress is not None:
            return self.progress.snapshot()
        return ProgressSnapshot(0, self.planned_products, 0.0)

    def expires(self, ttl_s: float) -> float | None:
        return None if self.finished is None else self.finished + ttl_s

    def body(self, ttl_s: float) -> dict[str, Any]:
        """What ``GET /jobs/{id}`` answers (without links: the routes add them)."""
        snap = self.snapshot()
        seconds_left = snap.seconds_left
        if self.state is JobState.SUCCEEDED:
            seconds_left = 0.0
        elif self.state.finished or self.state is JobState.QUEUED:
            seconds_left = None
        return {
            "id": self.id,
            "state": str(self.state),
            "operation": self.operation,
            "model": self.model,
            "model_version": self.model_version,
            "samples": self.samples,
            "encoding": self.encoding,
            "progress": {
                "done": snap.done,
                "total": snap.total,
                "fraction": round(snap.fraction, 6),
                "seconds_left": None if seconds_left is None else round(seconds_left, 3),
                "elapsed_s": round(snap.elapsed_s, 3),
                "unit": "products",
            },
            "created": _iso(self.created),
            "started": _iso(self.started),
            "finished": _iso(self.finished),
            "expires": _iso(self.expires(ttl_s)),
            "cancel_requested": self.cancel_requested,
            "persistent": self.persistent,
            "result_bytes": self.result_bytes,
            "problem": self.problem,
        }

    def record(self) -> dict[str, Any]:
        """What the job folder keeps of it (everything but the result and the input)."""
        snap = self.snapshot()
        return {
            "id": self.id,
            "operation": self.operation,
            "model": self.model,
            "model_version": self.model_version,
            "samples": self.samples,
            "encoding": self.encoding,
            "created": self.created,
            "planned_products": self.planned_products,
            "state": str(self.state),
            "started": self.started,
            "finished": self.finished,
            "progress": [snap.done, snap.total, snap.elapsed_s],
            "problem": self.problem,
            "result_bytes": self.result_bytes,
            "header_length": self.header_length,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Job:
        done, total, elapsed = record["progress"]
        return cls(
            id=record["id"],
            operation=record["operation"],
            model=record["model"],
            model_version=record["model_version"],
            samples=record["samples"],
            encoding=record["encoding"],
            created=record["created"],
            planned_products=record["planned_products"],
            persistent=True,
            state=JobState(record["state"]),
            started=record["started"],
            finished=record["finished"],
            final=ProgressSnapshot(int(done), int(total), float(elapsed)),
            problem=record["problem"],
            result_bytes=record["result_bytes"],
            header_length=record["header_length"],
        )


def products_per_sample(prepared: PreparedRequest) -> int:
    """Products (matrix rows) of one sample of a dense request: its selected scalars
    times ``n`` for a Hessian (one Hessian-vector product a row; the rows asked for, of a
    block), times 1 for a Jacobian."""
    manifest = prepared.model.manifest
    n = math.prod(manifest.input_shape)
    index = prepared.output_index
    if prepared.all_outputs:
        scalars = math.prod(manifest.output_shape)
    else:
        scalars = len(index) if isinstance(index, list) else 1
    rows = prepared.rows  # a block of a Hessian's rows: (start, stop), or None
    per_scalar = n ** (prepared.operation.axes_per_scalar - 1)
    if rows is not None and prepared.operation.axes_per_scalar == 2:
        per_scalar = int(rows[1]) - int(rows[0])
    return max(1, int(scalars * per_scalar))


def sample_slice(prepared: PreparedRequest, start: int, stop: int) -> PreparedRequest:
    """``prepared`` with samples ``start:stop`` only (per-sample objective targets too)."""
    objective = prepared.objective
    if objective is not None and objective.target is not None:
        batch = int(prepared.x.shape[0])
        outputs = math.prod(prepared.model.manifest.output_shape)
        targets = objective.per_sample_targets(batch, outputs)[start:stop]
        objective = Objective(objective.kind, index=objective.index, target=targets)
    return replace(prepared, x=prepared.x[start:stop], objective=objective, batched=True)


def join(parts: list[DerivativeResult]) -> DerivativeResult:
    """The chunks' results as the one result of all their samples, in order."""
    if len(parts) == 1:
        return parts[0]
    matrix = torch.cat([part.matrix for part in parts])
    return replace(parts[0], matrix=matrix, output=torch.cat([part.output for part in parts]))


class JobStore:
    """The jobs of one service: submit, poll, fetch, cancel; run on ``workers`` threads."""

    def __init__(
        self,
        service: DerivativeService,
        limits: JobLimits,
        *,
        folder: Path | None = None,
        on_finish: Callable[[Job], None] | None = None,
        busy: Callable[[], bool] | None = None,
    ) -> None:
        self.service = service
        self.limits = limits
        self.folder = JobFolder(folder) if folder is not None else None
        self._on_finish = on_finish
        # Whether ordinary requests wait or compute: a job lets them go first.
        self._busy = busy or (lambda: service.batcher.depth > 0 or service.batcher.running > 0)
        self._jobs: dict[str, Job] = {}
        self._queue: deque[Job] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._writing = threading.Lock()  # one job-folder writer at a time
        self._threads: list[threading.Thread] = []
        self._closing = False

    @property
    def persistent(self) -> bool:
        return self.folder is not None

    # -- life ---------------------------------------------------------------------------

    def start(self) -> None:
        """Reload the job folder (if any), then start the job threads."""
        if self.folder is not None:
            self._reload(self.folder)
        for number in range(self.limits.workers):
            thread = threading.Thread(target=self._work, name=f"job-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop: queued jobs and running ones (at their next chunk) end ``failed``."""
        with self._wake:
            self._closing = True
            running = [job for job in self._jobs.values() if job.state is JobState.RUNNING]
            self._wake.notify_all()
        for job in running:
            if job.progress is not None:
                job.progress.cancel()
        for thread in self._threads:
            thread.join(timeout_s)
        with self._lock:
            queued = list(self._queue)
            self._queue.clear()
        for job in queued:
            self._finish(job, JobState.FAILED, problem=self._stopped_problem(job))

    # -- the API ------------------------------------------------------------------------

    def submit(self, operation: Operation, request: BaseModel) -> Job:
        """Check ``request`` as its endpoint would (raises its ``ServiceError``), then
        queue it; 503 when the queue or the store is full."""
        encoding = str(getattr(request, "encoding", "json"))
        if encoding not in ENCODINGS:
            raise InvalidInput(
                f"request.encoding: a job's result is fetched as json, base64 or binary, "
                f"not {encoding!r} (ask the endpoint itself for a png picture)",
                field="request.encoding",
            )
        prepared: Any  # a PreparedRequest, or an operator's prepared request
        try:
            prepared = self.service.prepare(operation.kind, request)  # type: ignore[arg-type]
        except ServiceError as exc:
            raise within_request(exc) from None
        planned = 0
        if operation.chunks_by_sample:
            planned = int(prepared.x.shape[0]) * products_per_sample(prepared)
        manifest = prepared.model.manifest
        job = Job(
            id=uuid.uuid4().hex,
            operation=str(operation.kind),
            model=manifest.name,
            model_version=manifest.version,
            samples=int(prepared.x.shape[0]),
            encoding=encoding,
            created=time.time(),
            planned_products=planned,
            persistent=self.persistent,
            prepared=prepared,
        )
        with self._wake:
            if self._closing:
                raise Overloaded("the server is stopping; submit the job again", retry_after_s=5)
            self._purge_expired()
            if len(self._queue) >= self.limits.max_queued:
                raise Overloaded(
                    f"the job queue is full ({self.limits.max_queued} jobs waiting, "
                    "HESSIAN_MAX_QUEUED_JOBS); retry after the time in Retry-After",
                    retry_after_s=5,
                )
            if len(self._jobs) >= self.limits.max_jobs and not self._evict_oldest_finished():
                raise Overloaded(
                    f"this server keeps at most {self.limits.max_jobs} jobs (HESSIAN_MAX_JOBS) "
                    "and all of them are queued or running; retry later, or cancel one",
                    retry_after_s=5,
                )
            self._jobs[job.id] = job
            self._queue.append(job)
            self._wake.notify()
        self._save(job)
        return job

    def get(self, job_id: str) -> Job:
        """The job, or 404 (unknown, deleted, or expired)."""
        with self._lock:
            self._purge_expired()
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(
                f"path: no job {job_id!r} on this server (never submitted, deleted, or "
                f"expired {self.limits.ttl_s:g} s after it finished"
                + ("" if self.persistent else "; jobs do not survive a restart")
                + ")",
                field="path",
            )
        return job

    def jobs(self) -> list[Job]:
        """Every kept job, oldest first."""
        with self._lock:
            self._purge_expired()
            return sorted(self._jobs.values(), key=lambda job: job.created)

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a live job (a queued one at once, a running one at its next chunk) and
        return it; delete a finished one (its result too) and return None."""
        job = self.get(job_id)
        with self._lock:
            state = job.state
            if state is JobState.QUEUED:
                self._queue.remove(job)
            elif state.finished:
                self._jobs.pop(job.id, None)
            job.cancel_requested = not state.finished
        if state is JobState.QUEUED:
            self._finish(job, JobState.CANCELLED)
        elif state is JobState.RUNNING and job.progress is not None:
            job.progress.cancel()
        elif state.finished:
            if self.folder is not None:
                self.folder.remove(job.id)
            return None
        return job

    def result(self, job_id: str, encoding: str | None = None) -> Encoded:
        """The result as the endpoint would have answered it (in the request's encoding
        unless ``encoding`` is given); a failed job's problem as its ``ServiceError``;
        409 naming the state while it is not finished, or when it was cancelled."""
        job = self.get(job_id)
        chosen = encoding or job.encoding
        if chosen not in ENCODINGS:
            raise InvalidInput(
                f"encoding: expected one of {', '.join(ENCODINGS)}, got {chosen!r}",
                field="encoding",
            )
        if job.state is JobState.FAILED and job.problem is not None:
            raise StoredProblem(job.problem)
        if job.state is not JobState.SUCCEEDED:
            done = job.snapshot()
            raise Conflict(
                f"path: job {job.id} is {job.state}"
                + (
                    f" ({done.done} of {done.total} products done); poll GET /jobs/{job.id} "
                    "until its state is succeeded"
                    if not job.state.finished
                    else "; it has no result"
                ),
                field="path",
                state=str(job.state),
            )
        stored = job.result
        if stored is None:
            assert self.folder is not None and job.header_length is not None
            stored = self.folder.read_result(job.id, job.header_length)
        return stored.encoded(chosen)

    def counts(self) -> dict[str, int]:
        """Kept jobs by state (for metrics)."""
        with self._lock:
            counts = {str(state): 0 for state in JobState}
            for job in self._jobs.values():
                counts[str(job.state)] += 1
            return counts

    # -- the job threads ----------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return
                job = self._queue.popleft()
                job.state = JobState.RUNNING
                job.started = time.time()
                job.progress = JobProgress(
                    job.planned_products,
                    deadline=time.monotonic() + self.limits.timeout_s,
                    between_chunks=self._yield_to_requests,
                )
            self._save(job)
            self._run(job)

    def _run(self, job: Job) -> None:
        prepared, progress = job.prepared, job.progress
        assert prepared is not None and progress is not None
        result: Any  # a DerivativeResult, or an operator's outcome
        try:
            if prepared.operation.chunks_by_sample:
                result, compute_ms = self._compute_by_samples(prepared, progress)
            else:
                result, compute_ms = self.service.compute(prepared, progress)
            as_binary = prepared.request.model_copy(update={"encoding": "binary"})
            body = self.service.describe(replace(prepared, request=as_binary), result, compute_ms)
            stored = StoredResult.of(body)
            del result, body
            self._keep(job, stored)
        except Cancelled:
            if self._closing:
                self._finish(job, JobState.FAILED, problem=self._stopped_problem(job))
            elif progress.timed_out:
                detail = (
                    f"the job ran longer than this server's job limit of "
                    f"{self.limits.timeout_s:g} s (HESSIAN_JOB_TIMEOUT_S) and was stopped"
                )
                self._finish(job, JobState.FAILED, problem=problem(504, "Timeout", detail))
            else:
                self._finish(job, JobState.CANCELLED)
        except ServiceError as exc:
            self._finish(job, JobState.FAILED, problem=problem_of(exc))
        except torch.OutOfMemoryError:
            detail = "the device ran out of memory; retry with a smaller batch"
            self._finish(job, JobState.FAILED, problem=problem(503, "Overloaded", detail))
        except Exception as exc:  # a fault, not the caller's: reported, the thread lives on
            logger.exception("job %s (%s) failed", job.id, job.operation)
            detail = f"the {job.operation} failed on the server ({type(exc).__name__})"
            self._finish(job, JobState.FAILED, problem=problem(500, "Service error", detail))

    def _compute_by_samples(
        self, prepared: PreparedRequest, progress: JobProgress
    ) -> tuple[DerivativeResult, float]:
        """A dense request a few samples at a time: ``chunk_products`` products a chunk."""
        batch = int(prepared.x.shape[0])
        per_sample = products_per_sample(prepared)
        step = max(1, self.limits.chunk_products // per_sample)
        progress.plan(batch * per_sample)
        parts: list[DerivativeResult] = []
        compute_ms = 0.0
        for start in range(0, batch, step):
            progress.check()
            stop = min(batch, start + step)
            part, chunk_ms = self.service.compute(sample_slice(prepared, start, stop))
            assert isinstance(part, DerivativeResult)  # a dense kind's
            parts.append(part)
            compute_ms += chunk_ms
            progress.advance((stop - start) * per_sample)
        return join(parts), compute_ms

    def _yield_to_requests(self, progress: JobProgress) -> None:
        """Between chunks: wait while ordinary requests are queued or computing (up to
        ``YIELD_MAX_S``), unless this thread holds the engine's lock (then they wait
        for it anyway)."""
        if _holds_autodiff_lock():
            return
        deadline = time.monotonic() + YIELD_MAX_S
        while self._busy() and not progress.cancelled and time.monotonic() < deadline:
            time.sleep(_YIELD_POLL_S)

    # -- ends, bounds and the folder ----------------------------------------------------

    def _keep(self, job: Job, stored: StoredResult) -> None:
        """Keep a succeeded job's result, evicting the oldest finished jobs to fit."""
        with self._lock:
            fits = self._make_room(stored.nbytes)
        if not fits:
            error = TooLarge(
                f"the {job.operation} result is {format_bytes(stored.nbytes)}, over the "
                f"{format_bytes(self.limits.max_result_bytes)} this server keeps for all jobs "
                "(HESSIAN_MAX_JOB_RESULT_BYTES); send fewer samples per job",
                field=None,
                estimated_bytes=stored.nbytes,
                limit_bytes=self.limits.max_result_bytes,
                setting="HESSIAN_MAX_JOB_RESULT_BYTES",
            )
            self._finish(job, JobState.FAILED, problem=problem_of(error))
            return
        job.result_bytes, job.header_length = stored.nbytes, stored.header_length
        if self.folder is not None:
            self.folder.write_result(job.id, stored)  # the folder holds it, not memory
        else:
            job.result = stored
        self._finish(job, JobState.SUCCEEDED)

    def _make_room(self, nbytes: int) -> bool:
        """Evict finished jobs, oldest first, until ``nbytes`` more fit (lock held)."""
        if nbytes > self.limits.max_result_bytes:
            return False
        held = sum(job.result_bytes or 0 for job in self._jobs.values())
        while held + nbytes > self.limits.max_result_bytes:
            evicted = self._evict_oldest_finished(with_result=True)
            if evicted is None:
                return False
            held -= evicted.result_bytes or 0
        return True

    def _evict_oldest_finished(self, *, with_result: bool = False) -> Job | None:
        """Drop the finished job that finished first (lock held); None if there is none."""
        finished = [
            job
            for job in self._jobs.values()
            if job.state.finished and (job.result_bytes or not with_result)
        ]
        if not finished:
            return None
        oldest = min(finished, key=lambda job: job.finished or 0.0)
        self._forget(oldest)
        return oldest

    def _forget(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        if self.folder is not None:
            self.folder.remove(job.id)

    def _purge_expired(self) -> None:
        """Drop every job that finished more than ``ttl_s`` ago (lock held)."""
        now = time.time()
        for job in [job for job in self._jobs.values() if job.finished is not None]:
            if job.finished is not None and now > job.finished + self.limits.ttl_s:
                self._forget(job)

    def _finish(self, job: Job, state: JobState, *, problem: dict[str, Any] | None = None) -> None:
        with self._lock:
            job.final = job.snapshot()
            job.state, job.problem, job.finished = state, problem, time.time()
            job.prepared = None  # the input and its tensors are no longer needed
            job.progress = None
        self._save(job)
        if self._on_finish is not None:
            self._on_finish(job)

    def _stopped_problem(self, job: Job) -> dict[str, Any]:
        detail = f"the server stopped before job {job.id} finished; submit it again" + (
            ""
            if self.persistent
            else " (this server keeps jobs in memory only: none survives a restart)"
        )
        return problem(503, "Not ready", detail)

    def _save(self, job: Job) -> None:
        """Write the job's record as it is now. One writer at a time, each writing the
        state of its moment: the last write is of the latest state. A folder that fails
        (full, gone) is logged; the job goes on in memory."""
        if self.folder is None:
            return
        with self._writing:
            with self._lock:
                if job.id not in self._jobs:
                    return  # deleted or evicted meanwhile: its files are gone, and stay so
                record = job.record()
            try:
                self.folder.write_record(job.id, record)
            except OSError:
                logger.exception("job %s: its record could not be written", job.id)

    def _reload(self, folder: JobFolder) -> None:
        """Every job of an earlier run: finished ones as they were (unless expired), the
        ones it left queued or running as failed; at most ``max_jobs``, newest kept."""
        jobs = []
        for record in folder.records():
            try:
                job = Job.from_record(record)
            except (KeyError, TypeError, ValueError):
                folder.remove(str(record.get("id")))
                continue
            if not job.state.finished:
                job.final = ProgressSnapshot(0, job.planned_products, 0.0)
                job.state, job.finished = JobState.FAILED, time.time()
                job.problem = self._stopped_problem(job)
                folder.write_record(job.id, job.record())
            elif job.state is JobState.SUCCEEDED and not folder.result_path(job.id).exists():
                folder.remove(job.id)
                continue
            jobs.append(job)
        jobs.sort(key=lambda job: job.created)
        with self._lock:
            for job in jobs:
                self._jobs[job.id] = job
            self._purge_expired()
            while len(self._jobs) > self.limits.max_jobs:
                self._evict_oldest_finished()
            self._make_room(0)  # a smaller HESSIAN_MAX_JOB_RESULT_BYTES than before


class StoredProblem(ServiceError):
    """A failed job's problem body, answered again by ``GET /jobs/{id}/result``."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(str(body.get("detail", "")), field=body.get("field"))
        self.body = body
        self.status = int(body.get("status", 500))
