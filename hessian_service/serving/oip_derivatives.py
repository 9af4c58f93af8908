"""Derivative outputs on the Open Inference Protocol: ``jacobian``, ``hessian``, ``hvp``,
``hessian_diagonal`` and ``hessian_trace`` beside the forward pass's ``output``.

An infer request asks for them by name in ``outputs``, as for any output, so that
tritonclient and KServe's client read them unchanged (``InferRequestedOutput("hessian")``,
``as_numpy("hessian")``). What to derive rides in ``parameters`` -- the request's, which
tritonclient's ``infer(parameters=...)`` sets, with an output's own ``parameters``
overriding them for that output: any field of the service's own body for that operation
(``output_index``, ``objective``, ``precision``, ``layout``, ``rows``, ``exact``,
``max_products``, ...), checked by the same models and limits as ``/hessian``. ``hvp``
multiplies a second input, ``vectors`` (``[m, *input_shape]``, shared by every sample,
or ``[B, m, *input_shape]``); the metadata lists ``x`` alone, so that tools that send
every listed input (perf_analyzer) send a valid request.

Each derivative output is computed as ``/hessian`` (or ``/hvp``, ...) computes it --
through ``DerivativeService.computed`` and ``describe``, the same queue, limits, method
and rounding -- and its tensor is taken from that response body: the numbers are those
of ``/hessian`` for the same input, bit for bit (as two ``/hessian`` requests agree: when
the batcher merges a request with others, vectorized kernels over a larger batch may
differ in the last bits; ``HESSIAN_MAX_BATCH_SIZE=1`` keeps every answer bit-stable).

Every derivative output is checked against the model -- its body validated and prepared,
the selection, shapes and limits, the outputs' sizes together -- before any of them is
computed. Request-level parameters go to each output whose body takes them (``exact``
to ``hessian_trace`` and not to ``hessian``); one that no output asked for takes is
refused.

Derived models (``digits_cnn.hessian``) were the alternative: rejected, since a model's
Jacobian and Hessian with its forward output in one request share the queue slot and the
input's decoding, and a derived model per operation would triple the model list.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import orjson
import torch
from pydantic import BaseModel, ValidationError

from hessian_service.engine import DerivativeKind
from hessian_service.errors import InvalidInput, TooLarge
from hessian_service.repository.registry import LoadedModel
from hessian_service.serving.merging import Computed
from hessian_service.serving.operator_request import Prepared
from hessian_service.serving.service import DerivativeService
from hessian_service.units import format_bytes
from hessian_service.wire import codec
from hessian_service.wire.fields import field_name
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
# Parameters that belong to the protocol, never to the derivative: how to send a tensor,
# and what tritonclient's infer() sets from its own arguments (sequence_id, priority,
# timeout; a per-output class_count). The service has its own deadline and no sequences,
# so these are accepted and not read, as before derivative outputs existed.
PROTOCOL_PARAMETERS = frozenset(
    {
        "binary_data",
        "binary_data_output",
        "binary_data_size",
        "classification",
        "priority",
        "sequence_end",
        "sequence_id",
        "sequence_start",
        "timeout",
    }
)
# Fields the protocol decides for itself: the input, the model, and the encoding.
FIXED_FIELDS = frozenset({"model", "inputs", "vectors", "encoding"})
# Values a client may send as a JSON string (tritonclient's gRPC parameters are scalars).
JSON_VALUED = frozenset({"output_index", "objective", "rows"})


def metadata_outputs(input_shape: list[int], output_shape: list[int]) -> list[dict[str, Any]]:
    """The derivative outputs' metadata, ``-1`` the batch (and, second in ``hvp``'s shape,
    its vector count m).

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
    """A requested derivative output: its body validated and checked against the model
    (``DerivativeService.prepare``), ready to queue."""

    name: str
    binary: bool
    derived: DerivedKind
    prepared: Prepared


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


