"""Which prepared requests can share one computation, how to merge them, how to split.

Two requests merge when everything that changes the computation other than the samples
is equal: the loaded model (by identity, so a reloaded version never mixes with the old
one), the kind (jacobian or hessian), the compute dtype and device, ``output_index``
(an int and a one-element list differ: they give different shapes) and the objective's
type and parameters, and the block of ``rows`` asked for.
Per-sample objective targets (mse targets, cross-entropy classes)
do not split batches: each request's targets are expanded to one row per sample and
concatenated in the same order as the samples. Layout and encoding are presentation
only and do not matter here.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import replace
from typing import NamedTuple

import torch

from hessian_service.engine import DerivativeKind, DerivativeResult, Objective
from hessian_service.serving.operator_request import Prepared
from hessian_service.serving.request import PreparedRequest


class BatchKey(NamedTuple):
    """Everything that must be equal for two requests to share one computation."""

    model: str
    version: str
    model_id: int  # the LoadedModel's identity
    kind: DerivativeKind
    dtype: str
    device: str
    selection: Hashable
    objective: Hashable


def batch_key(prepared: Prepared) -> BatchKey:
    """Requests with equal keys may be computed as one batch; an operation that does not
    merge (a matrix-free operator: its vectors and budgets are its own) gets a key of
    its own, the request's identity, which no other queued request shares."""
    index = prepared.output_index
    selection: Hashable = ("list", tuple(index)) if isinstance(index, list) else ("int", index)
    if not prepared.operation.merges:
        selection = ("alone", id(prepared))
    selection = (selection, prepared.rows)  # a block of rows is another computation
    objective = prepared.objective
    manifest = prepared.model.manifest
    return BatchKey(
        manifest.name,
        manifest.version,
        id(prepared.model),
        prepared.kind,
        str(prepared.x.dtype),
        str(prepared.x.device),
        selection,
        None if objective is None else (objective.kind, objective.index),
    )


def merge(batch: Sequence[PreparedRequest]) -> PreparedRequest:
    """One request whose samples are all of ``batch``'s, in order (same key required)."""
    first = batch[0]
    if len(batch) == 1:
        return first
    keys = {batch_key(prepared) for prepared in batch}
    if len(keys) != 1:
        raise ValueError(f"merge: requests with {len(keys)} different keys")
    x = torch.cat([prepared.x for prepared in batch])
    objective = first.objective
    if objective is not None and objective.target is not None:
        outputs = math.prod(first.model.manifest.output_shape)
        targets = []
        for prepared in batch:
            assert prepared.objective is not None
            targets.append(prepared.objective.per_sample_targets(prepared.x.shape[0], outputs))
        objective = Objective(objective.kind, index=objective.index, target=torch.cat(targets))
    return replace(first, x=x, objective=objective, batched=True)


def split(result: DerivativeResult, sizes: Sequence[int]) -> list[DerivativeResult]:
    """The merged result cut back into one result per request (views, no copies)."""
    if sum(sizes) != result.matrix.shape[0]:
        raise ValueError(f"split: {sum(sizes)} samples asked, {result.matrix.shape[0]} computed")
    parts = []
    start = 0
    for size in sizes:
        stop = start + size
        parts.append(
            replace(result, matrix=result.matrix[start:stop], output=result.output[start:stop])
        )
        start = stop
    return parts
