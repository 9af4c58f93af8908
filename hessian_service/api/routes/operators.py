"""The matrix-free operators: ``/hvp``, ``/jvp``, ``/vjp``, ``/hessian/diagonal``,
``/hessian/trace`` and ``/hessian/eigen``; validate the body, hand it to the service.

Bodies are read as ``/hessian``'s are (``api.body``: JSON numbers counted as they arrive,
parsed off the loop when large); one router per request body, since that reader is a
route class. The service checks, plans, queues and computes them on the same worker
and queue as ``/hessian`` (``serving.service``), so the 413, 503 and 504 limits hold.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request, Response

from hessian_service.api.body import counted_json_route
from hessian_service.api.deps import ServiceDep
from hessian_service.api.examples import (
    diagonal_examples,
    eigen_examples,
    hvp_examples,
    jvp_examples,
    trace_examples,
    vjp_examples,
)
from hessian_service.api.responses import problems
from hessian_service.config import Settings
from hessian_service.engine import DerivativeKind
from hessian_service.wire.binary import BINARY_CONTENT_TYPE, HEADER_LENGTH
from hessian_service.wire.operator_schemas import (
    EigenRequest,
    EstimateRequest,
    OperatorRequest,
    OperatorResponse,
    ProductRequest,
)


def _binary_alternative(settings: Settings) -> str:
    return (
        "Send the numbers as base64 instead: inputs[0].data and vectors.data as strings of "
        "the tensors' little-endian bytes (4 a number in FP32), which may fill the whole "
        f"{settings.max_body_bytes}-byte body limit (HESSIAN_MAX_BODY_BYTES)."
    )


products_router = APIRouter(
    tags=["operators"], route_class=counted_json_route(ProductRequest, _binary_alternative)
)
estimates_router = APIRouter(
    tags=["operators"], route_class=counted_json_route(EstimateRequest, _binary_alternative)
)
eigen_router = APIRouter(
    tags=["operators"], route_class=counted_json_route(EigenRequest, _binary_alternative)
)
routers = (products_router, estimates_router, eigen_router)

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": 'The values. With `encoding: "binary"` the body is '
        "application/octet-stream: the JSON response (`Inference-Header-Content-Length` "
        "bytes, outputs carrying `parameters.binary_data_size`), then each output's raw "
        "little-endian bytes.",
        "content": {BINARY_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}},
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
        507,
        s400="The body could not be read as UTF-8 JSON.",
        s404="Unknown model or version; `field` is `model`.",
        s413="Body, result, products, work or working memory over the configured limit: "
        "the estimate, the setting, and what would fit.",
        s422="Invalid input: `field` names the field at fault (`vectors.shape`, `k`, "
        "`max_products`, ...) and what was expected.",
        s503="Queue full (retry after `Retry-After` seconds), or models still loading.",
    ),
}


async def _run(
    service: ServiceDep, kind: DerivativeKind, request: OperatorRequest, http: Request
) -> Response:
    encoded = await service.run(
        kind, request, disconnected=http.is_disconnected, body_bytes=len(await http.body())
    )
    return Response(encoded.body, media_type=encoded.media_type, headers=encoded.headers)


@products_router.post(
    "/hvp",
    response_model=OperatorResponse,
    responses=_RESPONSES,
    operation_id="hvp",
    summary="Hessian-vector products H v, without forming H",
)
async def post_hvp(
    service: ServiceDep,
    request: Annotated[ProductRequest, Body(openapi_examples=hvp_examples())],
    http: Request,
) -> Response:
    """`H v` of one scalar (an int `output_index`, an objective, or a one-output model)
    for each of m vectors: output `hvp`, `[m, *input_shape]` per sample (`[B, m, ...]`
    for a batch). Exact (forward-over-reverse); costs m products per sample, each about
    three forward passes, whatever the input size.
    """
    return await _run(service, DerivativeKind.HVP, request, http)


@products_router.post(
    "/jvp",
    response_model=OperatorResponse,
    responses=_RESPONSES,
    operation_id="jvp",
    summary="Jacobian-vector products J v (forward mode)",
)
async def post_jvp(
    service: ServiceDep,
    request: Annotated[ProductRequest, Body(openapi_examples=jvp_examples())],
    http: Request,
) -> Response:
    """`J v` of the selected outputs (all of them without `output_index`) along each of
    m input-shaped vectors: output `jvp`, `[m, *output_shape]` per sample (`[m, k]` for
    k indices, `[m]` for one). Exact; m products per sample.
    """
    return await _run(service, DerivativeKind.JVP, request, http)


@products_router.post(
    "/vjp",
    response_model=OperatorResponse,
    responses=_RESPONSES,
    operation_id="vjp",
    summary="Vector-Jacobian products u^T J (reverse mode)",
)
async def post_vjp(
    service: ServiceDep,
    request: Annotated[ProductRequest, Body(openapi_examples=vjp_examples())],
    http: Request,
) -> Response:
    """`u^T J` for each of m covectors `u` over the selected outputs (`[m,
    *output_shape]` for all of them, `[m, k]` for k indices, `[m]` for one): output
    `vjp`, `[m, *input_shape]` per sample. Exact; m products per sample.
    """
    return await _run(service, DerivativeKind.VJP, request, http)


@estimates_router.post(
    "/hessian/diagonal",
    response_model=OperatorResponse,
    responses=_RESPONSES,
    operation_id="hessian_diagonal",
    summary="The diagonal of the input Hessian: exact, or estimated with standard errors",
)
async def post_hessian_diagonal(
    service: ServiceDep,
    request: Annotated[EstimateRequest, Body(openapi_examples=diagonal_examples())],
    http: Request,
) -> Response:
    """The diagonal of one scalar's Hessian: output `diagonal`, `input_shape` per sample.

    Exact (`metadata.exact: true`) where the planner says it fits: dense chunks, or one
    Hessian-vector product per input (n products per sample). Otherwise, or with
    `exact: false`, a stochastic estimate (Hutchinson) from `max_products` products
    (64 per sample by default), with a `standard_error` output of the same shape.
    `exact: true` never estimates: it is computed or refused (413).
    """
    return await _run(service, DerivativeKind.HESSIAN_DIAGONAL, request, http)


@estimates_router.post(
    "/hessian/trace",
    response_model=OperatorResponse,
    responses=_RESPONSES,
    operation_id="hessian_trace",
    summary="The trace of the input Hessian (the Laplacian): exact, or estimated",
)
async def post_hessian_trace(
    service: ServiceDep,
    request: Annotated[EstimateRequest, Body(openapi_examples=trace_examples())],
    http: Request,
) -> Response:
    """The trace of one scalar's Hessian, the Laplacian of physics-informed losses:
    output `trace`, one number per sample.

    Exact when it fits (n products per sample, or the dense path); otherwise, or with
    `exact: false`, Hutch++ from `max_products` products (64 per sample by default) with
    its `standard_error`.
    """
    return await _run(service, DerivativeKind.HESSIAN_TRACE, request, http)


@eigen_router.post(
    "/hessian/eigen",
    response_model=OperatorResponse,
    responses=_RESPONSES,
    operation_id="hessian_eigen",
    summary="k eigenpairs of the input Hessian by Lanczos on Hessian-vector products",
)
async def post_hessian_eigen(
    service: ServiceDep,
    request: Annotated[EigenRequest, Body(openapi_examples=eigen_examples())],
    http: Request,
) -> Response:
    """The k largest, smallest or largest-magnitude eigenpairs of one scalar's Hessian:
    outputs `eigenvalues` `[k]`, `eigenvectors` `[k, *input_shape]` (unit norm) and
    `residuals` `[k]` (`||H v - lambda v||`, measured) per sample.

    Iterative: `metadata.converged` says whether every residual reached `tol`; it costs
    one product per Lanczos step (at most min(n, 300) steps) plus k, bounded by
    `max_products`.
    """
    return await _run(service, DerivativeKind.HESSIAN_EIGEN, request, http)
