"""Orchestration between HTTP and the engine: look up, check limits, plan, run, describe.

Everything a request can get wrong is checked here before any derivative is computed,
including the size of the result (413 with the estimate). Computation runs on one worker
thread per service so that the event loop -- health checks, validation errors -- stays
responsive while a large Hessian is computed.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import numpy as np
import torch

from app import codec
from app.binary import Encoded
from app.config import Settings
from app.engine import Curvature, DerivativeResult, Objective, compute_hessian, compute_jacobian
from app.errors import InvalidInput, TooLarge
from app.registry import LoadedModel, Registry
from app.schemas import (
    CrossEntropyObjective,
    DerivativeRequest,
    LogSoftmaxObjective,
    MseObjective,
    SumObjective,
    TensorObject,
)

Kind = Literal["jacobian", "hessian"]
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


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

    def __init__(self, registry: Registry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

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

    def describe(
        self, prepared: PreparedRequest, result: DerivativeResult, compute_ms: float
    ) -> dict[str, Any]:
        """The response body: the matrix, the model output, and the metadata."""
        request, manifest = prepared.request, prepared.model.manifest
        sample_shape = list(manifest.input_shape)
        matrix = result.matrix[:, 0] if result.squeeze_scalars else result.matrix
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
                "notes": _notes(prepared.kind, prepared.model.curvature, prepared.objective, zero),
            },
        }

    async def run(self, kind: Kind, request: DerivativeRequest) -> Encoded:
        """Prepare (worker pool), compute (the compute thread), encode (worker pool)."""
        prepared = await anyio.to_thread.run_sync(self.prepare, kind, request)
        loop = asyncio.get_running_loop()
        result, compute_ms = await loop.run_in_executor(self._executor, self.compute, prepared)
        body = await anyio.to_thread.run_sync(self.describe, prepared, result, compute_ms)
        return await anyio.to_thread.run_sync(codec.encode_body, body, request.encoding)


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
