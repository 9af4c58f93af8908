"""UM-Bridge on the registry's models: sizes, support, and the four calls on the engine.

A served network is an UM-Bridge model ``F: R^n -> R^k`` with one input vector (its input
flattened, ``n = prod(input_shape)``) and one output vector: every output flattened, or
the scalars the call's ``config`` selects (``output_index``, ``objective``; see
``wire.umbridge_schemas``). The calls map onto the service's own operations, so that
they pass the same checks, queue and limits as ``/vjp``, ``/jvp`` and ``/hvp``:

- ``Gradient`` (``sens^T J``) is ``/vjp`` with ``sens`` as the one covector;
- ``ApplyJacobian`` (``J vec``) is ``/jvp`` with ``vec``;
- ``ApplyHessian`` (the Hessian of ``sens^T F`` applied to ``vec``) is ``/hvp`` of the
  ``weighted_sum`` objective with ``sens`` as its weights (scattered onto the selected
  outputs): one product, not one per output. Under an ``objective`` config ``F`` is that
  one scalar and the product is scaled by ``sens[0]``.
- ``Evaluate`` is the forward pass (no autograd) in a worker thread, as ``/v2`` infer.

Nothing here knows HTTP: errors are the service's (``InvalidInput`` naming the
protocol's field), and the routes write them in the protocol's shape.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import torch
from pydantic import ValidationError

from hessian_service.engine import DerivativeKind
from hessian_service.errors import InvalidInput
from hessian_service.repository.registry import LoadedModel, Registry
from hessian_service.serving.operations import OperatorOutcome
from hessian_service.serving.request import PRECISIONS, objective_of
from hessian_service.serving.service import INLINE_ELEMENTS, DerivativeService
from hessian_service.wire import codec
from hessian_service.wire.fields import field_name
from hessian_service.wire.operator_schemas import ProductRequest
from hessian_service.wire.umbridge_schemas import (
    ApplyHessianRequest,
    ApplyJacobianRequest,
    EvaluateRequest,
    GradientRequest,
    Support,
    UmbridgeConfig,
    Vector,
)

Body = TypeVar("Body")
# Polled while a call waits in the queue: a client that went away has its work dropped.
Disconnected = Callable[[], Awaitable[bool]] | None

# Every loaded model serves all four: the capability probe found a path for each kind (or
# the autograd fallback) before the model was loaded at all.
SUPPORT = Support(Evaluate=True, Gradient=True, ApplyJacobian=True, ApplyHessian=True)


@dataclass(frozen=True)
class UmbridgeModel:
    """One loaded model as UM-Bridge sees it under one ``config``."""

    model: LoadedModel
    config: UmbridgeConfig

    @property
    def n(self) -> int:
        return math.prod(self.model.manifest.input_shape)

    @property
    def outputs(self) -> int:
        """The network's flat outputs (before the config's selection)."""
        return math.prod(self.model.manifest.output_shape)

    @property
    def selected_shape(self) -> list[int]:
        """One output vector's shape as the service's operators take it: the output's
        own shape, ``[k]`` for k indices, ``[]`` for one index or an objective."""
        index = self.config.output_index
        if self.config.objective is not None or isinstance(index, int):
            return []
        if index is None:
            return list(self.model.manifest.output_shape)
        return [len(index)]

    @property
    def input_sizes(self) -> list[int]:
        return [self.n]

    @property
    def output_sizes(self) -> list[int]:
        return [math.prod(self.selected_shape)]


def model_names(registry: Registry) -> list[str]:
    """The models ``GET /Info`` lists: every loaded name (each at its latest version)."""
    return sorted(registry.versions)


def resolve(
    registry: Registry, name: str, config: dict[str, Any], max_output_indices: int
) -> UmbridgeModel:
    """The model ``name`` under ``config``, checked: unknown keys, an index out of range,
    ``output_index`` with ``objective`` are refused (``config.<key>`` named)."""
    model = registry.get(name)
    try:
        read = UmbridgeConfig.model_validate(config)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = field_name(("config", *first["loc"]), {"config": config})
        raise InvalidInput(f"{where}: {first['msg']}", field=where) from None
    umbridge = UmbridgeModel(model, read)
    index = read.output_index
    if index is not None and read.objective is not None:
        raise InvalidInput(
            "config.output_index: give output_index or objective, not both",
            field="config.output_index",
        )
    indices = [index] if isinstance(index, int) else index or []
    if isinstance(index, list) and not 1 <= len(index) <= max_output_indices:
        raise InvalidInput(
            f"config.output_index: expected 1 to {max_output_indices} indices, got {len(index)}",
            field="config.output_index",
        )
    for i in indices:
        if not 0 <= i < umbridge.outputs:
            raise InvalidInput(
                f"config.output_index: {i} is out of range for {umbridge.outputs} outputs "
                f"of {model.manifest.ref}",
                field="config.output_index",
            )
    return umbridge


def _check_wrt(**indices: int) -> None:
    """``outWrt``, ``inWrt``, ...: the model has one input and one output vector, index 0."""
    for field, value in indices.items():
        if value != 0:
            raise InvalidInput(
                f"{field}: the model has 1 vector here (index 0), got {value}", field=field
            )


def _vector(values: Vector, size: int, field: str) -> torch.Tensor:
    if len(values) != size:
        raise InvalidInput(f"{field}: expected {size} numbers, got {len(values)}", field=field)
    try:
        tensor = torch.tensor(values, dtype=torch.float64)
    except OverflowError:  # an integer past float64's range (JSON integers are unbounded)
        raise InvalidInput(f"{field}: a number is out of float64's range", field=field) from None
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidInput(f"{field}: contains NaN or Inf", field=field)
    return tensor


def _input(umbridge: UmbridgeModel, inputs: list[Vector]) -> torch.Tensor:
    """The one input vector, ``[1, *input_shape]`` float64."""
    if len(inputs) != 1:
        raise InvalidInput(
            f"input: the model takes 1 input vector of {umbridge.n} numbers, got "
            f"{len(inputs)} vectors",
            field="input",
        )
    flat = _vector(inputs[0], umbridge.n, "input[0]")
    return flat.reshape(1, *umbridge.model.manifest.input_shape)


def _product_request(
    umbridge: UmbridgeModel, x: torch.Tensor, vectors: torch.Tensor, objective: Any = None
) -> ProductRequest:
    """A ``/vjp``, ``/jvp`` or ``/hvp`` body for one sample and one vector (``vectors``
    ``[1, *shape]``), the config's selection unless ``objective`` replaces it."""
    config = umbridge.config
    body: dict[str, Any] = {
        "model": umbridge.model.manifest.ref,
        "inputs": [codec.tensor_object("x", x, "base64")],
        "vectors": codec.tensor_object("vectors", vectors, "base64"),
        "precision": config.precision,
    }
    if objective is not None:
        body["objective"] = objective
    elif config.objective is not None:
        body["objective"] = config.objective.model_dump()
    elif config.output_index is not None:
        body["output_index"] = config.output_index
    return ProductRequest.model_validate(body)


