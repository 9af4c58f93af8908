"""Which prepared requests can share one computation, how to merge them, how to split.

Two requests merge when everything that changes the computation other than the samples
is equal: the loaded model (by identity, so a reloaded version never mixes with the old
one), the kind (jacobian, hessian, or a product: hvp, jvp, vjp), the compute dtype and
device, ``output_index`` (an int and a one-element list differ: they give different
shapes) and the objective's type and parameters, the block of ``rows`` asked for, and for
a product the shape and dtype of one sample's vectors (``[m, ...]``: the same m).
Per-sample objective targets (mse targets, cross-entropy classes, weighted_sum weights)
and a product's per-sample vectors do not split batches: each request's are expanded to
one row per sample and concatenated in the same order as the samples, so that many
single-sample UM-Bridge calls run as one vectorized batch. Estimates and eigen-solves
never merge (their budgets and seeds are their own). Layout and encoding are
presentation only and do not matter here.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import replace
from typing import NamedTuple

import torch

from hessian_service.engine import DerivativeKind, DerivativeResult, Objective
from hessian_service.serving.operations import OperatorOutcome
from hessian_service.serving.operator_request import Prepared, PreparedOperator

# What one computation gave: a dense derivative, or an operator's values.
Computed = DerivativeResult | OperatorOutcome


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
    vectors = _vectors(prepared)
    vector_key = None if vectors is None else (tuple(vectors.shape[1:]), str(vectors.dtype))
    # a block of rows is another computation; so are products of another m
    selection = (selection, prepared.rows, vector_key)
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


def _vectors(prepared: Prepared) -> torch.Tensor | None:
    """A product's vectors ``[B, m, ...]``; None for every other operation."""
    return prepared.operands.vectors if isinstance(prepared, PreparedOperator) else None


def merge(batch: Sequence[Prepared]) -> Prepared:
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
    if isinstance(first, PreparedOperator):
        vectors = torch.cat([v for v in map(_vectors, batch) if v is not None])
        operands = replace(first.operands, vectors=vectors)
        return replace(first, x=x, objective=objective, operands=operands, batched=True)
    return replace(first, x=x, objective=objective, batched=True)


def split(result: Computed, sizes: Sequence[int]) -> list[Computed]:
    """The merged result cut back into one result per request (views, no copies); a
    product's cost split with its samples."""
    total = int(result.output.shape[0])
    if sum(sizes) != total:
        raise ValueError(f"split: {sum(sizes)} samples asked, {total} computed")
    parts: list[Computed] = []
    start = 0
    for size in sizes:
        stop = start + size
        if isinstance(result, OperatorOutcome):
            values = {name: value[start:stop] for name, value in result.values.items()}
            products = result.products * size // total
            part: Computed = replace(
                result, values=values, output=result.output[start:stop], products=products
            )
        else:
            part = replace(
                result, matrix=result.matrix[start:stop], output=result.output[start:stop]
            )
        parts.append(part)
        start = stop
    return parts
