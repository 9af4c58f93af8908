"""Orchestration between HTTP and the engine: look up, check limits, plan, run, describe.

Everything a request can get wrong is checked here before any derivative is computed,
including the size of the result (413 with the estimate). Computation goes through the
dynamic batcher (``serving.batching``): concurrent requests that can share a computation
(``serving.merging``) are merged, and everything runs on the batcher's one worker thread so
that the event loop -- health checks, validation errors -- stays responsive while a
large Hessian is computed. The batcher also bounds the queue (503) and the wait (504).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import numpy as np
import torch

from hessian_service.config import Settings
from hessian_service.engine import (
    Curvature,
    DerivativeResult,
    Objective,
    compute_hessian,
    compute_jacobian,
)
from hessian_service.errors import ClientClosedRequest, InvalidInput, Overloaded, Timeout, TooLarge
from hessian_service.metrics import Metrics, current_timing
from hessian_service.repository.registry import LoadedModel, Registry
from hessian_service.serving import merging
from hessian_service.serving.batching import (
    Abandoned,
    Batcher,
    BatchStats,
    DeadlineExceeded,
    QueueFull,
)
from hessian_service.wire import codec
from hessian_service.wire.binary import Encoded
from hessian_service.wire.json_body import INLINE_BODY_BYTES
from hessian_service.wire.schemas import (
    CrossEntropyObjective,
    DerivativeRequest,
    LogSoftmaxObjective,
    MseObjective,
    SumObjective,
    TensorObject,
)

Kind = Literal["jacobian", "hessian"]
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}
# Requests whose input and result have at most this many elements are decoded and encoded
# on the event loop: for them a hop to a worker thread costs more than the work (about
# 0.1-0.3 ms here), and under load the hops were most of a small request's time. Larger
# ones go to worker threads so that the event loop stays responsive.
INLINE_ELEMENTS = 1 << 14
# ... and only when their body was parsed inline too (INLINE_BODY_BYTES): the declared
# shape alone says nothing of the data sent (a 784-element shape with 94,080 JSON
# numbers took 10 ms to decode and be refused, on the loop, four at a time).


@dataclass(frozen=True)
class PreparedRequest:
    """A request decoded and checked against its model: ready to compute."""

    kind: Kind
    request: DerivativeRequest
    model: LoadedModel
    x: torch.Tensor  # [B, *sample_shape] in the compute dtype, on the model's device
    batched: bool
    objective: Objective | None
    output_index: int | list[int] | None


def _format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    raise AssertionError("unreachable")


def _decode_input(
    tensor: TensorObject, sample_shape: list[int], limit: int
) -> tuple[torch.Tensor, bool]:
    shape = list(tensor.shape)
    if shape == sample_shape:
        batched = False
    elif len(shape) == len(sample_shape) + 1 and shape[1:] == sample_shape:
        batched = True
    else:
        raise InvalidInput(
            f"inputs[0].shape: expected {sample_shape} (one sample) or "
            f"[B, {', '.join(map(str, sample_shape))}] (a batch), got {shape}",
            field="inputs[0].shape",
        )
    if batched and not 1 <= shape[0] <= limit:
        raise InvalidInput(
            f"inputs[0].shape: batch size must be between 1 and {limit}, got {shape[0]}",
            field="inputs[0].shape",
        )
    x = codec.decode_tensor(tensor, "inputs[0]")
    return (x if batched else x.unsqueeze(0)), batched


def _check_output_index(
    output_index: int | list[int] | None, outputs: int, max_indices: int
) -> None:
    indices = [output_index] if isinstance(output_index, int) else output_index or []
    if isinstance(output_index, list) and not 1 <= len(output_index) <= max_indices:
        raise InvalidInput(
            f"output_index: a list must hold 1 to {max_indices} indices, got {len(output_index)}",
            field="output_index",
        )
    for index in indices:
        if not 0 <= index < outputs:
            raise InvalidInput(
                f"output_index: {index} is out of range; the model has {outputs} outputs "
                f"(valid: 0 to {outputs - 1})",
                field="output_index",
            )


def _mse_target(target: float | list[Any] | TensorObject, outputs: int, batch: int) -> torch.Tensor:
    field = "objective.target"
    if isinstance(target, TensorObject):
        tensor = codec.decode_tensor(target, field)
    else:
        codec.check_numbers(target if isinstance(target, list) else [target], field)
        try:
            array = np.asarray(target, dtype=np.float64)
        except (ValueError, TypeError):
            raise InvalidInput(
                f"{field}: expected a number or a list of numbers", field=field
            ) from None
        tensor = torch.from_numpy(array)
        if not bool(torch.isfinite(tensor).all()):
            raise InvalidInput(f"{field}: contains NaN or Inf", field=field)
    if tensor.numel() not in (1, outputs, batch * outputs):
        raise InvalidInput(
            f"{field}: expected 1 number, {outputs} (one per output) or {batch} x {outputs} "
            f"(per sample) numbers, got {tensor.numel()}",
            field=field,
        )
    return tensor.to(torch.float64)


def _objective(request: DerivativeRequest, outputs: int, batch: int) -> Objective | None:
    spec = request.objective
    if spec is None:
        return None
    if request.output_index is not None:
        raise InvalidInput(
            "output_index: give output_index or objective, not both", field="output_index"
        )
    if isinstance(spec, SumObjective):
        return Objective("sum")
    if isinstance(spec, LogSoftmaxObjective):
        if spec.index >= outputs:
            raise InvalidInput(
                f"objective.index: {spec.index} is out of range for {outputs} outputs",
                field="objective.index",
            )
        return Objective("log_softmax", index=spec.index)
    if isinstance(spec, MseObjective):
        return Objective("mse", target=_mse_target(spec.target, outputs, batch))
    assert isinstance(spec, CrossEntropyObjective)
    classes = [spec.target] if isinstance(spec.target, int) else spec.target
    if len(classes) not in (1, batch):
        raise InvalidInput(
            f"objective.target: expected one class or one per sample ({batch}), got {len(classes)}",
            field="objective.target",
        )
    if any(c >= outputs for c in classes):
        raise InvalidInput(
            f"objective.target: class indices must be below {outputs}", field="objective.target"
        )
    return Objective("cross_entropy", target=torch.tensor(classes, dtype=torch.long))


class DerivativeService:
    """Turns validated requests into derivative responses for the registry's models."""

    def __init__(
        self, registry: Registry, settings: Settings, *, metrics: Metrics | None = None
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.batcher: Batcher[PreparedRequest, tuple[DerivativeResult, float]] = Batcher(
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

    def prepare(self, kind: Kind, request: DerivativeRequest) -> PreparedRequest:
        """Decode and check a request; raise a ``ServiceError`` before any work."""
        model = self.registry.get(request.model)
        manifest = model.manifest
        outputs = math.prod(manifest.output_shape)
        _check_output_index(request.output_index, outputs, self.settings.max_output_indices)
        unselected = request.output_index is None and request.objective is None
        if kind == "hessian" and unselected and outputs != 1:
            raise InvalidInput(
                f"output_index: required for /hessian on {manifest.name!r}, which has "
                f"{outputs} outputs (or give an objective)",
                field="output_index",
            )
        x, batched = _decode_input(
            request.inputs[0], manifest.input_shape, self.settings.max_samples_per_request
        )
        objective = _objective(request, outputs, x.shape[0])
        self._check_result_size(kind, request, x.shape[0], math.prod(manifest.input_shape), outputs)
        dtype = PRECISIONS[request.precision]
        return PreparedRequest(
            kind=kind,
            request=request,
            model=model,
            x=x.to(device=model.device, dtype=dtype),
            batched=batched,
            objective=objective,
            output_index=request.output_index,
        )

    def _check_result_size(
        self, kind: Kind, request: DerivativeRequest, batch: int, n: int, outputs: int
    ) -> None:
        index = request.output_index
        k = len(index) if isinstance(index, list) else 1
        if kind == "jacobian" and index is None and request.objective is None:
            k = outputs
        itemsize = 8 if request.precision == "float64" else 4
        per_scalar = n * n if kind == "hessian" else n
        size = batch * k * per_scalar * itemsize
        if size <= self.settings.max_result_bytes:
            return
        cheaper = (
            f"/jacobian would return {_format_bytes(batch * k * n * itemsize)}"
            if kind == "hessian"
            else "ask for fewer output indices"
        )
        raise TooLarge(
            f"the {kind} would be {_format_bytes(size)} ({batch} samples x {k} scalars x "
            f"{per_scalar} entries x {itemsize} bytes), over this server's limit of "
            f"{_format_bytes(self.settings.max_result_bytes)}; send fewer samples or output "
            f"indices per request, or use float32; {cheaper}",
            estimated_bytes=size,
            limit_bytes=self.settings.max_result_bytes,
        )

    def compute(self, prepared: PreparedRequest) -> tuple[DerivativeResult, float]:
        """Run the engine; returns the result and the compute time in milliseconds."""
        module = prepared.model.for_dtype(prepared.x.dtype)
        function = compute_hessian if prepared.kind == "hessian" else compute_jacobian
        start = time.perf_counter()
        result = function(
            module,
            prepared.x,
            output_index=prepared.output_index,
            objective=prepared.objective,
            method=prepared.model.method(prepared.kind),  # chosen by the load-time probe
            memory_budget_bytes=self.settings.memory_budget_bytes,
        )
        if prepared.x.device.type == "cuda":
            torch.cuda.synchronize(prepared.x.device)
        return result, (time.perf_counter() - start) * 1000.0

    def compute_batch(
        self, _key: Hashable, batch: list[PreparedRequest]
    ) -> Sequence[tuple[DerivativeResult, float]]:
        """Compute requests that share a batch key as one, and give each its own slice."""
        result, compute_ms = self.compute(merging.merge(batch))
        if len(batch) == 1:
            return [(result, compute_ms)]
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
        prepared: PreparedRequest,
        timeout_s: float,
        disconnected: Callable[[], Awaitable[bool]] | None,
    ) -> tuple[DerivativeResult, float, float]:
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

    def describe(
        self, prepared: PreparedRequest, result: DerivativeResult, compute_ms: float
    ) -> dict[str, Any]:
        """The response body: the matrix, the model output, and the metadata."""
        request, manifest = prepared.request, prepared.model.manifest
        sample_shape = list(manifest.input_shape)
        matrix = result.selected
        if request.layout == "tensor":
            leading = list(matrix.shape[: -2 if prepared.kind == "hessian" else -1])
            if (
                prepared.kind == "jacobian"
                and request.output_index is None
                and prepared.objective is None
            ):
                leading = [leading[0], *manifest.output_shape]
            tail = sample_shape * (2 if prepared.kind == "hessian" else 1)
            matrix = matrix.reshape(*leading, *tail)
        output = result.output
        if not prepared.batched:
            matrix, output = matrix[0], output[0]
        zero = not bool(matrix.count_nonzero())
        return {
            "model": manifest.name,
            "model_version": manifest.version,
            "outputs": [
                codec.tensor_object(prepared.kind, matrix, request.encoding),
                codec.tensor_object("output", output, request.encoding),
            ],
            "metadata": {
                "output_index": request.output_index,
                "objective": prepared.objective.describe() if prepared.objective else "output",
                "sample_shape": sample_shape,
                "batch_size": int(prepared.x.shape[0]) if prepared.batched else None,
                "method": result.method,
                "device": str(prepared.x.device),
                "precision": request.precision,
                "layout": request.layout,
                "compute_ms": round(compute_ms, 3),
                "zero": zero,
                # The load-time curvature: it also reads TorchScript and export graphs.
                "notes": _notes(prepared.kind, prepared.model.curvature, prepared.objective, zero)
                + _random_notes(prepared.model),
            },
        }

    async def run(
        self,
        kind: Kind,
        request: DerivativeRequest,
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
        started = time.perf_counter()
        small = math.prod(request.inputs[0].shape) <= INLINE_ELEMENTS
        if small and body_bytes <= INLINE_BODY_BYTES:
            prepared = self.prepare(kind, request)
        else:
            prepared = await anyio.to_thread.run_sync(self.prepare, kind, request)
        timing = current_timing()
        if timing is not None:
            timing.model = prepared.model.manifest.name
        left = self.settings.request_timeout_s - (time.perf_counter() - started)
        result, queue_ms, compute_ms = await self._compute_queued(prepared, left, disconnected)
        if timing is not None:
            timing.queue_ms, timing.compute_ms = queue_ms, compute_ms
        if result.matrix.numel() + result.output.numel() <= INLINE_ELEMENTS:
            return codec.encode_body(self.describe(prepared, result, compute_ms), request.encoding)
        body = await anyio.to_thread.run_sync(self.describe, prepared, result, compute_ms)
        return await anyio.to_thread.run_sync(codec.encode_body, body, request.encoding)


def _random_notes(model: LoadedModel) -> list[str]:
    """A warning when the load-time probe found random operations in the model."""
    report = model.capabilities
    if report is None or not report.random_ops:
        return []
    evidence = "; ".join(report.random_evidence) or "its forward passes differ"
    return [
        f"The model holds random operations ({evidence}): this is the derivative of one "
        "random draw, and another request may differ."
    ]


def _notes(kind: Kind, curvature: Curvature, objective: Objective | None, zero: bool) -> list[str]:
    notes: list[str] = []
    network_curvature_free = objective is None or objective.curvature_of_objective_is_zero
    if kind == "hessian" and curvature is Curvature.AFFINE and network_curvature_free:
        notes.append(
            "The model is affine in its input (only affine layers such as Linear, Conv and "
            "average pooling), so its input Hessian is identically zero: this is the exact "
            "answer, not an error."
        )
    elif kind == "hessian" and curvature is Curvature.PIECEWISE_LINEAR:
        if network_curvature_free:
            notes.append(
                "The model's non-linearities are piecewise linear (ReLU, max-pool, ...), so its "
                "input Hessian is zero almost everywhere (it is undefined only on the kinks). "
                "For curvature, ask for an objective such as cross_entropy or log_softmax."
            )
        else:
            notes.append(
                "The model's own curvature is zero almost everywhere (piecewise-linear "
                "non-linearities), so this Hessian is the objective's curvature seen through "
                "the network: J^T H_objective J."
            )
    elif zero:
        notes.append(f"Every entry of the {kind} is exactly zero at this input.")
    return notes