@dataclass(frozen=True)
class _Product:
    """One call as the service's product: the operation, its body, and a factor the
    values are multiplied by (``sens[0]`` under an objective config)."""

    kind: DerivativeKind
    request: ProductRequest
    scale: float = 1.0


def _gradient(umbridge: UmbridgeModel, body: GradientRequest) -> _Product:
    """``sens^T J``: the vector-Jacobian product, ``n`` numbers."""
    _check_wrt(outWrt=body.out_wrt, inWrt=body.in_wrt)
    x = _input(umbridge, body.input)
    sens = _vector(body.sens, umbridge.output_sizes[0], "sens").reshape(1, *umbridge.selected_shape)
    return _Product(DerivativeKind.VJP, _product_request(umbridge, x, sens))


def _apply_jacobian(umbridge: UmbridgeModel, body: ApplyJacobianRequest) -> _Product:
    """``J vec``: the Jacobian-vector product, one number per output."""
    _check_wrt(outWrt=body.out_wrt, inWrt=body.in_wrt)
    x = _input(umbridge, body.input)
    vec = _vector(body.vec, umbridge.n, "vec").reshape(x.shape)
    return _Product(DerivativeKind.JVP, _product_request(umbridge, x, vec))


def _weights(umbridge: UmbridgeModel, sens: torch.Tensor) -> torch.Tensor:
    """``sens`` on the network's every output: zero where the config selects none (a
    repeated index adds up, as ``sens^T F`` does)."""
    index = umbridge.config.output_index
    if index is None:
        return sens
    indices = torch.tensor([index] if isinstance(index, int) else index)
    return torch.zeros(umbridge.outputs, dtype=sens.dtype).index_add_(0, indices, sens)


