"""A computed derivative as the request asked to receive it: layout, rows, precision.

``serving.response.describe`` calls ``lay_out`` on the engine's ``selected`` result and
``round_to_wire`` on what it returns; each gives the metadata that says what was done,
so that a client can undo it (``hessian_client.unpack`` for the packed layout):

- ``layout: "tensor"``: per-scalar axes in the input's shape (``input_shape * 2``, or
  ``[r] + input_shape`` for a block of ``r`` rows);
- ``layout: "packed"``: the upper triangle row-major (``wire.packing``), or with ``rows``
  the segment of it those rows hold; ``metadata.packing`` names order, ``n``, offset;
- ``result_precision``: rounded once to float16 / bfloat16 (``wire.precision``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hessian_service.serving.request import PreparedRequest
from hessian_service.wire import packing, precision


def lay_out(prepared: PreparedRequest, matrix: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """``matrix`` (``DerivativeResult.selected``, batch axis kept) in the request's layout,
    and the metadata entries (``rows``, ``packing``) that describe it."""
    request, manifest, operation = prepared.request, prepared.model.manifest, prepared.operation
    sample_shape = list(manifest.input_shape)
    n = math.prod(sample_shape)
    meta: dict[str, Any] = {}
    start, stop = prepared.rows or (0, n)
    if prepared.rows is not None:
        meta["rows"] = {"start": start, "stop": stop, "n": n}
    if request.layout == "packed":
        matrix = packing.pack_rows(matrix, start)
        meta["packing"] = {
            "order": packing.PACKING_ORDER,
            "n": n,
            "offset": packing.row_offset(n, start),
            "length": packing.segment_length(n, start, stop),
            "complete": (start, stop) == (0, n),
        }
    elif request.layout == "tensor" and prepared.rows is not None:
        matrix = matrix.reshape(*matrix.shape[:-1], *sample_shape)  # [..., r, *input_shape]
    elif request.layout == "tensor":
        leading = operation.leading_shape(matrix.shape, manifest.output_shape, prepared.all_outputs)
        matrix = matrix.reshape(*leading, *(sample_shape * operation.axes_per_scalar))
    return matrix, meta


def round_to_wire(
    prepared: PreparedRequest, matrix: torch.Tensor
) -> tuple[torch.Tensor, list[str], dict[str, Any]]:
    """``matrix`` in the request's ``result_precision`` (unchanged without one), the notes
    on what rounding did, and the metadata entry naming it; ``InvalidInput`` on overflow."""
    name = prepared.request.result_precision
    rounded, notes = precision.round_for_wire(matrix, name)
    return rounded, notes, ({"result_precision": name} if name is not None else {})
