"""Every check a derivative request gets before any work: the request, against its model.

``prepare`` turns a validated body (``wire.schemas.DerivativeRequest``) and the model it
names into a ``PreparedRequest``, or raises a ``ServiceError`` naming the field at fault:
the input's shape against the model's (one sample or a batch within the limit), the
output selection against the model's outputs, the objective's parameters, what the png
encoding can draw (one sample; one scalar of a Hessian), and what the request would cost
(413 with the estimate, before anything is computed or even decoded): the size of its
result (``max_result_bytes``) and its compute (``max_work_per_request``: samples x passes
x activation elements, ``engine.workload``). The sample count has only a high ceiling
(``max_samples_per_request``), so that many small samples (a 4096-point PINN batch, 2x2
Hessians) are served while a few large ones are bounded by what they cost. Decoding a
tensor object's data is the codec's job (``wire.codec``); judging it against the model is
this module's, and nothing is checked anywhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hessian_service.engine import DerivativeKind, Objective, ObjectiveKind, workload
from hessian_service.errors import InvalidInput, TooLarge
from hessian_service.repository.registry import LoadedModel
from hessian_service.serving.operations import Operation
from hessian_service.units import format_bytes
from hessian_service.wire import codec, packing, precision
from hessian_service.wire.schemas import (
    CrossEntropyObjective,
    DerivativeRequest,
    LogSoftmaxObjective,
    MseObjective,
    ObjectiveSpec,
    SampleRequest,
    SumObjective,
    TensorObject,
    WeightedSumObjective,
)

PRECISIONS = {"float32": torch.float32, "float64": torch.float64}
# Most rows one request may ask for (``rows.stop - rows.start``): each is one
# Hessian-vector product per sample and scalar. As many as the 3x64x64 model's 12,288
# inputs, so that a model whose whole Hessian fits the size limit takes one request.
MAX_ROWS = 16384


@dataclass(frozen=True)
class RequestLimits:
    """The operator's limits a request is held to (from ``Settings``)."""

    max_samples: int
    max_output_indices: int
    max_result_bytes: int
    max_work: int | None = None  # activation elements (engine.workload.work); None: no bound


@dataclass(frozen=True)
class PreparedRequest:
    """A request decoded and checked against its model: ready to compute."""

    operation: Operation
    request: DerivativeRequest
    model: LoadedModel
    x: torch.Tensor  # [B, *sample_shape] in the compute dtype, on the model's device
    batched: bool
    objective: Objective | None
    output_index: int | list[int] | None
    # rows.start, rows.stop of a symmetric operation's matrices; None: every row
    rows: tuple[int, int] | None = None
    # the result's size on the wire (rows, layout and result_precision counted)
    result_bytes: int = 0

    @property
    def kind(self) -> DerivativeKind:
        return self.operation.kind

    @property
    def all_outputs(self) -> bool:
        """True when the result covers every output (no index, no objective)."""
        return (
            self.operation.all_outputs_by_default
            and self.output_index is None
            and self.objective is None
        )


def model_activations(model: LoadedModel) -> int | None:
    """Elements one forward pass of one sample creates (measured once and kept;
    ``engine.workload``), or None where it cannot be measured: the work estimates' unit."""
    manifest = model.manifest
    return workload.activation_elements(
        model.module, tuple(manifest.input_shape), PRECISIONS[manifest.dtype], model.device
    )


def prepare(
    operation: Operation, request: DerivativeRequest, model: LoadedModel, limits: RequestLimits
) -> PreparedRequest:
    """Decode and check ``request`` for ``model``; raise a ``ServiceError`` before any work."""
    manifest = model.manifest
    outputs = math.prod(manifest.output_shape)
    _check_output_index(request.output_index, outputs, limits.max_output_indices)
    unselected = request.output_index is None and request.objective is None
    if unselected and not operation.all_outputs_by_default and outputs != 1:
        raise InvalidInput(
            f"output_index: required for /{operation.kind} on {manifest.name!r}, which has "
            f"{outputs} outputs (or give an objective)",
            field="output_index",
        )
    batch, batched = _input_batch(request.inputs[0], manifest.input_shape, limits.max_samples)
    _check_picture(operation, request, batch)
    scalars = outputs if unselected and operation.all_outputs_by_default else _count(request)
    n = math.prod(manifest.input_shape)
    rows = _check_rows(operation, request, n)
    result_bytes = _check_result_size(operation, request, batch, scalars, n, limits)
    _check_work(operation, model, batch, scalars, rows[1] - rows[0] if rows else n, limits.max_work)
    objective = engine_objective(request, outputs, batch)
    x = codec.decode_tensor(request.inputs[0], "inputs[0]")
    x = x if batched else x.unsqueeze(0)
    return PreparedRequest(
        operation=operation,
        request=request,
        model=model,
        x=x.to(device=model.device, dtype=PRECISIONS[request.precision]),
        batched=batched,
        objective=objective,
        output_index=request.output_index,
        rows=rows,
        result_bytes=result_bytes,
    )


