"""Orchestration between HTTP and the engine: look up, check, queue, compute, describe.

The model is looked up and everything a request can get wrong is checked before any
derivative is computed (``serving.request``, including the size of the result: 413 with
the estimate); the request's ``Operation`` (``serving.operations``) calls the engine, and
``serving.response`` builds the body (or, with the png encoding, the picture).
Computation goes through the dynamic batcher (``serving.batching``): concurrent requests
that can share a computation (``serving.merging``) are merged, and everything runs on the
batcher's one worker thread so that the event loop -- health checks, validation errors --
stays responsive while a large Hessian is computed. The batcher also bounds the queue
(503) and the wait (504).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import replace
from typing import Any

import anyio
import torch

from hessian_service.config import Settings
from hessian_service.engine import DerivativeKind, DerivativeResult
from hessian_service.engine.progress import NO_PROGRESS, Progress
from hessian_service.errors import (
    ClientClosedRequest,
    InsufficientStorage,
    Overloaded,
    Timeout,
    TooLarge,
)
from hessian_service.metrics import Metrics, current_timing
from hessian_service.repository.registry import Registry
from hessian_service.serving import memory, merging, planning, response
from hessian_service.serving.batching import (
    Abandoned,
    Batcher,
    BatchStats,
    DeadlineExceeded,
    QueueFull,
)
from hessian_service.serving.merging import Computed
from hessian_service.serving.operations import (
    OperatorOperation,
    OperatorOutcome,
    Selection,
    operation_for,
)
from hessian_service.serving.operator_request import (
    OperatorLimits,
    Prepared,
    PreparedOperator,
    prepare_operator,
)
from hessian_service.serving.operator_response import describe_operator
from hessian_service.serving.request import PreparedRequest, RequestLimits
from hessian_service.serving.request import prepare as prepare_request
from hessian_service.units import format_bytes
from hessian_service.wire import codec
from hessian_service.wire.binary import Encoded
from hessian_service.wire.json_body import INLINE_BODY_BYTES
from hessian_service.wire.operator_schemas import OperatorRequest
from hessian_service.wire.schemas import DerivativeRequest

# Requests whose input and result have at most this many elements are decoded and encoded
# on the event loop: for them a hop to a worker thread costs more than the work (about
# 0.1-0.3 ms here), and under load the hops were most of a small request's time. Larger
# ones go to worker threads so that the event loop stays responsive.
INLINE_ELEMENTS = 1 << 14
# ... and only when their body was parsed inline too (INLINE_BODY_BYTES): the declared
# shape alone says nothing of the data sent (a 784-element shape with 94,080 JSON
# numbers took 10 ms to decode and be refused, on the loop, four at a time).


def _insufficient_storage(prepared: Prepared, error: memory.OutOfMemory) -> InsufficientStorage:
    """The 507 of a request that ran out of memory at every budget tried."""
    budgets = ", ".join(format_bytes(b) for b in error.budgets)
    batch = int(prepared.x.shape[0])
    instead = "send fewer samples per request"
    if prepared.operation.symmetric_matrix:
        instead += (
            ', ask for a block of rows ("rows": {"start": a, "stop": b}) at a time, or for '
            "a matrix-free operation (/hvp, /hessian/diagonal, /hessian/trace, "
            "/hessian/eigen)"
        )
    field = "rows" if prepared.rows is not None and batch == 1 else "inputs[0].shape"
    return InsufficientStorage(
        f"{field}: the {prepared.kind} of {batch} samples ran out of memory on "
        f"{prepared.x.device} with working-memory budgets of {budgets} "
        f"(HESSIAN_MEMORY_BUDGET_BYTES, halved on each retry); its result alone is "
        f"{format_bytes(prepared.result_bytes)}; {instead}. ({error.last})",
        field=field,
        estimated_bytes=prepared.result_bytes,
        memory_budgets_tried=error.budgets,
        setting="HESSIAN_MEMORY_BUDGET_BYTES",
    )


class DerivativeService:
    """Turns validated requests into derivative responses for the registry's models."""

    def __init__(
        self, registry: Registry, settings: Settings, *, metrics: Metrics | None = None
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.limits = RequestLimits(
            max_samples=settings.max_samples_per_request,
            max_output_indices=settings.max_output_indices,
            max_result_bytes=settings.max_result_bytes,
            max_work=settings.max_work_per_request,
        )
        self.operator_limits = OperatorLimits(
            max_vectors=settings.max_operator_vectors,
            max_products=settings.max_operator_products,
            max_eigen_k=settings.max_eigen_k,
            min_eigen_tol=settings.min_eigen_tol,
            memory_budget_bytes=settings.memory_budget_bytes,
        )
        self.budget = planning.Budget(
            max_result_bytes=settings.max_result_bytes,
            max_work=settings.max_work_per_request,
            max_products=settings.max_operator_products,
            memory_budget_bytes=settings.memory_budget_bytes,
        )
        self.metrics = metrics
        # Dense requests and operators share one queue and one worker (the 503 and 504
        # limits hold for both); products merge as dense requests do, estimates and
        # eigen-solves are always a batch of their own.
        self.batcher: Batcher[Prepared, tuple[Computed, float]] = Batcher(
            self.compute_batch,
            max_batch_size=settings.max_batch_size,
            max_delay_s=settings.max_batch_delay_ms / 1000.0,
            max_queue=settings.max_queue,
            on_batch=self._observe_batch,
        )
        if metrics is not None:
            metrics.bind_queue_depth(lambda: self.batcher.depth)

    def close(self) -> None:
        self.batcher.close()

    def prepare(
        self, kind: DerivativeKind | str, request: DerivativeRequest | OperatorRequest
    ) -> Prepared:
        """Look the model up, then decode and check the request against it
        (``serving.request``, ``serving.operator_request``); raise a ``ServiceError``
        before any work."""
        operation = operation_for(kind)
        model = self.registry.get(request.model)
        if isinstance(operation, OperatorOperation):
            if not isinstance(request, OperatorRequest):
                raise TypeError(f"/{kind} takes an OperatorRequest")
            return prepare_operator(operation, request, model, self.limits, self.operator_limits)
        if not isinstance(request, DerivativeRequest):
            raise TypeError(f"/{kind} takes a DerivativeRequest")
        try:
            return prepare_request(operation, request, model, self.limits)
        except TooLarge as error:
            if operation.axes_per_scalar != 2:
                raise
            # A Hessian too large to send: name the operations that would fit instead.
            raise planning.advise(error, request, model, self.budget) from None

    def selection(self, prepared: Prepared, progress: Progress = NO_PROGRESS) -> Selection:
        """What the engine is asked for ``prepared``; ``progress`` counts its products and
        carries a job's cancel flag (``serving.jobs``), nothing for a plain request."""
        return Selection(
            output_index=prepared.output_index,
            objective=prepared.objective,
            # chosen by the load-time probe
            method=prepared.model.method(prepared.operation.probed_kind),
            memory_budget_bytes=self.settings.memory_budget_bytes,
            progress=progress,
            rows=prepared.rows,
            operands=prepared.operands if isinstance(prepared, PreparedOperator) else None,
            compile_after=self.settings.compile_after,
        )

    def compute(
        self, prepared: Prepared, progress: Progress = NO_PROGRESS
    ) -> tuple[Computed, float]:
        """Run the engine; returns the result and the compute time in milliseconds.

        An out-of-memory is retried with half the working-memory budget, a few times
        (``serving.memory``), and then answered 507 (``InsufficientStorage``) naming the
        result's size and what to ask for instead; the worker survives it."""
        module = prepared.model.for_dtype(prepared.x.dtype)
        start = time.perf_counter()
        selection = self.selection(prepared, progress)
        device = prepared.x.device

        def attempt(budget: int) -> Computed:
            result = prepared.operation.compute(
                module, prepared.x, replace(selection, memory_budget_bytes=budget)
            )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return result

        try:
            result = memory.retrying(
                attempt,
                selection.memory_budget_bytes,
                device,
                on_retry=lambda _budget: self._oom_retry(prepared),
            )
        except memory.OutOfMemory as exc:
            raise _insufficient_storage(prepared, exc) from None
        return result, (time.perf_counter() - start) * 1000.0

    def _oom_retry(self, prepared: Prepared) -> None:
        if self.metrics is not None:
            self.metrics.oom_retries.labels(prepared.kind).inc()

    def compute_batch(
        self, _key: Hashable, batch: list[Prepared]
    ) -> Sequence[tuple[Computed, float]]:
        """Compute requests that share a batch key as one, and give each its own slice."""
        if len(batch) == 1:
            return [self.compute(batch[0])]
        # Dense requests and products share keys (an estimate's is its own).
        result, compute_ms = self.compute(merging.merge(batch))
        sizes = [int(prepared.x.shape[0]) for prepared in batch]
        return [(part, compute_ms) for part in merging.split(result, sizes)]

    def _observe_batch(self, stats: BatchStats) -> None:
        if self.metrics is None:
            return
        kind = stats.key.kind if isinstance(stats.key, merging.BatchKey) else ""
        self.metrics.batch_samples.labels(kind).observe(stats.samples)
        self.metrics.batch_requests.labels(kind).observe(stats.jobs)
        self.metrics.compute_time.labels(kind).observe(stats.compute_s)

    def _rejected(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected.labels(reason).inc()

    async def _compute_queued(
        self,
        prepared: Prepared,
        timeout_s: float,
        disconnected: Callable[[], Awaitable[bool]] | None,
    ) -> tuple[Computed, float, float]:
        """Through the batcher: (result, queue ms, compute ms), or 503 / 504 / 499."""
        try:
            outcome = await self.batcher.submit(
                merging.batch_key(prepared),
                prepared,
                int(prepared.x.shape[0]),
                timeout_s=timeout_s,
                disconnected=disconnected,
            )
        except QueueFull as exc:
            self._rejected("queue_full")
            raise Overloaded(
                f"the server is busy: {exc}; retry after the time in Retry-After",
                retry_after_s=1,
            ) from None
        except DeadlineExceeded:
            self._rejected("deadline")
            raise Timeout(
                f"the {prepared.kind} was not computed within this server's per-request "
                f"deadline of {self.settings.request_timeout_s:g} s; send fewer samples, "
                "or retry when the server is less busy",
                timeout_s=self.settings.request_timeout_s,
            ) from None
        except Abandoned:
            self._rejected("disconnected")
            raise ClientClosedRequest("the client disconnected before its work ran") from None
        if self.metrics is not None:
            self.metrics.queue_time.labels(prepared.kind).observe(outcome.queue_s)
        result, compute_ms = outcome.result
        return result, outcome.queue_s * 1000.0, compute_ms

    def describe(self, prepared: Prepared, result: Computed, compute_ms: float) -> dict[str, Any]:
        """The response body: the matrix (or an operator's values), the model output, and
        the metadata."""
        if isinstance(prepared, PreparedOperator):
            assert isinstance(result, OperatorOutcome)
            return describe_operator(prepared, result, compute_ms)
        assert isinstance(result, DerivativeResult)
        return response.describe(prepared, result, compute_ms)

    async def run(
        self,
        kind: DerivativeKind | str,
        request: DerivativeRequest | OperatorRequest,
        *,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
        body_bytes: int = 0,
    ) -> Encoded:
        """Prepare (worker pool), compute (batcher), encode (worker pool).

        ``disconnected`` (e.g. starlette's ``Request.is_disconnected``) is polled while
        the request waits, so that a client that went away has its queued work dropped.
        ``body_bytes``, the size of the body the request came in, bounds the decoding
        work that may run on the event loop.
        """
        prepared, result, compute_ms = await self.computed(
            kind, request, disconnected=disconnected, body_bytes=body_bytes
        )
        if isinstance(result, OperatorOutcome):
            if result.elements <= INLINE_ELEMENTS:
                return codec.encode_body(
                    self.describe(prepared, result, compute_ms), request.encoding
                )
            body = await anyio.to_thread.run_sync(self.describe, prepared, result, compute_ms)
            return await anyio.to_thread.run_sync(codec.encode_body, body, request.encoding)
        assert isinstance(prepared, PreparedRequest)
        if request.encoding == "png":  # a picture, not a body; drawn off the loop when large
            if result.matrix.numel() <= INLINE_ELEMENTS:
                return response.picture(prepared, result)
            return await anyio.to_thread.run_sync(response.picture, prepared, result)
        if result.matrix.numel() + result.output.numel() <= INLINE_ELEMENTS:
            return codec.encode_body(self.describe(prepared, result, compute_ms), request.encoding)
        body = await anyio.to_thread.run_sync(self.describe, prepared, result, compute_ms)
        return await anyio.to_thread.run_sync(codec.encode_body, body, request.encoding)

    async def computed(
        self,
        kind: DerivativeKind | str,
        request: DerivativeRequest | OperatorRequest,
        *,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
        body_bytes: int = 0,
    ) -> tuple[Prepared, Computed, float]:
        """Prepare and compute, through the same checks, queue and limits as ``run``,
        without encoding: (the prepared request, its result, compute ms). The protocol
        adapters (``serving.umbridge``, ``serving.inference``) write the result in their
        own protocol's shape."""
        started = time.perf_counter()
        small = math.prod(request.inputs[0].shape) <= INLINE_ELEMENTS
        if small and body_bytes <= INLINE_BODY_BYTES:
            prepared = self.prepare(kind, request)
        else:
            prepared = await anyio.to_thread.run_sync(self.prepare, kind, request)
        result, compute_ms = await self.computed_prepared(
            prepared, started=started, disconnected=disconnected
        )
        return prepared, result, compute_ms

    async def computed_prepared(
        self,
        prepared: Prepared,
        *,
        started: float | None = None,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> tuple[Computed, float]:
        """A request already prepared (``prepare``), through the queue: (its result,
        compute ms). The deadline counts from ``started`` (``time.perf_counter()``; now
        when None), so that a caller that prepared several requests first -- ``/v2``
        infer checks every derivative output before computing any -- spends one deadline."""
        timing = current_timing()
        if timing is not None:
            timing.model = prepared.model.manifest.name
        began = time.perf_counter() if started is None else started
        left = self.settings.request_timeout_s - (time.perf_counter() - began)
        result, queue_ms, compute_ms = await self._compute_queued(prepared, left, disconnected)
        if timing is not None:
            timing.queue_ms, timing.compute_ms = queue_ms, compute_ms
        return result, compute_ms
