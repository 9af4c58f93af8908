"""Which operations would fit when a dense Hessian does not: the advice of its 413.

A dense input Hessian is ``n^2`` numbers per sample: 604 MB at 3x64x64. When a
``/hessian`` request is over the result or work limit, what the caller most likely wants
is one of the matrix-free operators, or the same matrix in blocks of rows. Each is
planned from the sizes alone (``engine.operators.plan_operator``: products, working
memory, result bytes) and kept when it fits every limit the request would meet there
(``max_result_bytes``, ``max_work_per_request``, ``max_operator_products``, the memory
budget). The 413 then names them with their estimates, in its text and as
``alternatives``, so that a program can pick one.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from hessian_service.engine.operators import OperatorPlan, plan_operator
from hessian_service.errors import TooLarge
from hessian_service.repository.registry import LoadedModel
from hessian_service.serving.request import model_activations
from hessian_service.units import format_bytes
from hessian_service.wire import precision
from hessian_service.wire.schemas import DerivativeRequest

# Eigenpairs the /hessian/eigen suggestion is planned for (its request default).
SUGGESTED_EIGENPAIRS = 5


@dataclass(frozen=True)
class Budget:
    """The limits a suggested operation must fit (from ``Settings``)."""

    max_result_bytes: int
    max_work: int | None
    max_products: int
    memory_budget_bytes: int


@dataclass(frozen=True)
class Alternative:
    """One operation that would fit, with what to send and what it would cost."""

    route: str  # "/hvp", "/hessian/diagonal", ... or "/hessian" with rows
    ask: str  # what the request needs for it
    result_bytes: int
    products: int  # over all samples
    method: str

    def describe(self) -> str:
        how = f", {self.method}" if self.method else ""
        products = f"{self.products} product{'s' if self.products != 1 else ''}"
        return f"{self.route} {self.ask} ({format_bytes(self.result_bytes)}, {products}{how})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "ask": self.ask,
            "estimated_bytes": self.result_bytes,
            "estimated_products": self.products,
            "method": self.method,
        }


def _fits(plan: OperatorPlan, activations: int, budget: Budget) -> bool:
    work_ok = budget.max_work is None or plan.products * activations <= budget.max_work
    return (
        plan.fits
        and plan.result_bytes <= budget.max_result_bytes
        and plan.products <= budget.max_products
        and work_ok
    )


def _largest_row_block(n: int, batch: int, itemsize: int, activations: int, budget: Budget) -> int:
    """The most rows per request (below n: the whole matrix did not fit) that the result,
    work and product limits allow."""
    rows = min(n - 1, budget.max_result_bytes // max(batch * n * itemsize, 1))
    rows = min(rows, budget.max_products // batch)
    if budget.max_work is not None:
        rows = min(rows, budget.max_work // max(batch * activations, 1))
    return max(rows, 0)


def dense_hessian_alternatives(
    *, n: int, batch: int, activations: int, itemsize: int, budget: Budget
) -> list[Alternative]:
    """The operations that fit for ``batch`` samples of ``n`` inputs whose dense Hessians
    do not: one Hessian-vector product each, the diagonal, the trace, the top eigenpairs,
    and the largest block of rows of ``/hessian``."""
    planned = functools.partial(
        plan_operator,
        n=n,
        batch=batch,
        activation_numel=activations,
        itemsize=itemsize,
        memory_budget_bytes=budget.memory_budget_bytes,
    )
    k = min(SUGGESTED_EIGENPAIRS, n)
    candidates: list[tuple[str, str, OperatorPlan]] = [
        ("/hvp", "with one vector a sample", planned("hvp", vectors=1)),
        ("/hessian/diagonal", "", planned("diagonal", max_work=budget.max_work)),
        ("/hessian/trace", "", planned("trace", max_work=budget.max_work)),
        ("/hessian/eigen", f"with k: {k}", planned("eigen", k=k)),
    ]
    rows = _largest_row_block(n, batch, itemsize, activations, budget)
    if rows >= 1:
        block = planned("rows", vectors=rows)
        ask = f'with rows {{"start": 0, "stop": {rows}}} and the next blocks'
        candidates.append(("/hessian", ask, block))
    return [
        Alternative(route, ask or _exactness(plan), plan.result_bytes, plan.products, plan.method)
        for route, ask, plan in candidates
        if _fits(plan, activations, budget)
    ]


def _exactness(plan: OperatorPlan) -> str:
    """A diagonal's or trace's plan: exact, or an estimate (the default exact: null)."""
    return "exact" if plan.method in ("dense", "hvp-basis") else "estimated"


def with_alternatives(error: TooLarge, alternatives: list[Alternative]) -> TooLarge:
    """``error`` with the operations that would fit named in its text and listed in its
    ``alternatives`` (or saying that none would)."""
    if alternatives:
        advice = "these would fit: " + "; ".join(a.describe() for a in alternatives)
    else:
        advice = "no matrix-free operation would fit either at this batch size"
    return TooLarge(
        f"{error.detail}; {advice}",
        field=error.field,
        **error.extra,
        alternatives=[a.as_dict() for a in alternatives],
    )


def advise(
    error: TooLarge, request: DerivativeRequest, model: LoadedModel, budget: Budget
) -> TooLarge:
    """The 413 ``error`` of a dense Hessian ``request`` with what would fit instead
    (its shape was checked before the limit was: one sample or a batch)."""
    manifest = model.manifest
    n = math.prod(manifest.input_shape)
    batch = max(1, math.prod(request.inputs[0].shape) // n)
    activations = model_activations(model)
    alternatives = dense_hessian_alternatives(
        n=n,
        batch=batch,
        activations=activations if activations is not None else n,
        itemsize=precision.itemsize(request.precision),
        budget=budget,
    )
    return with_alternatives(error, alternatives)
