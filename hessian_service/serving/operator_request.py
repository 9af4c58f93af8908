"""Every check a matrix-free operator request gets before any work, against its model.

``prepare_operator`` is ``serving.request.prepare`` for ``/hvp``, ``/jvp``, ``/vjp`` and
``/hessian/diagonal|trace|eigen``: the model, input and scalar are checked as there (one
function each, shared), then what the operator adds -- the vectors' shape against the
model's input or output (422 naming ``vectors`` and the shape expected), the counts the
server bounds (vectors, products, eigenpairs, the tolerance; 422 naming the field and its
setting) -- and then what it would cost, from the sizes alone (``engine.operators``'s
``plan_operator``): result bytes, products, work and working memory, each against its
limit (413 naming the estimate, the setting and what would fit). Only then is any tensor
decoded.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from hessian_service.engine import DerivativeKind, Objective
from hessian_service.engine.operators import OperatorPlan, plan_operator
from hessian_service.errors import InvalidInput, TooLarge
from hessian_service.repository.registry import LoadedModel
from hessian_service.serving.operations import Operands, OperatorOperation
from hessian_service.serving.request import (
    PRECISIONS,
    PreparedRequest,
    RequestLimits,
    _check_output_index,
    _input_batch,
    engine_objective,
    model_activations,
)
from hessian_service.units import format_bytes
from hessian_service.wire import codec, precision
from hessian_service.wire.operator_schemas import (
    EigenRequest,
    EstimateRequest,
    OperatorRequest,
    ProductRequest,
)
from hessian_service.wire.schemas import TensorObject


@dataclass(frozen=True)
class OperatorLimits:
    """The server's bounds on what the operators add (from ``Settings``)."""

    max_vectors: int  # HESSIAN_MAX_OPERATOR_VECTORS: m of /hvp, /jvp, /vjp
    max_products: int  # HESSIAN_MAX_OPERATOR_PRODUCTS: products of one request
    max_eigen_k: int  # HESSIAN_MAX_EIGEN_K
    min_eigen_tol: float  # HESSIAN_MIN_EIGEN_TOL
    memory_budget_bytes: int  # HESSIAN_MEMORY_BUDGET_BYTES: the plan's working memory


@dataclass(frozen=True)
class PreparedOperator:
    """An operator request decoded and checked against its model: ready to compute."""

    operation: OperatorOperation
    request: OperatorRequest
    model: LoadedModel
    x: torch.Tensor  # [B, *sample_shape] in the compute dtype, on the model's device
    batched: bool
    objective: Objective | None
    output_index: int | list[int] | None
    operands: Operands
    plan: OperatorPlan
    rows: None = None  # as PreparedRequest's: no block of rows (a dense /hessian's only)

    @property
    def kind(self) -> DerivativeKind:
        return self.operation.kind

    @property
    def result_bytes(self) -> int:
        """The result's estimated size (the plan's), as PreparedRequest has it."""
        return self.plan.result_bytes

    @property
    def all_outputs(self) -> bool:
        return (
            self.operation.all_outputs_by_default
            and self.output_index is None
            and self.objective is None
        )


# What the service queues: a dense derivative or an operator.
Prepared = PreparedRequest | PreparedOperator


def prepare_operator(
    operation: OperatorOperation,
    request: OperatorRequest,
    model: LoadedModel,
    limits: RequestLimits,
    operator_limits: OperatorLimits,
) -> PreparedOperator:
    """Decode and check ``request`` for ``model``; raise a ``ServiceError`` before any work."""
    manifest = model.manifest
    outputs = math.prod(manifest.output_shape)
    _check_selection(operation, request, outputs, limits.max_output_indices)
    batch, batched = _input_batch(request.inputs[0], manifest.input_shape, limits.max_samples)
    n = math.prod(manifest.input_shape)
    m, per_sample = _vector_count(operation, request, manifest, batch, operator_limits)
    _check_counts(request, n, operator_limits)
    activations = model_activations(model)
    max_work = limits.max_work if activations is not None else None
    planned = functools.partial(
        plan_operator,
        operation.plan_kind,
        n=n,
        batch=batch,
        activation_numel=activations if activations is not None else n,
        itemsize=precision.itemsize(request.precision),
        memory_budget_bytes=operator_limits.memory_budget_bytes,
        vectors=m,
        outputs=_selected_outputs(request, outputs),
        k=request.k if isinstance(request, EigenRequest) else 5,
        exact=request.exact if isinstance(request, EstimateRequest) else None,
        max_work=max_work,
    )
    max_products = _max_products(request)
    plan = planned(max_products=max_products)
    if not plan.fits and max_products is not None and planned().fits:
        # Not too large: too small a budget for any answer (the plan without it fits).
        raise InvalidInput(
            f"max_products: {max_products} is too few for this {operation.route} request: "
            f"{plan.reason}",
            field="max_products",
        )
    _check_plan(operation, request, plan, batch, m, activations, limits, operator_limits)
    dtype = PRECISIONS[request.precision]
    objective = engine_objective(request, outputs, batch)
    x = codec.decode_tensor(request.inputs[0], "inputs[0]")
    x = (x if batched else x.unsqueeze(0)).to(device=model.device, dtype=dtype)
    vectors = None
    if isinstance(request, ProductRequest):
        vectors = codec.decode_tensor(request.vectors, "vectors").to(model.device, dtype)
        vectors = vectors.unsqueeze(0).expand(batch, *vectors.shape) if per_sample else vectors
    return PreparedOperator(
        operation=operation,
        request=request,
        model=model,
        x=x,
        batched=batched,
        objective=objective,
        output_index=request.output_index,
        operands=_operands(request, vectors, max_work),
        plan=plan,
    )


