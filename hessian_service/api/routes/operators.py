"""The matrix-free operators: ``/hvp``, ``/jvp``, ``/vjp``, ``/hessian/diagonal``,
``/hessian/trace`` and ``/hessian/eigen``; validate the body, hand it to the service.

Bodies are read as ``/hessian``'s are (``api.body``: JSON numbers counted as they arrive,
parsed off the loop when large); one router per request body, since that reader is a
route class. The service checks, plans, queues and computes them on the same worker
and queue as ``/hessian`` (``serving.service``), so the 413, 503 and 504 limits hold.

The six routes differ only in their path, kind, request body and documentation, so they
are one table (``OPERATORS``) and one factory (``_add``); the documentation of each is
its entry's text, as the OpenAPI document shows it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
from hessian_service.api.responses import binary_result, computation_problems
from hessian_service.api.serve import serve
from hessian_service.config import Settings
from hessian_service.engine import DerivativeKind
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
    200: binary_result(
        'The values. With `encoding: "binary"` the body is '
        "application/octet-stream: the JSON response (`Inference-Header-Content-Length` "
        "bytes, outputs carrying `parameters.binary_data_size`), then each output's raw "
        "little-endian bytes."
    ),
    **computation_problems(
        s413="Body, result, products, work or working memory over the configured limit: "
        "the estimate, the setting, and what would fit.",
        s422="Invalid input: `field` names the field at fault (`vectors.shape`, `k`, "
        "`max_products`, ...) and what was expected.",
    ),
}


@dataclass(frozen=True)
class Operator:
    """One operator route: where it is, what it computes, and how it is documented
    (``doc`` is the route's docstring: its description in the OpenAPI document)."""

    router: APIRouter
    body: type[OperatorRequest]
    path: str
    kind: DerivativeKind
    operation_id: str
    summary: str
    examples: Callable[[], dict[str, Any]]
    doc: str


OPERATORS: tuple[Operator, ...] = (
    Operator(
        products_router,
        ProductRequest,
        "/hvp",
        DerivativeKind.HVP,
        "hvp",
        "Hessian-vector products H v, without forming H",
        hvp_examples,
        """`H v` of one scalar (an int `output_index`, an objective, or a one-output model)
        for each of m vectors: output `hvp`, `[m, *input_shape]` per sample (`[B, m, ...]`
        for a batch). Exact (forward-over-reverse); costs m products per sample, each about
        three forward passes, whatever the input size.
        """,
    ),
    Operator(
        products_router,
        ProductRequest,
        "/jvp",
        DerivativeKind.JVP,
        "jvp",
        "Jacobian-vector products J v (forward mode)",
        jvp_examples,
        """`J v` of the selected outputs (all of them without `output_index`) along each of
        m input-shaped vectors: output `jvp`, `[m, *output_shape]` per sample (`[m, k]` for
        k indices, `[m]` for one). Exact; m products per sample.
        """,
    ),
    Operator(
        products_router,
        ProductRequest,
        "/vjp",
        DerivativeKind.VJP,
        "vjp",
        "Vector-Jacobian products u^T J (reverse mode)",
        vjp_examples,
        """`u^T J` for each of m covectors `u` over the selected outputs (`[m,
        *output_shape]` for all of them, `[m, k]` for k indices, `[m]` for one): output
        `vjp`, `[m, *input_shape]` per sample. Exact; m products per sample.
        """,
    ),
    Operator(
        estimates_router,
        EstimateRequest,
        "/hessian/diagonal",
        DerivativeKind.HESSIAN_DIAGONAL,
        "hessian_diagonal",
        "The diagonal of the input Hessian: exact, or estimated with standard errors",
        diagonal_examples,
        """The diagonal of one scalar's Hessian: output `diagonal`, `input_shape` per sample.

        Exact (`metadata.exact: true`) where the planner says it fits: dense chunks, or one
        Hessian-vector product per input (n products per sample). Otherwise, or with
        `exact: false`, a stochastic estimate (Hutchinson) from `max_products` products
        (64 per sample by default), with a `standard_error` output of the same shape.
        `exact: true` never estimates: it is computed or refused (413).
        """,
    ),
    Operator(
        estimates_router,
        EstimateRequest,
        "/hessian/trace",
        DerivativeKind.HESSIAN_TRACE,
        "hessian_trace",
        "The trace of the input Hessian (the Laplacian): exact, or estimated",
        trace_examples,
        """The trace of one scalar's Hessian, the Laplacian of physics-informed losses:
        output `trace`, one number per sample.

        Exact when it fits (n products per sample, or the dense path); otherwise, or with
        `exact: false`, Hutch++ from `max_products` products (64 per sample by default) with
        its `standard_error`.
        """,
    ),
    Operator(
        eigen_router,
        EigenRequest,
        "/hessian/eigen",
        DerivativeKind.HESSIAN_EIGEN,
        "hessian_eigen",
        "k eigenpairs of the input Hessian by Lanczos on Hessian-vector products",
        eigen_examples,
        """The k largest, smallest or largest-magnitude eigenpairs of one scalar's Hessian:
        outputs `eigenvalues` `[k]`, `eigenvectors` `[k, *input_shape]` (unit norm) and
        `residuals` `[k]` (`||H v - lambda v||`, measured) per sample.

        Iterative: `metadata.converged` says whether every residual reached `tol`; it costs
        one product per Lanczos step (at most min(n, 300) steps) plus k, bounded by
        `max_products`.
        """,
    ),
)


def _add(operator: Operator) -> None:
    """Register ``operator``'s ``POST`` route: an endpoint named ``post_<operation_id>``
    whose body is ``operator.body`` with its examples, served by ``api.serve``."""

    async def endpoint(service: ServiceDep, request: Any, http: Request) -> Response:
        return await serve(service, operator.kind, request, http)

    # FastAPI reads the body's type and examples from the annotation of ``request``.
    endpoint.__annotations__["request"] = Annotated[
        operator.body, Body(openapi_examples=operator.examples())
    ]
    endpoint.__name__ = endpoint.__qualname__ = f"post_{operator.operation_id}"
    endpoint.__doc__ = operator.doc
    operator.router.post(
        operator.path,
        response_model=OperatorResponse,
        responses=_RESPONSES,
        operation_id=operator.operation_id,
        summary=operator.summary,
    )(endpoint)


for _operator in OPERATORS:
    _add(_operator)
