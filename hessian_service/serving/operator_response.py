"""The response body of a matrix-free operator: its values, the model output, the cost.

Every value keeps the input's (or output's) own shape, with the batch axis first for a
batched input and without it for one sample, as ``/hessian`` does: products ``[B, m,
*in]``, a diagonal ``[B, *in]``, a trace ``[B]``, eigenvectors ``[B, k, *in]``. The
metadata says what the answer cost in products, whether it is exact, and, for an
estimate or an eigen-solve, how far to trust it (the ``standard_error`` and ``residuals``
outputs, ``converged``).
"""

from __future__ import annotations

from typing import Any

from hessian_service.serving.operations import OperatorOutcome
from hessian_service.serving.operator_request import PreparedOperator
from hessian_service.serving.response import common_metadata, random_notes
from hessian_service.wire import codec


def describe_operator(
    prepared: PreparedOperator, outcome: OperatorOutcome, compute_ms: float
) -> dict[str, Any]:
    """The response body of ``prepared``, computed as ``outcome`` in ``compute_ms``."""
    request, manifest = prepared.request, prepared.model.manifest
    values = dict(outcome.values)
    output = outcome.output
    if not prepared.batched:
        values = {name: value[0] for name, value in values.items()}
        output = output[0]
    return {
        "model": manifest.name,
        "model_version": manifest.version,
        "outputs": [
            *(codec.tensor_object(name, value, request.encoding) for name, value in values.items()),
            codec.tensor_object("output", output, request.encoding),
        ],
        "metadata": {
            **common_metadata(prepared, outcome.method),
            "compute_ms": round(compute_ms, 3),
            "products": outcome.products,
            "exact": outcome.exact,
            "converged": outcome.converged,
            "notes": _notes(outcome) + random_notes(prepared.model),
        },
    }


def _notes(outcome: OperatorOutcome) -> list[str]:
    """What an estimate or an unconverged eigen-solve means for the numbers."""
    if outcome.converged is False:
        return [
            "The eigen-solve stopped before every residual was within tol (max_products or "
            "the memory budget ended it): the `residuals` output says how far each pair is "
            "from H v = lambda v; give more max_products or a larger tol."
        ]
    if not outcome.exact and "standard_error" in outcome.values:
        return [
            f"An estimate ({outcome.method}, {outcome.products} products): each value's "
            "standard error is in the `standard_error` output; the exact value lies within "
            "two of them in about 95% of draws. Send exact: true for the exact value."
        ]
    return []
