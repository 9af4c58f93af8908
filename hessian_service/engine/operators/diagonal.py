"""The diagonal of each sample's input Hessian: exact where it fits, else estimated.

``STRATEGIES`` is the policy, tried in order: ``strategies.POLICY``, which diagonals and
traces share, as they share ``strategies.make_problem`` and ``strategies.run``;
``compile_after`` lets the forward-Laplacian pass compile a hot shape (``torch.compile``).
"""

from __future__ import annotations

import torch
from torch import nn

from hessian_service.engine.objectives import Objective
from hessian_service.engine.operators import strategies
from hessian_service.engine.operators.results import Estimate
from hessian_service.engine.planner import DEFAULT_MEMORY_BUDGET_BYTES
from hessian_service.engine.progress import NO_PROGRESS, Progress

STRATEGIES: tuple[strategies.Strategy, ...] = strategies.POLICY


def hessian_diagonal(
    model: nn.Module,
    x: torch.Tensor,
    *,
    output_index: int | None = None,
    objective: Objective | None = None,
    exact: bool | None = None,
    max_products: int | None = None,
    max_work: int | None = None,
    seed: int = 0,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    progress: Progress = NO_PROGRESS,
    compile_after: int = 0,
) -> Estimate:
    """``diag(H)`` of one selected scalar per sample: ``values [B, *in]``.

    ``exact=True``: dense or HVP-basis, else ``OperatorTooLarge`` (a ``ValueError``: 413).
    ``exact=False``: Hutchinson's estimate from ``max_products`` (default 64 per sample)
    with ``standard_error [B, *in]``. ``exact=None``: exact when it fits the budget,
    ``max_products`` and ``max_work`` (activation elements: ``engine.workload``'s
    measure; without ``max_products`` the basis is used up to
    ``plan.AUTO_EXACT_PRODUCTS`` products), else the estimate.
    """
    problem = strategies.make_problem(
        "hessian_diagonal",
        "diagonal",
        model,
        x,
        output_index,
        objective,
        exact,
        max_products,
        max_work,
        seed,
        memory_budget_bytes,
        progress,
        compile_after=compile_after,
    )
    return strategies.run(problem, STRATEGIES, "hessian_diagonal")
