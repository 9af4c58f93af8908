"""The matrix-free operators from the client: request bodies and typed results.

``/hvp``, ``/jvp`` and ``/vjp`` multiply vectors (``ProductResult``); ``/hessian/diagonal``
and ``/hessian/trace`` answer exactly or with a standard error (``Estimate``);
``/hessian/eigen`` gives eigenpairs with residuals (``Eigenpairs``). This module only
builds the bodies and reads the answers (numpy only, like the rest of the client), so
that ``Client`` and ``AsyncClient`` share one implementation and differ only in how they
send. Every array is numpy: the results are several arrays and metadata, not one matrix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import numpy as np

from hessian_client._arrays import Encoding, as_array
from hessian_client._wire import HessianServiceError, decode_response, tensor_object

ProductKind = Literal["hvp", "jvp", "vjp"]
EstimateKind = Literal["diagonal", "trace"]
Which = Literal["largest", "smallest", "magnitude"]
# The route of each operator (the response names its values after the operator).
ROUTES: dict[str, str] = {
    "hvp": "/hvp",
    "jvp": "/jvp",
    "vjp": "/vjp",
    "diagonal": "/hessian/diagonal",
    "trace": "/hessian/trace",
    "eigen": "/hessian/eigen",
}


@dataclass(frozen=True)
class OperatorResult:
    """What every operator answer carries: the model's output, the cost in products,
    whether the values are exact, the algorithm that ran, and the whole metadata."""

    output: np.ndarray
    products: int
    exact: bool
    method: str
    metadata: dict[str, Any]
    model: str
    model_version: str


@dataclass(frozen=True)
class ProductResult(OperatorResult):
    """``/hvp``, ``/jvp`` or ``/vjp``: ``values`` ``[m, ...]`` per sample (``[B, m, ...]``)."""

    values: np.ndarray


@dataclass(frozen=True)
class Estimate(OperatorResult):
    """``/hessian/diagonal`` (``values`` in the input's shape) or ``/hessian/trace`` (a
    0-d array per sample, ``[B]`` for a batch); ``standard_error`` (same shape) when the
    values are a stochastic estimate (``exact`` False), else None."""

    values: np.ndarray
    standard_error: np.ndarray | None


@dataclass(frozen=True)
class Eigenpairs(OperatorResult):
    """``/hessian/eigen``: ``eigenvalues`` ``[k]``, unit ``eigenvectors`` ``[k, *input]``
    and measured ``residuals`` ``||H v - lambda v||`` ``[k]`` per sample (a leading
    ``B`` for a batch); ``converged`` says whether every residual reached ``tol``."""

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    residuals: np.ndarray
    converged: bool


def operator_body(
    model: str,
    x: Any,
    output_index: int | list[int] | None,
    objective: dict[str, Any] | None,
    precision: str,
    encoding: Encoding,
) -> dict[str, Any]:
    """What every operator's body holds: the model, ``x`` as a base64 tensor object, the
    precision and encoding, and the selected output (``output_index`` or ``objective``)
    when one is given. The ``*_call`` builders add each operator's own fields."""
    body: dict[str, Any] = {
        "model": model,
        "inputs": [tensor_object(as_array(x))],
        "precision": precision,
        "encoding": encoding,
    }
    if output_index is not None:
        body["output_index"] = output_index
    if objective is not None:
        body["objective"] = objective
    return body


R = TypeVar("R", bound=OperatorResult)


@dataclass(frozen=True)
class Call(Generic[R]):
    """One operator request, ready to send: the operator (its route), the body, and the
    type of its answer. ``Client`` and ``AsyncClient`` only send it (``_operate``) and
    hand the response to ``read``, so that the twins differ only in how they wait."""

    operator: str
    body: dict[str, Any]
    result: type[R]

    @property
    def route(self) -> str:
        return ROUTES[self.operator]

    def read(self, content: bytes, headers: Mapping[str, str]) -> R:
        """The typed result of this call's response."""
        result = read(self.operator, content, headers)
        assert isinstance(result, self.result)
        return result


def products_call(operator: ProductKind, body: dict[str, Any], vectors: Any) -> Call[ProductResult]:
    """``/hvp``, ``/jvp`` or ``/vjp`` (``body`` from ``operator_body``): ``vectors`` as a
    base64 tensor object (FP64 when it is float64, else FP32), ``[m, ...]`` or
    ``[B, m, ...]``."""
    body = {**body, "vectors": tensor_object(as_array(vectors), "vectors")}
    return Call(operator, body, ProductResult)


def estimate_call(
    operator: EstimateKind,
    body: dict[str, Any],
    exact: bool | None,
    max_products: int | None,
    seed: int,
) -> Call[Estimate]:
    """``/hessian/diagonal`` or ``/hessian/trace`` (``body`` from ``operator_body``;
    ``exact``/``max_products`` left to the server when None)."""
    body = {**body, "seed": seed}
    if exact is not None:
        body["exact"] = exact
    if max_products is not None:
        body["max_products"] = max_products
    return Call(operator, body, Estimate)


def eigen_call(
    body: dict[str, Any],
    k: int,
    which: Which,
    tol: float,
    max_products: int | None,
    seed: int,
) -> Call[Eigenpairs]:
    """``/hessian/eigen`` (``body`` from ``operator_body``); ``tol`` is sent as a float
    (the server takes no integer there)."""
    body = {**body, "k": k, "which": which, "tol": float(tol), "seed": seed}
    if max_products is not None:
        body["max_products"] = max_products
    return Call("eigen", body, Eigenpairs)


def _array(arrays: Mapping[str, np.ndarray], name: str, route: str) -> np.ndarray:
    if name not in arrays:
        raise HessianServiceError(f"{route}: the response has no {name!r} output ({list(arrays)})")
    return arrays[name]


def read(operator: str, content: bytes, headers: Mapping[str, str]) -> OperatorResult:
    """The typed result of one operator's response (json, base64 or binary framing)."""
    route = ROUTES[operator]
    decoded = decode_response(content, headers)
    body, arrays = decoded.body, decoded.arrays
    metadata: dict[str, Any] = body.get("metadata") or {}
    common: dict[str, Any] = {
        "output": _array(arrays, "output", route),
        "products": int(metadata.get("products", 0)),
        "exact": bool(metadata.get("exact", False)),
        "method": str(metadata.get("method", "")),
        "metadata": metadata,
        "model": str(body.get("model", "")),
        "model_version": str(body.get("model_version", "")),
    }
    if operator in ("hvp", "jvp", "vjp"):
        return ProductResult(**common, values=_array(arrays, operator, route))
    if operator in ("diagonal", "trace"):
        return Estimate(
            **common,
            values=_array(arrays, operator, route),
            standard_error=arrays.get("standard_error"),
        )
    return Eigenpairs(
        **common,
        eigenvalues=_array(arrays, "eigenvalues", route),
        eigenvectors=_array(arrays, "eigenvectors", route),
        residuals=_array(arrays, "residuals", route),
        converged=bool(metadata.get("converged")),
    )