def _check_selection(
    operation: OperatorOperation, request: OperatorRequest, outputs: int, max_indices: int
) -> None:
    """The output selection as ``/hessian`` checks it; a Hessian operator takes one
    scalar: an int index, an objective, or a model's only output."""
    _check_output_index(request.output_index, outputs, max_indices)
    if request.output_index is not None and request.objective is not None:
        raise InvalidInput(
            "output_index: give output_index or objective, not both", field="output_index"
        )
    if operation.all_outputs_by_default:
        return
    route = operation.route
    if isinstance(request.output_index, list):
        raise InvalidInput(
            f"output_index: {route} takes one scalar's Hessian: one int output_index (or an "
            f"objective), not a list of {len(request.output_index)}",
            field="output_index",
        )
    if request.output_index is None and request.objective is None and outputs != 1:
        raise InvalidInput(
            f"output_index: required for {route} on {request.model!r}, which has {outputs} "
            "outputs (or give an objective)",
            field="output_index",
        )


def _selected_outputs(request: OperatorRequest, outputs: int) -> int:
    """Selected outputs per sample: every one, a list's length, or one scalar."""
    if request.objective is not None or isinstance(request.output_index, int):
        return 1
    return outputs if request.output_index is None else len(request.output_index)


def _vector_shape(
    operation: OperatorOperation,
    request: OperatorRequest,
    input_shape: list[int],
    output_shape: list[int],
) -> tuple[list[int], str]:
    """One vector's shape, and what it is called: the input's for /hvp and /jvp; for
    /vjp the selected outputs' (the output's shape, [k] for k indices, [] for one)."""
    if operation.kind is not DerivativeKind.VJP:
        return input_shape, "input_shape"
    if request.objective is not None or isinstance(request.output_index, int):
        return [], "one selected scalar"
    if request.output_index is None:
        return output_shape, "output_shape"
    return [len(request.output_index)], "the selected outputs"


def _vector_count(
    operation: OperatorOperation,
    request: OperatorRequest,
    manifest: Any,
    batch: int,
    limits: OperatorLimits,
) -> tuple[int, bool]:
    """``(m, shared)``: vectors per sample, and whether the same ``[m, ...]`` vectors
    apply to every sample; from the declared shape alone. 1 and False when the operator
    takes no vectors."""
    if not isinstance(request, ProductRequest):
        return 1, False
    vector, what = _vector_shape(
        operation, request, list(manifest.input_shape), list(manifest.output_shape)
    )
    shape = list(request.vectors.shape)
    dims = ", ".join(map(str, vector))
    expected = (
        f"[m{', ' + dims if dims else ''}] (m vectors of {what} {vector}) or "
        f"[{batch}, m{', ' + dims if dims else ''}] (m per sample)"
    )
    if len(shape) == len(vector) + 1 and shape[1:] == vector:
        m, shared = shape[0], True
    elif len(shape) == len(vector) + 2 and shape[2:] == vector and shape[0] == batch:
        m, shared = shape[1], False
    else:
        raise InvalidInput(
            f"vectors.shape: expected {expected} for {operation.route} on "
            f"{manifest.name!r}, got {shape}",
            field="vectors.shape",
        )
    _check_vector_datatype(request.vectors)
    if not 1 <= m <= limits.max_vectors:
        raise InvalidInput(
            f"vectors.shape: m (vectors per sample) must be between 1 and "
            f"{limits.max_vectors} (HESSIAN_MAX_OPERATOR_VECTORS), got {m}",
            field="vectors.shape",
            setting="HESSIAN_MAX_OPERATOR_VECTORS",
        )
    return m, shared


def _check_vector_datatype(vectors: TensorObject) -> None:
    if vectors.datatype not in codec.FLOAT_DATATYPES:
        raise InvalidInput(
            f"vectors.datatype: expected a floating-point datatype "
            f"({', '.join(codec.FLOAT_DATATYPES)}), "
            f"got {vectors.datatype}",
            field="vectors.datatype",
        )


def _max_products(request: OperatorRequest) -> int | None:
    return request.max_products if isinstance(request, EstimateRequest | EigenRequest) else None


