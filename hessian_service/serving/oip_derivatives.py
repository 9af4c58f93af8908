"""Derivative outputs on the Open Inference Protocol: ``jacobian``, ``hessian``, ``hvp``,
``hessian_diagonal`` and ``hessian_trace`` beside the forward pass's ``output``.

An infer request asks for them by name in ``outputs``, as for any output, so that
tritonclient and KServe's client read them unchanged (``InferRequestedOutput("hessian")``,
``as_numpy("hessian")``). What to derive rides in ``parameters`` -- the request's, which
tritonclient's ``infer(parameters=...)`` sets, with an output's own ``parameters``
overriding them for that output: any field of the service's own body for that operation
(``output_index``, ``objective``, ``precision``, ``layout``, ``rows``, ``exact``,
``max_products``, ...), checked by the same models and limits as ``/hessian``. ``hvp``
multiplies the second input, ``vectors`` (``[m, *input_shape]``, shared by every sample,
or ``[B, m, *input_shape]``).

Each derivative output is computed as ``/hessian`` (or ``/hvp``, ...) computes it --
through ``DerivativeService.computed`` and ``describe``, the same queue, limits, method
and rounding -- and its tensor is taken from that response body: the numbers are those
of ``/hessian`` for the same input, bit for bit.

Derived models (``digits_cnn.hessian``) were the alternative: rejected, since a model's
Jacobian and Hessian with its forward output in one request share the queue slot and the
input's decoding, and a derived model per operation would triple the model list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import orjson
import torch
from pydantic import BaseModel, ValidationError

from hessian_service.engine import DerivativeKind
from hessian_service.errors import InvalidInput
from hessian_service.repository.registry import LoadedModel
from hessian_service.serving.service import DerivativeService
from hessian_service.wire import codec
from hessian_service.wire.operator_schemas import EstimateRequest, ProductRequest
from hessian_service.wire.schemas import DerivativeRequest

VECTORS_NAME = "vectors"


@dataclass(frozen=True)
class DerivedKind:
    """One derivative output: the service operation, its body, and its tensor's name in
    that operation's response."""

    kind: DerivativeKind
    body: type[BaseModel]
    value: str


DERIVED: dict[str, DerivedKind] = {
    "jacobian": DerivedKind(DerivativeKind.JACOBIAN, DerivativeRequest, "jacobian"),
    "hessian": DerivedKind(DerivativeKind.HESSIAN, DerivativeRequest, "hessian"),
    "hvp": DerivedKind(DerivativeKind.HVP, ProductRequest, "hvp"),
    "hessian_diagonal": DerivedKind(DerivativeKind.HESSIAN_DIAGONAL, EstimateRequest, "diagonal"),
    "hessian_trace": DerivedKind(DerivativeKind.HESSIAN_TRACE, EstimateRequest, "trace"),
}
# Parameters that belong to the protocol (how to send a tensor), never to the derivative.
PROTOCOL_PARAMETERS = frozenset({"binary_data", "binary_data_output", "binary_data_size"})
# Fields the protocol decides for itself: the input, the model, and the encoding.
FIXED_FIELDS = frozenset({"model", "inputs", "vectors", "encoding"})
# Values a client may send as a JSON string (tritonclient's gRPC parameters are scalars).
JSON_VALUED = frozenset({"output_index", "objective", "rows"})


def metadata_outputs(input_shape: list[int], output_shape: list[int]) -> list[dict[str, Any]]:
    """The derivative outputs' metadata, ``-1`` the batch (and ``hvp``'s vector count).

    Shapes are those of the default selection: ``jacobian`` of every output, the others
    of one ``output_index`` or an ``objective``; a list of k indices adds a ``k`` axis."""
    n, m = math.prod(input_shape), math.prod(output_shape)
    shapes = {
        "jacobian": [-1, m, n],
        "hessian": [-1, n, n],
        "hvp": [-1, -1, *input_shape],
        "hessian_diagonal": [-1, *input_shape],
        "hessian_trace": [-1],
    }
    return [{"name": name, "datatype": "FP32", "shape": shape} for name, shape in shapes.items()]


@dataclass(frozen=True)
class DerivedOutput:
    """A requested derivative output, its parameters merged and its body validated."""

    name: str
    binary: bool
    derived: DerivedKind
    body: DerivativeRequest | ProductRequest | EstimateRequest


def _json_valued(key: str, value: Any, where: str) -> Any:
    if key not in JSON_VALUED or not isinstance(value, str):
        return value
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        raise InvalidInput(
            f"{where}.{key}: expected JSON (e.g. 2, [1, 3] or an object), got {value!r}",
            field=f"{where}.{key}",
        ) from None


def fields_of(parameters: dict[str, Any], where: str) -> dict[str, Any]:
    """The derivative's fields among ``parameters`` (the protocol's own left out)."""
    fields = {}
    for key, value in parameters.items():
        if key in PROTOCOL_PARAMETERS:
            continue
        if key in FIXED_FIELDS:
            raise InvalidInput(
                f"{where}.{key}: set by the protocol (the model in the URL, the inputs, "
                "binary_data for the encoding); not a parameter",
                field=f"{where}.{key}",
            )
        fields[key] = _json_valued(key, value, where)
    return fields


def derived_output(
    name: str,
    binary: bool,
    fields: dict[str, Any],
    where: str,
    model: LoadedModel,
    x: torch.Tensor,
    vectors: torch.Tensor | None,
) -> DerivedOutput:
    """The service body for output ``name``: the model, ``x`` (and ``vectors`` for hvp)
    in base64, and ``fields``; a field at fault is named as ``<where>.<field>``."""
    derived = DERIVED[name]
    body: dict[str, Any] = {
        "model": model.manifest.ref,
        "inputs": [codec.tensor_object("x", x, "base64")],
        "encoding": "binary",  # raw tensors out of describe, encoded here as asked
        **fields,
    }
    if derived.body is ProductRequest:
        if vectors is None:
            raise InvalidInput(
                f"inputs: {name} multiplies a second input named {VECTORS_NAME!r} "
                "([m, *input_shape] or [B, m, *input_shape]); none was sent",
                field="inputs",
            )
        body["vectors"] = codec.tensor_object(VECTORS_NAME, vectors, "base64")
    try:
        request = derived.body.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first["loc"])
        raise InvalidInput(f"{where}.{loc}: {first['msg']}", field=f"{where}.{loc}") from None
    assert isinstance(request, DerivativeRequest | ProductRequest | EstimateRequest)
    return DerivedOutput(name, binary, derived, request)


def _tensor_of(
    service: DerivativeService, prepared: Any, result: Any, ms: float, name: str
) -> torch.Tensor:
    """The tensor named ``name`` of the operation's response body (describe, binary)."""
    body = service.describe(prepared, result, ms)
    for output in body["outputs"]:
        if output["name"] == name:
            raw = torch.from_numpy(np.ascontiguousarray(output["data"]))
            return raw.view(codec.TORCH_DTYPES[output["datatype"]]).reshape(output["shape"])
    raise KeyError(name)


async def compute(service: DerivativeService, output: DerivedOutput) -> torch.Tensor:
    """The output's tensor, exactly as its own endpoint computes and writes it."""
    prepared, result, ms = await service.computed(output.derived.kind, output.body)
    return await anyio.to_thread.run_sync(
        _tensor_of, service, prepared, result, ms, output.derived.value
    )