def _apply_hessian(umbridge: UmbridgeModel, body: ApplyHessianRequest) -> _Product:
    """``∇²(sens^T F) vec``: one Hessian-vector product, ``n`` numbers."""
    _check_wrt(outWrt=body.out_wrt, inWrt1=body.in_wrt1, inWrt2=body.in_wrt2)
    x = _input(umbridge, body.input)
    sens = _vector(body.sens, umbridge.output_sizes[0], "sens")
    vec = _vector(body.vec, umbridge.n, "vec").reshape(x.shape)
    if umbridge.config.objective is not None:  # F is that one scalar: sens[0] H vec
        return _Product(DerivativeKind.HVP, _product_request(umbridge, x, vec), float(sens[0]))
    weights = _weights(umbridge, sens).reshape(1, *umbridge.model.manifest.output_shape)
    objective = {"type": "weighted_sum", "weights": codec.tensor_object("w", weights, "base64")}
    return _Product(DerivativeKind.HVP, _product_request(umbridge, x, vec, objective=objective))


# The fields of the service's bodies that come from the call's config.
CONFIG_FIELDS = frozenset({"output_index", "objective", "precision"})


def _in_config(exc: InvalidInput) -> InvalidInput:
    """An error about a field the config gave, named as the client wrote it:
    ``config.objective.target``, not ``objective.target``."""
    field = exc.field or ""
    if field.split(".")[0].split("[")[0] not in CONFIG_FIELDS:
        return exc
    detail = f"config.{exc.detail}" if exc.detail.startswith(field) else exc.detail
    return InvalidInput(detail, field=f"config.{field}")


async def _run(
    service: DerivativeService,
    umbridge: UmbridgeModel,
    build: Callable[[UmbridgeModel, Body], _Product],
    body: Body,
    disconnected: Disconnected,
) -> list[float]:
    """Build the call's product (off the event loop for a large input), then compute it
    through the service's queue: its values, flat, as JSON floats."""
    if umbridge.n <= INLINE_ELEMENTS:
        product = build(umbridge, body)
    else:
        product = await anyio.to_thread.run_sync(build, umbridge, body)
    try:
        _prepared, result, _ms = await service.computed(
            product.kind, product.request, disconnected=disconnected
        )
    except InvalidInput as exc:
        raise _in_config(exc) from None
    assert isinstance(result, OperatorOutcome)
    (values,) = result.values.values()
    flat: list[float] = (values.reshape(-1).double() * product.scale).tolist()
    return flat


async def gradient(
    service: DerivativeService,
    umbridge: UmbridgeModel,
    body: GradientRequest,
    disconnected: Disconnected = None,
) -> list[float]:
    """``sens^T J``: ``/vjp`` with ``sens`` as the one covector."""
    return await _run(service, umbridge, _gradient, body, disconnected)


async def apply_jacobian(
    service: DerivativeService,
    umbridge: UmbridgeModel,
    body: ApplyJacobianRequest,
    disconnected: Disconnected = None,
) -> list[float]:
    """``J vec``: ``/jvp`` with ``vec``."""
    return await _run(service, umbridge, _apply_jacobian, body, disconnected)


async def apply_hessian(
    service: DerivativeService,
    umbridge: UmbridgeModel,
    body: ApplyHessianRequest,
    disconnected: Disconnected = None,
) -> list[float]:
    """``∇²(sens^T F) vec``: ``/hvp`` of ``weighted_sum`` with ``sens``."""
    return await _run(service, umbridge, _apply_hessian, body, disconnected)


def _forward(umbridge: UmbridgeModel, x: torch.Tensor) -> list[float]:
    """``F(x)``: the network's output, selected as the config says, without autograd."""
    model = umbridge.model
    dtype = PRECISIONS[umbridge.config.precision]
    module = model.for_dtype(dtype)
    with torch.inference_mode():
        output = module(x.to(model.device, dtype)).reshape(-1).to("cpu", torch.float64)
    config = umbridge.config
    objective = objective_of(config.objective, umbridge.outputs, 1)
    if objective is not None:
        target = objective.per_sample_targets(1, umbridge.outputs)[0]
        output = objective.scalar(output, target).reshape(1)
    elif config.output_index is not None:
        index = config.output_index
        output = output[torch.tensor([index] if isinstance(index, int) else index)]
    values: list[float] = output.tolist()
    return values


async def evaluate(
    _service: DerivativeService,
    umbridge: UmbridgeModel,
    body: EvaluateRequest,
    _disconnected: Disconnected = None,
) -> list[list[float]]:
    """``[F(input)]``: one output vector (no derivative, so not through the queue)."""

    def run() -> list[float]:
        return _forward(umbridge, _input(umbridge, body.input))

    try:
        return [await anyio.to_thread.run_sync(run)]
    except InvalidInput as exc:
        raise _in_config(exc) from None
