"""``POST /jacobian`` and ``POST /hessian``: validate the body, hand it to the service.

The body is read by ``hessian_service.api.body``: its JSON numbers counted against their own limit
as it arrives, then parsed and validated in a worker thread, not on the event loop.

A body without ``encoding`` gets the png encoding when its ``Accept`` header prefers
``image/png`` to ``application/json``. A body that sets ``encoding`` is answered in it
whatever ``Accept`` says: it is the explicit choice, and Swagger UI sends the ``Accept``
of its response media-type menu (``application/json`` unless changed), which would
otherwise turn its png examples back into JSON.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request, Response

from hessian_service.api.body import counted_json_route
from hessian_service.api.deps import ServiceDep
from hessian_service.api.examples import hessian_examples, jacobian_examples
from hessian_service.api.responses import binary_result, computation_problems
from hessian_service.api.serve import serve
from hessian_service.config import Settings
from hessian_service.engine import DerivativeKind
from hessian_service.serving.service import DerivativeService
from hessian_service.wire import png
from hessian_service.wire.binary import JSON_CONTENT_TYPE
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

_PNG_HEADERS: dict[str, dict[str, Any]] = {
    png.VALUE_LIMIT_HEADER: {
        "description": 'encoding "png": the colour range is [-limit, limit] (the '
        "result's largest |value| unless `image_limit` is given); white is 0.",
        "schema": {"type": "number"},
    },
    png.MATRIX_SHAPE_HEADER: {
        "description": 'encoding "png": the grid drawn, `rows`x`cols` (e.g. 784x784; '
        "28x28 for one Jacobian row of a 28x28 image model).",
        "schema": {"type": "string", "pattern": "^[0-9]+x[0-9]+$"},
    },
    png.METHOD_HEADER: {
        "description": 'encoding "png": the algorithm that computed it (metadata.method).',
        "schema": {"type": "string"},
    },
    png.NON_FINITE_HEADER: {
        "description": 'encoding "png": entries that were NaN or Inf, drawn white.',
        "schema": {"type": "integer"},
    },
}


def _result() -> dict[str, Any]:
    response = binary_result(
        'The result. With `encoding: "binary"` the body is '
        "application/octet-stream: the JSON response (`Inference-Header-Content-Length` "
        "bytes, outputs carrying `parameters.binary_data_size`), then each output's raw "
        'little-endian bytes. With `encoding: "png"` (or no encoding and `Accept: '
        "image/png`) it is an image/png heatmap of the one sample's result (blue < 0 < "
        "red, white at 0; pixel column p of W shows column floor((2p + 1) * cols / (2W))), "
        "the numbers it cannot show in the headers below."
    )
    response["content"][png.MEDIA_TYPE] = {"schema": {"type": "string", "format": "binary"}}
    response["headers"].update(_PNG_HEADERS)
    return response


_ERRORS: dict[int | str, dict[str, Any]] = {
    200: _result(),
    **computation_problems(
        s413="Body or result over the configured limit (`limit_bytes`, `estimated_bytes`)."
    ),
}


def _quality(accept: str, media_type: str) -> float:
    """The q value ``accept`` gives ``media_type``: that of its most specific matching
    range (``type/subtype`` over ``type/*`` over ``*/*``), 0 when none matches."""
    kind = media_type.split("/")[0]
    best: tuple[int, float] = (-1, 0.0)
    for item in accept.split(","):
        name, *parameters = (part.strip() for part in item.split(";"))
        specificity = {media_type: 2, f"{kind}/*": 1, "*/*": 0}.get(name.lower(), -1)
        if specificity <= best[0]:
            continue
        q = 1.0
        for parameter in parameters:
            key, _, value = parameter.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    q = 0.0
        best = (specificity, q)
    return best[1]


def negotiated(request: DerivativeRequest, accept: str | None) -> DerivativeRequest:
    """``request`` with the png encoding when it sets no ``encoding`` and ``accept``
    ranks image/png above application/json; otherwise ``request`` as it is."""
    if "encoding" in request.model_fields_set or not accept:
        return request
    if _quality(accept, png.MEDIA_TYPE) > _quality(accept, JSON_CONTENT_TYPE):
        return request.model_copy(update={"encoding": "png"})
    return request


async def _run(
    service: DerivativeService, kind: DerivativeKind, request: DerivativeRequest, http: Request
) -> Response:
    """Both routes: the encoding negotiated, then served (``api.serve``); ``Vary:
    Accept``, since ``Accept`` may choose the encoding."""
    negotiated_request = negotiated(request, http.headers.get("accept"))
    return await serve(service, kind, negotiated_request, http, headers={"Vary": "Accept"})


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
    return await _run(service, DerivativeKind.HESSIAN, request, http)


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
    return await _run(service, DerivativeKind.JACOBIAN, request, http)
