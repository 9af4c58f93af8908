"""``POST /jacobian`` and ``POST /hessian``: validate the body, hand it to the service.

The body is read by ``hessian_service.api.body``: its JSON numbers counted against their own limit
as it arrives, then parsed and validated in a worker thread, not on the event loop.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request, Response

from hessian_service.api.body import counted_json_route
from hessian_service.api.deps import ServiceDep
from hessian_service.api.examples import hessian_examples, jacobian_examples
from hessian_service.api.responses import problems
from hessian_service.config import Settings
from hessian_service.engine import DerivativeKind
from hessian_service.wire.binary import BINARY_CONTENT_TYPE, HEADER_LENGTH, Encoded
from hessian_service.wire.schemas import DerivativeRequest, DerivativeResponse


def _binary_alternative(settings: Settings) -> str:
    return (
        "Send the numbers as base64 instead: inputs[0].data as a string of the tensor's "
        "little-endian bytes (4 a number in FP32), which may fill the whole "
        f"{settings.max_body_bytes}-byte body limit (HESSIAN_MAX_BODY_BYTES)."
    )


router = APIRouter(
    tags=["derivatives"], route_class=counted_json_route(DerivativeRequest, _binary_alternative)
)

_ERRORS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": 'The result. With `encoding: "binary"` the body is '
        "application/octet-stream: the JSON response (`Inference-Header-Content-Length` "
        "bytes, outputs carrying `parameters.binary_data_size`), then each output's raw "
        "little-endian bytes.",
        "content": {
            BINARY_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}},
        },
        "headers": {
            HEADER_LENGTH: {
                "description": 'Length of the JSON header (encoding "binary" only).',
                "schema": {"type": "integer"},
            }
        },
    },
    **problems(
        400,
        404,
        413,
        422,
        503,
        504,
        s400="The body could not be read as UTF-8 JSON.",
        s404="Unknown model or version; `field` is `model`.",
        s413="Body or result over the configured limit (`limit_bytes`, `estimated_bytes`).",
        s503="Queue full (retry after `Retry-After` seconds), or models still loading.",
    ),
}


def _response(encoded: Encoded) -> Response:
    return Response(encoded.body, media_type=encoded.media_type, headers=encoded.headers)


@router.post(
    "/hessian",
    response_model=DerivativeResponse,
    responses=_ERRORS,
    operation_id="hessian",
    summary="Input Hessian of an output (or an objective) of a model",
)
async def post_hessian(
    service: ServiceDep,
    request: Annotated[DerivativeRequest, Body(openapi_examples=hessian_examples())],
    http: Request,
) -> Response:
    """Exact Hessian of one scalar per sample with respect to the model's input.

    An int `output_index` gives `[n, n]` per sample, a list of k gives `[k, n, n]`, an
    objective gives `[n, n]`. A batch input `[B, *input_shape]` adds a leading `B`.
    """
    encoded = await service.run(
        DerivativeKind.HESSIAN,
        request,
        disconnected=http.is_disconnected,
        body_bytes=len(await http.body()),
    )
    return _response(encoded)


@router.post(
    "/jacobian",
    response_model=DerivativeResponse,
    responses=_ERRORS,
    operation_id="jacobian",
    summary="Input Jacobian of a model's outputs",
)
async def post_jacobian(
    service: ServiceDep,
    request: Annotated[DerivativeRequest, Body(openapi_examples=jacobian_examples())],
    http: Request,
) -> Response:
    """Exact Jacobian with respect to the model's input.

    No `output_index` gives all outputs, `[m, n]` per sample; an int gives the gradient
    `[n]`, a list of k gives `[k, n]`, an objective gives its gradient `[n]`.
    """
    encoded = await service.run(
        DerivativeKind.JACOBIAN,
        request,
        disconnected=http.is_disconnected,
        body_bytes=len(await http.body()),
    )
    return _response(encoded)
