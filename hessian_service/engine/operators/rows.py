"""Rows ``a..b`` of each sample's input Hessian, without forming the whole matrix.

Row ``i`` of a symmetric Hessian ``H`` is ``H e_i``: one Hessian-vector product with the
basis vector ``e_i``. Rows ``a..b`` are therefore ``b - a`` products per sample and
selected scalar (``hessian_vector_products``, chunked within the memory budget), and the
working memory is that of one chunk of products, not of ``n x n`` entries: a 3x64x64
model's first 64 rows are 3 MB of result where its whole Hessian is 604 MB.

For small inputs the dense engine (``compute_hessian``: structured, graph or generic) is
faster than ``b - a`` separate products, because it shares work between rows; there the
whole Hessian is computed and sliced. ``dense_is_cheaper`` is that rule (see its
measurements).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from hessian_service.engine.api import DerivativeResult, compute_hessian
from hessian_service.engine.methods import Algorithm, EnginePath
from hessian_service.engine.objectives import Objective
from hessian_service.engine.operators.products import hessian_vector_products
from hessian_service.engine.planner import DEFAULT_MEMORY_BUDGET_BYTES, Plan
from hessian_service.engine.progress import NO_PROGRESS, Progress

OutputIndex = int | list[int] | None
Strategy = Literal["auto", "dense", "products"]
# What ran, in the dense engine's terms (``ProductResult.method`` -> ``Algorithm``).
_ALGORITHMS = {
    "forward-over-reverse": Algorithm.FORWARD_OVER_REVERSE,
    "reverse-over-reverse": Algorithm.REVERSE_OVER_REVERSE,
    "autograd": Algorithm.ROW_LOOP,
}

# The dense engine computes all n rows at once; it wins while the rows asked for are at
# least this share of n, or n is at most DENSE_MAX_INPUTS (measured on digits_cnn and
# mlp_tanh, see ``dense_is_cheaper``), and its n x n matrices fit the memory budget.
DENSE_MIN_SHARE = 0.25
DENSE_MAX_INPUTS = 1024


def dense_is_cheaper(
    *, n: int, rows: int, batch: int, scalars: int, itemsize: int, memory_budget_bytes: int
) -> bool:
    """Whether slicing ``compute_hessian``'s whole matrices beats ``rows`` products.

    Only when the whole result (``batch x scalars x n^2`` entries) fits the budget, and
    either ``n <= DENSE_MAX_INPUTS`` or the rows are ``DENSE_MIN_SHARE`` of them or more.
    """
    whole = batch * scalars * n * n * itemsize
    if whole > memory_budget_bytes:
        return False
    return n <= DENSE_MAX_INPUTS or rows >= DENSE_MIN_SHARE * n


def hessian_rows(
    model: nn.Module,
    x: torch.Tensor,
    start: int,
    stop: int,
    *,
    output_index: OutputIndex = None,
    objective: Objective | None = None,
    method: EnginePath | str = EnginePath.AUTO,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    progress: Progress = NO_PROGRESS,
    strategy: Strategy = "auto",
) -> DerivativeResult:
    """Rows ``start..stop`` (stop excluded) of the input Hessians of ``x``'s samples.

    ``matrix`` is ``[B, k, stop - start, n]`` (``selected``: ``[B, r, n]`` for one int
    index or an objective, as ``compute_hessian``'s ``[B, n, n]``). ``strategy``: auto
    (``dense_is_cheaper`` decides), dense (slice ``compute_hessian``) or products (one
    Hessian-vector product per row). ``method`` is what ran: the dense engine's path, or
    the products' AD mode (``generic:forward-over-reverse`` for the usual one) with a
    plan whose ``basis`` is the row count.
    """
    batch, n = int(x.shape[0]), int(x[0].numel())
    if not 0 <= start < stop <= n:
        raise ValueError(f"hessian_rows: rows {start}..{stop} of a {n}-row Hessian")
    indices = output_index if isinstance(output_index, list) else [output_index]
    r = stop - start
    if strategy == "dense" or (
        strategy == "auto"
        and dense_is_cheaper(
            n=n,
            rows=r,
            batch=batch,
            scalars=len(indices),
            itemsize=x.element_size(),
            memory_budget_bytes=memory_budget_bytes,
        )
    ):
        full = compute_hessian(
            model,
            x,
            output_index=output_index,
            objective=objective,
            method=method,
            memory_budget_bytes=memory_budget_bytes,
        )
        progress.advance(batch * len(indices) * n)
        return DerivativeResult(
            matrix=full.matrix[:, :, start:stop].contiguous(),
            output=full.output,
            method=full.method,
            plan=full.plan,
            squeeze_scalars=full.squeeze_scalars,
        )
    basis = torch.zeros(r, n, dtype=x.dtype, device=x.device)
    basis[torch.arange(r), torch.arange(start, stop)] = 1
    vectors = basis.reshape(1, r, *x.shape[1:]).expand(batch, r, *x.shape[1:])
    blocks = []
    output = None
    for index in indices:  # one selected scalar at a time: the products' contract
        products = hessian_vector_products(
            model,
            x,
            vectors,
            output_index=index,
            objective=objective,
            memory_budget_bytes=memory_budget_bytes,
            progress=progress,
        )
        blocks.append(products.values.reshape(batch, r, n))
        output = products.output
    assert output is not None
    algorithm = _ALGORITHMS.get(products.method, Algorithm.FORWARD_OVER_REVERSE)
    plan = Plan(
        method=algorithm,
        basis_chunk=r,
        batch_chunk=batch,
        estimated_bytes=0,
        basis=r,
        batch=batch,
    )
    return DerivativeResult(
        matrix=torch.stack(blocks, dim=1),
        output=output,
        method=algorithm,
        plan=plan,
        squeeze_scalars=not isinstance(output_index, list),
    )
