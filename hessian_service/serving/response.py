"""The response body of a computed derivative: the matrix, the model output, the metadata.

Shapes follow the request's ``layout`` (``matrix``: ``[n, n]`` / ``[k, n]`` rows over the
``n`` flattened inputs; ``tensor``: ``input_shape + input_shape`` as
``torch.autograd.functional`` returns it), a single sample loses its batch axis, and the
notes say why a result a user might take for an error (zeros) is the exact answer. The
body keeps tensors as tensor objects whose data the codec writes (``wire.codec``); the
``png`` encoding has no body but a picture (``picture``, drawn by ``wire.png``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from hessian_service.engine import DerivativeResult
from hessian_service.repository.registry import LoadedModel
from hessian_service.serving import shaping
from hessian_service.serving.request import PreparedRequest
from hessian_service.wire import codec, png
from hessian_service.wire.binary import Encoded

if TYPE_CHECKING:  # types only: operator_request builds on request, as this module does
    from hessian_service.serving.operator_request import Prepared


def common_metadata(prepared: Prepared, method: object) -> dict[str, Any]:
    """The metadata every derivative response starts with (dense or matrix-free): what
    was selected, the sample shape and batch, what ran, where, in which precision."""
    request = prepared.request
    return {
        "output_index": request.output_index,
        "objective": prepared.objective.describe() if prepared.objective else "output",
        "sample_shape": list(prepared.model.manifest.input_shape),
        "batch_size": int(prepared.x.shape[0]) if prepared.batched else None,
        "method": method,
        "device": str(prepared.x.device),
        "precision": request.precision,
    }


def describe(
    prepared: PreparedRequest, result: DerivativeResult, compute_ms: float
) -> dict[str, Any]:
    """The response body of ``prepared``, computed as ``result`` in ``compute_ms``."""
    request, manifest, operation = prepared.request, prepared.model.manifest, prepared.operation
    matrix, shape_meta = shaping.lay_out(prepared, result.selected)  # layout, rows, packing
    output = result.output
    if not prepared.batched:
        matrix, output = matrix[0], output[0]
    zero = not bool(matrix.count_nonzero())
    notes = operation.notes(prepared.model.curvature, prepared.objective, zero)
    matrix, rounding_notes, precision_meta = shaping.round_to_wire(prepared, matrix)
    return {
        "model": manifest.name,
        "model_version": manifest.version,
        "outputs": [
            codec.tensor_object(str(operation.kind), matrix, request.encoding),
            codec.tensor_object("output", output, request.encoding),
        ],
        "metadata": {
            **common_metadata(prepared, result.method),
            "layout": request.layout,
            **shape_meta,
            **precision_meta,
            "compute_ms": round(compute_ms, 3),
            "zero": zero,
            "notes": notes + rounding_notes + random_notes(prepared.model),
        },
    }


def picture(prepared: PreparedRequest, result: DerivativeResult) -> Encoded:
    """The ``png`` encoding of ``prepared``'s result: the one sample's grid
    (``Operation.picture``) as a heatmap, with the method that computed it."""
    request = prepared.request
    grid = prepared.operation.picture(result.selected[0], prepared.model.manifest.input_shape)
    values = grid.detach().to("cpu", torch.float64).numpy()
    encoded = png.encode(values, limit=request.image_limit, size=request.image_size)
    headers = {**encoded.headers, png.METHOD_HEADER: str(result.method)}
    return Encoded(encoded.body, encoded.media_type, headers)


def random_notes(model: LoadedModel) -> list[str]:
    """A warning when the load-time probe found random operations in the model."""
    report = model.capabilities
    if report is None or not report.random_ops:
        return []
    evidence = "; ".join(report.random_evidence) or "its forward passes differ"
    return [
        f"The model holds random operations ({evidence}): this is the derivative of one "
        "random draw, and another request may differ."
    ]