def accepted(name: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The request-level ``fields`` that output ``name``'s body takes (``exact`` goes to
    ``hessian_trace``, not to ``hessian``, when both are asked for in one request)."""
    known = DERIVED[name].body.model_fields
    return {key: value for key, value in fields.items() if key in known}


def unread(names: list[str], fields: dict[str, Any]) -> str | None:
    """A request-level field that no requested derivative output takes, if any."""
    for key in fields:
        if not any(key in DERIVED[name].body.model_fields for name in names):
            return key
    return None


def _source(key: str, own: dict[str, Any], where: str) -> str:
    return where if key in own else "parameters"


def derived_output(
    service: DerivativeService,
    i: int,
    name: str,
    binary: bool,
    shared: dict[str, Any],
    own: dict[str, Any],
    model: LoadedModel,
    x: torch.Tensor,
    vectors: torch.Tensor | None,
) -> DerivedOutput:
    """Output ``i``, ``name``: its endpoint's body (the model, ``x`` and for hvp
    ``vectors`` in base64, the request's ``shared`` fields it takes and its ``own``),
    validated and prepared. An error names the output and the parameter at fault
    (``parameters.<field>`` or ``outputs[i].parameters.<field>``)."""
    derived = DERIVED[name]
    where = f"outputs[{i}].parameters"
    fields = {**accepted(name, shared), **own}
    body: dict[str, Any] = {
        "model": model.manifest.ref,
        "inputs": [codec.tensor_object("x", x, "base64")],
        "encoding": "binary",  # raw tensors out of describe, encoded here as asked
        **fields,
    }
    if derived.body is ProductRequest:
        if vectors is None:
            raise InvalidInput(
                f"inputs: {name} (outputs[{i}]) multiplies a second input named "
                f"{VECTORS_NAME!r} ([m, *input_shape] or [B, m, *input_shape]); none was sent",
                field="inputs",
            )
        body["vectors"] = codec.tensor_object(VECTORS_NAME, vectors, "base64")
    try:
        request = derived.body.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = field_name(first["loc"], body)
        at = f"{_source(str(first['loc'][0]), own, where)}.{loc}"
        raise InvalidInput(f"{at}: {first['msg']}", field=at) from None
    assert isinstance(request, DerivativeRequest | ProductRequest | EstimateRequest)
    try:
        prepared = service.prepare(derived.kind, request)
    except InvalidInput as exc:
        key = (exc.field or "").split(".")[0].split("[")[0]
        named = f"{_source(key, own, where)}.{exc.field}" if key in fields else exc.field
        raise InvalidInput(f"outputs[{i}] ({name}): {exc.detail}", field=named) from None
    return DerivedOutput(name, binary, derived, prepared)


def check_total(outputs: list[DerivedOutput], max_result_bytes: int) -> None:
    """Every derivative output is within the result limit on its own; together too."""
    total = sum(output.prepared.result_bytes for output in outputs)
    if len(outputs) > 1 and total > max_result_bytes:
        sizes = ", ".join(f"{o.name} {format_bytes(o.prepared.result_bytes)}" for o in outputs)
        raise TooLarge(
            f"outputs: the derivative outputs asked for come to {format_bytes(total)} "
            f"({sizes}), over this server's limit of {format_bytes(max_result_bytes)} "
            "(HESSIAN_MAX_RESULT_BYTES); ask for them in separate requests",
            field="outputs",
            estimated_bytes=total,
            limit_bytes=max_result_bytes,
        )


def _tensor_of(
    service: DerivativeService, prepared: Prepared, result: Computed, ms: float, name: str
) -> torch.Tensor:
    """The tensor named ``name`` of the operation's response body (describe, binary)."""
    body = service.describe(prepared, result, ms)
    for output in body["outputs"]:
        if output["name"] == name:
            raw = torch.from_numpy(np.ascontiguousarray(output["data"]))
            return raw.view(codec.TORCH_DTYPES[output["datatype"]]).reshape(output["shape"])
    raise KeyError(name)


async def compute(
    service: DerivativeService,
    output: DerivedOutput,
    *,
    started: float,
    disconnected: Callable[[], Awaitable[bool]] | None = None,
) -> torch.Tensor:
    """The output's tensor, exactly as its own endpoint computes and writes it; the
    deadline counts from the request's ``started``."""
    result, ms = await service.computed_prepared(
        output.prepared, started=started, disconnected=disconnected
    )
    return await anyio.to_thread.run_sync(
        _tensor_of, service, output.prepared, result, ms, output.derived.value
    )
