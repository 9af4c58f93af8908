"""Extreme eigenpairs of each sample's input Hessian, by Lanczos on HVPs.

Costs one product per Lanczos step per sample (``K`` steps, at most
``plan.krylov_steps``: ``n``, 300, ``max_products``, and what the Krylov bases leave of
the memory budget) plus ``k`` per sample to measure each returned pair's residual
``||H v - lambda v||``. At ``K = n`` the Krylov space is the whole space and the pairs
are exact to rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from hessian_service.engine.objectives import Objective
from hessian_service.engine.operators import plan as plans
from hessian_service.engine.operators.lanczos import WHICH, lanczos
from hessian_service.engine.operators.products import ProductOperator, model_output
from hessian_service.engine.operators.results import EigenResult, OperatorTooLarge
from hessian_service.engine.operators.selection import prepare
from hessian_service.engine.planner import DEFAULT_MEMORY_BUDGET_BYTES
from hessian_service.engine.progress import NO_PROGRESS, Progress

# Below this many eps of the model's dtype a residual is rounding, not convergence: a
# float32 model's tol is at least ~1.2e-5 (its products are that exact), float64's 2e-14.
TOL_FLOOR_EPS = 100


def hessian_eigen(
    model: nn.Module,
    x: torch.Tensor,
    *,
    k: int = 5,
    which: str = "largest",
    tol: float = 1e-6,
    output_index: int | None = None,
    objective: Objective | None = None,
    max_products: int | None = None,
    seed: int = 0,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    progress: Progress = NO_PROGRESS,
) -> EigenResult:
    """``k`` eigenpairs of one selected scalar's input Hessian per sample.

    ``which``: ``largest`` (algebraic, largest first), ``smallest`` (smallest first) or
    ``magnitude`` (largest ``|lambda|`` first). A pair has converged when its residual
    is within ``tol`` (raised to ``TOL_FLOOR_EPS`` eps of the dtype) times the sample's
    largest Ritz magnitude. ``max_products`` (for the whole batch, residual products
    included) ends the iteration early: the best pairs so far come back with
    ``converged=False``. ``OperatorTooLarge`` when not even ``k + 1`` steps fit.
    """
    name = "hessian_eigen"
    if which not in WHICH:
        raise ValueError(f"{name}: which must be one of {WHICH}, got {which!r}")
    if not isinstance(tol, float | int) or isinstance(tol, bool) or not 0 < tol < 1:
        raise ValueError(f"{name}: tol must be a number in (0, 1), got {tol!r}")
    setup = prepare(name, model, x, output_index=output_index, objective=objective, one_scalar=True)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= setup.n:
        raise ValueError(f"{name}: k must be an int in [1, n={setup.n}], got {k!r}")
    plan = plans.plan_operator(
        "eigen",
        n=setup.n,
        batch=setup.batch,
        activation_numel=setup.activation_numel,
        itemsize=setup.itemsize,
        memory_budget_bytes=memory_budget_bytes,
        k=k,
        max_products=max_products,
    )
    if not plan.fits:
        raise OperatorTooLarge(
            f"{name}: {plan.reason}",
            estimated_bytes=plan.bytes,
            estimated_products=plan.products,
        )
    progress.plan(plan.products)
    operator = ProductOperator(
        "hvp", model, x, setup, memory_budget_bytes=memory_budget_bytes, progress=progress
    )
    floor = TOL_FLOOR_EPS * torch.finfo(x.dtype).eps
    pairs = lanczos(
        operator.apply,
        batch=setup.batch,
        n=setup.n,
        k=k,
        which=which,
        tol=max(float(tol), floor),
        steps=plan.krylov_steps,
        seed=seed,
        like=x,
    )
    products = operator.apply(pairs.vectors)
    residuals = (products - pairs.values[..., None] * pairs.vectors).norm(dim=-1)
    converged = bool((residuals <= max(float(tol), floor) * pairs.scale[:, None]).all())
    progress.plan(progress.snapshot().done)  # finished: the total is what was done
    return EigenResult(
        values=pairs.values,
        vectors=pairs.vectors.reshape(setup.batch, k, *setup.sample_shape),
        residuals=residuals,
        products=operator.products,
        converged=converged,
        steps=pairs.steps,
        output=model_output(model, x, setup, memory_budget_bytes),
    )
