"""UM-Bridge protocol routes, at the server's root: ``GET /Info``, ``POST /InputSizes``,
``/OutputSizes``, ``/ModelInfo``, ``/Evaluate``, ``/Gradient``, ``/ApplyJacobian``,
``/ApplyHessian``.

At the root because the protocol's clients take a base URL and some of them only a host
and port: the C++ client (and the MATLAB and R clients built on it) hands its URL to an
HTTP client that drops any path, so a prefix would shut them out; the protocol's
capitalized paths clash with none of this service's own. Every loaded model is an
UM-Bridge model of the same name (``serving.umbridge`` says what each call computes).

Bodies are read as ``/hessian``'s are: the JSON numbers counted against their limit as
they arrive, parsed off the event loop when large, then validated. Every error is the
protocol's ``{"error": {"type", "message"}}``, which its clients raise: ``ModelNotFound``,
``InvalidInput`` (status 400, naming the protocol's field) and the service's own limits
(``TooLarge`` 413, ``Overloaded`` 503, ``Timeout`` 504, ``InsufficientStorage`` 507).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from hessian_service.api.body import parsers
from hessian_service.api.deps import RegistryDep, ServiceDep
from hessian_service.api.responses import Responses, inline_schema
from hessian_service.errors import (
    InsufficientStorage,
    InvalidInput,
    NotFound,
    Overloaded,
    ServiceError,
    Timeout,
    TooLarge,
    status_of,
)
from hessian_service.serving import umbridge
from hessian_service.serving.service import DerivativeService
from hessian_service.wire import codec
from hessian_service.wire.fields import field_name
from hessian_service.wire.json_body import INLINE_BODY_BYTES, parse_json, read_body
from hessian_service.wire.umbridge_schemas import (
    ApplyHessianRequest,
    ApplyJacobianRequest,
    ErrorResponse,
    EvaluateRequest,
    EvaluateResponse,
    GradientRequest,
    InfoResponse,
    InputSizesResponse,
    ModelCall,
    ModelInfoResponse,
    NameRequest,
    OutputSizesResponse,
    SizesRequest,
    VectorResponse,
    error_body,
)

logger = logging.getLogger(__name__)
Body = TypeVar("Body", bound=BaseModel)
# A call's computation: the service, the model under its config, the body, and whether
# the client went away (its queued work is dropped) -> the output.
Call = Callable[
    [DerivativeService, umbridge.UmbridgeModel, Any, Callable[[], Awaitable[bool]]],
    Awaitable[Any],
]


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> Response:
    body = codec.dumps(error_body(kind, message))
    return Response(body, status, media_type="application/json", headers=headers)


# The error types a client sees, by the nearest class of the service's error.
_KINDS: tuple[tuple[type[ServiceError], str], ...] = (
    (NotFound, "ModelNotFound"),
    (InvalidInput, "InvalidInput"),
    (TooLarge, "TooLarge"),
    (Overloaded, "Overloaded"),
    (Timeout, "Timeout"),
    (InsufficientStorage, "InsufficientStorage"),
)


def _kind(exc: ServiceError) -> str:
    return next((kind for cls, kind in _KINDS if isinstance(exc, cls)), type(exc).__name__)


class UmbridgeRoute(APIRoute):
    """A route whose every error is UM-Bridge's ``{"error": {"type", "message"}}``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as exc:
                status = 400 if isinstance(exc, NotFound | InvalidInput) else status_of(exc)
                return _error(status, _kind(exc), exc.detail, exc.headers)
            except Exception as exc:  # a client of the protocol reads only this shape
                logger.exception("UM-Bridge %s failed", request.url.path)
                return _error(500, "InternalError", f"{type(exc).__name__}: {exc}")

        return route


router = APIRouter(tags=["UM-Bridge"], route_class=UmbridgeRoute)


def _alternative(_settings: Any) -> str:
    return "UM-Bridge bodies are JSON only: send fewer numbers, or use /hvp with base64 vectors"


async def _read(request: Request, model: type[Body]) -> Body:
    """The body counted, parsed (off the loop when large) and validated as ``model``."""
    settings = request.app.state.settings
    raw = await read_body(
        request.stream(),
        json_number_limit=settings.max_json_number_bytes,
        alternative=_alternative(settings),
    )
    if len(raw) <= INLINE_BODY_BYTES:
        return _parse(raw, model)
    return await anyio.to_thread.run_sync(_parse, raw, model, limiter=parsers())