def _check_counts(request: OperatorRequest, n: int, limits: OperatorLimits) -> None:
    """The request's own counts against the server's bounds and the model (422)."""
    max_products = _max_products(request)
    if max_products is not None and max_products > limits.max_products:
        raise InvalidInput(
            f"max_products: at most {limits.max_products} products per request on this "
            f"server (HESSIAN_MAX_OPERATOR_PRODUCTS), got {max_products}",
            field="max_products",
            setting="HESSIAN_MAX_OPERATOR_PRODUCTS",
        )
    if not isinstance(request, EigenRequest):
        return
    if request.k > min(limits.max_eigen_k, n):
        raise InvalidInput(
            f"k: at most {min(limits.max_eigen_k, n)} eigenpairs (this server's "
            f"HESSIAN_MAX_EIGEN_K={limits.max_eigen_k}; the model has {n} inputs), "
            f"got {request.k}",
            field="k",
            setting="HESSIAN_MAX_EIGEN_K",
        )
    if request.tol < limits.min_eigen_tol:
        raise InvalidInput(
            f"tol: at least {limits.min_eigen_tol:g} on this server (HESSIAN_MIN_EIGEN_TOL), "
            f"got {request.tol:g}",
            field="tol",
            setting="HESSIAN_MIN_EIGEN_TOL",
        )


def _blamed_field(request: OperatorRequest, batch: int, m: int) -> str:
    """The field a cost limit blames: the vectors when there are several, the budget or
    the exactness asked for, else the batch (or the one sample's input)."""
    if isinstance(request, ProductRequest) and m > 1:
        return "vectors.shape"
    if isinstance(request, EstimateRequest) and request.exact:
        return "exact"
    if isinstance(request, EigenRequest) and request.k > 1 and batch == 1:
        return "k"
    if _max_products(request) is not None:
        return "max_products"
    return "inputs[0].shape"


def _check_plan(
    operation: OperatorOperation,
    request: OperatorRequest,
    plan: OperatorPlan,
    batch: int,
    m: int,
    activations: int | None,
    limits: RequestLimits,
    operator_limits: OperatorLimits,
) -> None:
    """413 when the plan's result, products, work or working memory is over its limit."""
    field = _blamed_field(request, batch, m)
    route = operation.route
    if plan.result_bytes > limits.max_result_bytes:
        raise TooLarge(
            f"{field}: the {route} result would be {format_bytes(plan.result_bytes)}, over "
            f"this server's limit of {format_bytes(limits.max_result_bytes)} "
            "(max_result_bytes); send fewer samples or vectors per request"
            + (", or use float32" if request.precision == "float64" else ""),
            field=field,
            estimated_bytes=plan.result_bytes,
            limit_bytes=limits.max_result_bytes,
            setting="HESSIAN_MAX_RESULT_BYTES",
        )
    if plan.products > operator_limits.max_products:
        raise TooLarge(
            f"{field}: this {route} request is estimated at {plan.products} products "
            f"({plan.method or operation.plan_kind}), over this server's limit of "
            f"{operator_limits.max_products} (HESSIAN_MAX_OPERATOR_PRODUCTS); send fewer "
            "samples"
            + (" or vectors" if isinstance(request, ProductRequest) else "")
            + (", or give exact: false and a max_products" if field == "exact" else ""),
            field=field,
            estimated_products=plan.products,
            limit_products=operator_limits.max_products,
            setting="HESSIAN_MAX_OPERATOR_PRODUCTS",
        )
    if activations is not None and limits.max_work is not None:
        work = plan.products * activations
        if work > limits.max_work:
            raise TooLarge(
                f"{field}: this {route} request is estimated at {work:.3g} activation "
                f"elements of work ({plan.products} products x {activations} activation "
                f"elements per pass), over this server's limit of {limits.max_work:.3g} "
                "(max_work_per_request); send fewer samples"
                + (" or vectors" if isinstance(request, ProductRequest) else ""),
                field=field,
                estimated_work=work,
                limit_work=limits.max_work,
                setting="HESSIAN_MAX_WORK_PER_REQUEST",
            )
    if not plan.fits:
        raise TooLarge(
            f"{field}: this {route} request does not fit: {plan.reason}",
            field=field,
            estimated_bytes=plan.bytes or None,
            estimated_products=plan.products,
            limit_bytes=operator_limits.memory_budget_bytes,
            setting="HESSIAN_MEMORY_BUDGET_BYTES",
        )


def _operands(
    request: OperatorRequest, vectors: torch.Tensor | None, max_work: int | None
) -> Operands:
    if isinstance(request, EstimateRequest):
        return Operands(
            exact=request.exact,
            max_products=request.max_products,
            max_work=max_work,
            seed=request.seed,
        )
    if isinstance(request, EigenRequest):
        return Operands(
            max_products=request.max_products,
            seed=request.seed,
            k=request.k,
            which=request.which,
            tol=request.tol,
        )
    return Operands(vectors=vectors)