def _check_rows(operation: Operation, request: DerivativeRequest, n: int) -> tuple[int, int] | None:
    """``rows`` and ``layout: "packed"`` need a symmetric ``n x n`` matrix per scalar (a
    Hessian); ``result_precision`` may only narrow. Returns ``(start, stop)`` or None."""
    if request.result_precision is not None:
        if request.encoding == "png":
            raise InvalidInput(
                'result_precision: encoding "png" draws the computed values; leave '
                "result_precision out",
                field="result_precision",
            )
        precision.check_narrowing(request.result_precision, request.precision)
    if not operation.symmetric_matrix:
        asked = (("rows", request.rows is not None), ("layout", request.layout == "packed"))
        for name, given in asked:
            if given:
                what = "rows" if name == "rows" else 'layout "packed"'
                raise InvalidInput(
                    f"{name}: {what} applies to a symmetric n x n result (/hessian), not to "
                    f"/{operation.kind}"
                    + ("; select its rows with output_index" if name == "rows" else "")
                    + ("; use layout matrix or tensor" if name == "layout" else ""),
                    field=name,
                )
    if request.rows is None:
        return None
    start, stop = request.rows.start, request.rows.stop
    if not start < n:
        raise InvalidInput(
            f"rows.start: {start} is out of range; the matrix has {n} rows (0 to {n - 1})",
            field="rows.start",
        )
    if not start < stop <= n:
        raise InvalidInput(
            f"rows.stop: expected rows.start < rows.stop <= {n} (n, the model's inputs), "
            f"got {stop} with rows.start {start}",
            field="rows.stop",
        )
    if stop - start > MAX_ROWS:
        raise InvalidInput(
            f"rows.stop: at most {MAX_ROWS} rows per request, got {stop - start} "
            f"(rows.stop at most {start + MAX_ROWS})",
            field="rows.stop",
        )
    return start, stop


def result_entries(operation: Operation, request: DerivativeRequest, n: int) -> int:
    """Entries per selected scalar of one sample, as sent: the rows asked for, packed or
    not, else the operation's whole result."""
    start, stop = (request.rows.start, request.rows.stop) if request.rows else (0, n)
    if request.layout == "packed":
        return packing.segment_length(n, start, stop)
    if request.rows is not None:
        return (stop - start) * n
    return operation.entries_per_scalar(n)


def _count(request: DerivativeRequest) -> int:
    """Selected scalars per sample: the list's length, else one (an index or objective)."""
    index = request.output_index
    return len(index) if isinstance(index, list) else 1


def _input_batch(tensor: TensorObject, sample_shape: list[int], limit: int) -> tuple[int, bool]:
    """The request's sample count and whether it sent a batch, from the declared shape
    alone (the data is decoded only once every size check has passed)."""
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
    return (shape[0] if batched else 1), batched


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


def _check_picture(operation: Operation, request: DerivativeRequest, batch: int) -> None:
    """The png encoding draws one 2-D picture: one sample, and for a Hessian one scalar;
    its fields mean nothing to the other encodings."""
    if request.encoding != "png":
        for name in ("image_size", "image_limit"):
            if getattr(request, name) is not None:
                raise InvalidInput(
                    f'{name}: applies to encoding "png" only; this request\'s encoding '
                    f"is {request.encoding!r}",
                    field=name,
                )
        return
    if batch > 1:
        raise InvalidInput(
            f'inputs[0].shape: encoding "png" draws one sample; got a batch of {batch} '
            "(send one sample, or a batch of 1)",
            field="inputs[0].shape",
        )
    if isinstance(request.output_index, list) and operation.axes_per_scalar == 2:
        raise InvalidInput(
            f'output_index: encoding "png" draws one [n, n] {operation.kind}; give one int '
            f"output_index (or an objective), not a list of {len(request.output_index)}",
            field="output_index",
        )
    if request.layout != "matrix":
        raise InvalidInput(
            'layout: encoding "png" draws the matrix layout; leave layout out or use "matrix"',
            field="layout",
        )


def _check_result_size(
    operation: Operation,
    request: DerivativeRequest,
    batch: int,
    scalars: int,
    n: int,
    limits: RequestLimits,
) -> int:
    """The result's bytes as sent (``rows``, ``layout`` and ``result_precision``
    counted); 413 when over ``max_result_bytes``."""
    itemsize = precision.itemsize(request.result_precision or request.precision)
    per_scalar = result_entries(operation, request, n)
    size = batch * scalars * per_scalar * itemsize
    if size <= limits.max_result_bytes:
        return size
    one_matrix = request.rows is not None and batch * scalars == 1
    field = "rows" if one_matrix else _size_field(batch, scalars)
    pieces = ""
    if operation.symmetric_matrix:
        fitting_rows = limits.max_result_bytes // max(batch * scalars * n * itemsize, 1)
        pieces = (
            f'; ask for it in blocks of at most {fitting_rows} rows ("rows": {{"start": a, '
            f'"stop": a + {fitting_rows}}})'
            if fitting_rows >= 1
            else ""
        ) + ', layout "packed" (half the bytes), result_precision "float16" (half again)'
    raise TooLarge(
        f"{field}: the {operation.kind} would be {format_bytes(size)} ({batch} "
        f"samples x {scalars} scalars x {per_scalar} entries x {itemsize} bytes), over this "
        f"server's limit of {format_bytes(limits.max_result_bytes)} (max_result_bytes); "
        f"send fewer samples or output indices per request"
        f"{', or use float32' if itemsize > 4 else ''}{pieces}; "
        f"{operation.smaller_alternative(batch, scalars, n, itemsize)}",
        field=field,
        estimated_bytes=size,
        limit_bytes=limits.max_result_bytes,
        setting="HESSIAN_MAX_RESULT_BYTES",
    )