def _parse(raw: bytes, model: type[Body]) -> Body:
    """Parse and validate (both hold the GIL: one body at a time, off the loop when large)."""
    try:
        data = parse_json(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidInput(f"body: invalid JSON ({exc})", field="body") from None
    if not isinstance(data, dict):
        raise InvalidInput("body: expected a JSON object", field="body")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = field_name(first["loc"], data)
        raise InvalidInput(f"{where}: {first['msg']}", field=where) from None


def _resolve(request: Request, registry: RegistryDep, body: ModelCall) -> umbridge.UmbridgeModel:
    limit = request.app.state.settings.max_output_indices
    return umbridge.resolve(registry, body.name, body.config, limit)


_ERRORS: Responses = {
    400: {
        "model": ErrorResponse,
        "description": "ModelNotFound or InvalidInput, naming the field.",
    },
}
_COMPUTE_ERRORS: Responses = _ERRORS | {
    413: {"model": ErrorResponse, "description": "TooLarge: over a size or work limit."},
    503: {"model": ErrorResponse, "description": "Overloaded: the queue is full."},
    504: {"model": ErrorResponse, "description": "Timeout: not computed within the deadline."},
}


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline_schema(model.model_json_schema())}},
        }
    }


@router.get(
    "/Info",
    operation_id="umbridge_info",
    response_model=InfoResponse,
    summary="UM-Bridge: protocol version and models",
)
async def info(registry: RegistryDep) -> InfoResponse:
    return InfoResponse(models=umbridge.model_names(registry))


@router.post(
    "/ModelInfo",
    operation_id="umbridge_model_info",
    response_model=ModelInfoResponse,
    responses=_ERRORS,
    openapi_extra=_body(NameRequest),
    summary="UM-Bridge: what a model supports",
)
async def model_info(request: Request, registry: RegistryDep) -> ModelInfoResponse:
    body = await _read(request, NameRequest)
    registry.get(body.name)
    return ModelInfoResponse(support=umbridge.SUPPORT)


@router.post(
    "/InputSizes",
    operation_id="umbridge_input_sizes",
    response_model=InputSizesResponse,
    responses=_ERRORS,
    openapi_extra=_body(SizesRequest),
    summary="UM-Bridge: the input vector's size, prod(input_shape)",
)
async def input_sizes(request: Request, registry: RegistryDep) -> InputSizesResponse:
    model = _resolve(request, registry, await _read(request, SizesRequest))
    return InputSizesResponse(inputSizes=model.input_sizes)


@router.post(
    "/OutputSizes",
    operation_id="umbridge_output_sizes",
    response_model=OutputSizesResponse,
    responses=_ERRORS,
    openapi_extra=_body(SizesRequest),
    summary="UM-Bridge: the output vector's size under the config",
)
async def output_sizes(request: Request, registry: RegistryDep) -> OutputSizesResponse:
    model = _resolve(request, registry, await _read(request, SizesRequest))
    return OutputSizesResponse(outputSizes=model.output_sizes)


# The four calls: (path, body, response, the computation, summary).
_CALLS: tuple[tuple[str, type[ModelCall], type[BaseModel], Call, str], ...] = (
    (
        "/Evaluate",
        EvaluateRequest,
        EvaluateResponse,
        umbridge.evaluate,
        "F(input), the forward pass",
    ),
    (
        "/Gradient",
        GradientRequest,
        VectorResponse,
        umbridge.gradient,
        "sens^T J (a vector-Jacobian product, as /vjp)",
    ),
    (
        "/ApplyJacobian",
        ApplyJacobianRequest,
        VectorResponse,
        umbridge.apply_jacobian,
        "J vec (a Jacobian-vector product, as /jvp)",
    ),
    (
        "/ApplyHessian",
        ApplyHessianRequest,
        VectorResponse,
        umbridge.apply_hessian,
        "the Hessian of sens^T F times vec (one product, as /hvp)",
    ),
)


def _call_route(
    body_model: type[ModelCall], response_model: type[BaseModel], compute: Call
) -> Callable[..., Coroutine[Any, Any, BaseModel]]:
    async def endpoint(request: Request, registry: RegistryDep, service: ServiceDep) -> BaseModel:
        body = await _read(request, body_model)
        model = _resolve(request, registry, body)
        output = await compute(service, model, body, request.is_disconnected)
        return response_model(output=output)

    return endpoint


for _path, _body_model, _response, _compute, _summary in _CALLS:
    router.post(
        _path,
        operation_id=f"umbridge_{_compute.__name__}",
        name=f"umbridge_{_compute.__name__}",
        response_model=_response,
        responses=_COMPUTE_ERRORS,
        openapi_extra=_body(_body_model),
        summary=f"UM-Bridge: {_summary}",
    )(_call_route(_body_model, _response, _compute))
