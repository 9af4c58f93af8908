"""The trace of each sample's input Hessian (the Laplacian): exact where it fits, else
Hutch++.

``STRATEGIES`` is the policy, tried in order (``strategies.run``): the first that
accepts answers. A faster exact strategy (the graph engine's forward-Laplacian pass)
goes in front as one more entry.
"""

from __future__ import annotations

import torch
from torch import nn

from hessian_service.engine.objectives import Objective
from hessian_service.engine.operators import strategies
from hessian_service.engine.operators.results import Estimate
from hessian_service.engine.planner import DEFAULT_MEMORY_BUDGET_BYTES
from hessian_service.engine.progress import NO_PROGRESS, Progress

STRATEGIES: tuple[strategies.Strategy, ...] = (
    strategies.dense,  # exact: B n x n matrices in chunks of samples, when one fits
    strategies.hvp_basis,  # exact: n HVPs on basis vectors per sample
    strategies.stochastic,  # Hutch++ (Hutchinson below 4 products per sample)
)


def hessian_trace(
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
) -> Estimate:
    """``tr(H)`` of one selected scalar per sample: ``values [B]``.

    The same choices as ``hessian_diagonal`` (``exact``, ``max_products``,
    ``max_work``); the estimate is Hutch++ with ``standard_error [B]``.
    """
    return strategies.run(
        strategies.make_problem(
            "hessian_trace",
            "trace",
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
        ),
        STRATEGIES,
        "hessian_trace",
    )