def _size_field(batch: int, scalars: int) -> str:
    """The field a size limit blames: the batch when there is one, else a list of output
    indices, else the input (one sample of this model is already too much)."""
    return "output_index" if batch == 1 and scalars > 1 else "inputs[0].shape"


def _check_work(
    operation: Operation,
    model: LoadedModel,
    batch: int,
    scalars: int,
    n: int,
    limit: int | None,
) -> None:
    """413 when ``samples x passes x activation elements`` is over ``limit``; the model's
    activation elements are measured once (one forward pass of one sample) and kept.
    ``n`` is the inputs one pass is pushed along: the rows asked for, when a Hessian's
    rows are (one product per row)."""
    if limit is None:
        return
    activations = model_activations(model)
    if activations is None:
        return
    kind = operation.kind
    estimate = workload.work(
        kind, samples=batch, inputs=n, scalars=scalars, activations=activations
    )
    if estimate <= limit:
        return
    passes = workload.passes_per_sample(kind, inputs=n, scalars=scalars)
    fitting = limit // (passes * activations)
    advice = (
        f"send at most {fitting} samples of {model.manifest.name!r} per request"
        if fitting >= 1
        else "even one sample is over it"
    )
    field = _size_field(batch, scalars)
    raise TooLarge(
        f"{field}: this {kind} request is estimated at {estimate:.3g} activation elements "
        f"of work ({batch} samples x {passes} passes per sample x {activations} activation "
        f"elements per pass), over this server's limit of {limit:.3g} "
        f"(max_work_per_request); {advice}"
        + (", or ask for fewer output indices" if scalars > 1 else ""),
        field=field,
        estimated_work=estimate,
        limit_work=limit,
        setting="HESSIAN_MAX_WORK_PER_REQUEST",
    )


def _output_rows(
    target: float | list[Any] | TensorObject, outputs: int, batch: int, field: str
) -> torch.Tensor:
    """An objective's numbers shaped like the output: one number (broadcast), one per
    output, or one row per sample; float64, finite."""
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


def _classes(spec: CrossEntropyObjective, outputs: int, batch: int) -> torch.Tensor:
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
    return torch.tensor(classes, dtype=torch.long)


def engine_objective(request: SampleRequest, outputs: int, batch: int) -> Objective | None:
    """The request's objective (a wire spec) as the engine's ``Objective``, checked against
    the model's ``outputs`` and the request's ``batch``; None for an output selection."""
    if request.objective is not None and request.output_index is not None:
        raise InvalidInput(
            "output_index: give output_index or objective, not both", field="output_index"
        )
    return objective_of(request.objective, outputs, batch)


def objective_of(spec: ObjectiveSpec | None, outputs: int, batch: int) -> Objective | None:
    """A wire objective spec as the engine's ``Objective``, checked against the model's
    ``outputs`` and the ``batch``; None for none."""
    if spec is None:
        return None
    if isinstance(spec, SumObjective):
        return Objective(ObjectiveKind.SUM)
    if isinstance(spec, LogSoftmaxObjective):
        if spec.index >= outputs:
            raise InvalidInput(
                f"objective.index: {spec.index} is out of range for {outputs} outputs",
                field="objective.index",
            )
        return Objective(ObjectiveKind.LOG_SOFTMAX, index=spec.index)
    if isinstance(spec, MseObjective):
        target = _output_rows(spec.target, outputs, batch, "objective.target")
        return Objective(ObjectiveKind.MSE, target=target)
    if isinstance(spec, WeightedSumObjective):
        weights = _output_rows(spec.weights, outputs, batch, "objective.weights")
        if weights.numel() == 1 and outputs != 1:
            raise InvalidInput(
                f"objective.weights: expected {outputs} weights (one per output) or "
                f"{batch} x {outputs} (per sample), got 1",
                field="objective.weights",
            )
        return Objective(ObjectiveKind.WEIGHTED_SUM, target=weights)
    assert isinstance(spec, CrossEntropyObjective)
    return Objective(ObjectiveKind.CROSS_ENTROPY, target=_classes(spec, outputs, batch))
