"""The ways to a Hessian diagonal or trace, tried in order by ``diagonal`` and ``trace``.

A strategy takes a ``Problem`` and returns an ``Estimate``, or ``Declined`` with the
reason it does not apply (too large for the budget, exactness not asked, ...). The
ordered tuples ``diagonal.STRATEGIES`` / ``trace.STRATEGIES`` are the whole policy: the
first that accepts answers; when all decline, ``run`` raises ``OperatorTooLarge`` with
every reason (a 413). The exact ones decide with ``plan.exact_method``, the rule
``plan_operator`` reports, so a plan and a run agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hessian_service.engine.api import compute_hessian, graph_second_order
from hessian_service.engine.objectives import Objective
from hessian_service.engine.operators import estimators
from hessian_service.engine.operators import plan as plans
from hessian_service.engine.operators.products import ProductOperator, model_output
from hessian_service.engine.operators.results import Estimate, OperatorTooLarge
from hessian_service.engine.operators.selection import Setup, objective_rows, prepare
from hessian_service.engine.progress import Progress


@dataclass(frozen=True)
class Problem:
    """One diagonal or trace request, checked: what every strategy sees."""

    kind: str  # "diagonal" | "trace"
    model: nn.Module
    x: torch.Tensor
    setup: Setup
    output_index: int | None
    objective: Objective | None
    exact: bool | None
    max_products: int | None
    max_work: int | None
    seed: int
    memory_budget_bytes: int
    progress: Progress
    compile_after: int = 0  # the forward-Laplacian pass: compile a shape asked this often

    def reduce(self, diagonals: torch.Tensor) -> torch.Tensor:
        """Flat diagonals ``[b, n]`` -> this problem's values (``[b, *in]`` or ``[b]``)."""
        if self.kind == "trace":
            return diagonals.sum(-1)
        return diagonals.reshape(diagonals.shape[0], *self.setup.sample_shape)

    def exact_method(self) -> tuple[str | None, str]:
        setup = self.setup
        return plans.exact_method(
            n=setup.n,
            batch=setup.batch,
            activation_numel=setup.activation_numel,
            itemsize=setup.itemsize,
            memory_budget_bytes=self.memory_budget_bytes,
            exact=self.exact,
            max_products=self.max_products,
            max_work=self.max_work,
        )

    def operator(self) -> ProductOperator:
        return ProductOperator(
            "hvp",
            self.model,
            self.x,
            self.setup,
            memory_budget_bytes=self.memory_budget_bytes,
            progress=self.progress,
        )


def make_problem(
    api_name: str,
    kind: str,
    model: nn.Module,
    x: torch.Tensor,
    output_index: int | None,
    objective: Objective | None,
    exact: bool | None,
    max_products: int | None,
    max_work: int | None,
    seed: int,
    memory_budget_bytes: int,
    progress: Progress,
    *,
    compile_after: int = 0,
) -> Problem:
    """Check a diagonal/trace request's own arguments and select its scalar."""
    if exact not in (None, True, False):
        raise ValueError(f"{api_name}: exact must be true, false or null, got {exact!r}")
    if max_products is not None and (isinstance(max_products, bool) or max_products < 1):
        raise ValueError(f"{api_name}: max_products must be a positive int, got {max_products!r}")
    setup = prepare(
        api_name, model, x, output_index=output_index, objective=objective, one_scalar=True
    )
    return Problem(
        kind=kind,
        model=model,
        x=x,
        setup=setup,
        output_index=output_index,
        objective=objective,
        exact=exact,
        max_products=max_products,
        max_work=max_work,
        seed=seed,
        memory_budget_bytes=memory_budget_bytes,
        progress=progress,
        compile_after=compile_after,
    )


@dataclass(frozen=True)
class Declined:
    """A strategy that does not apply, and why (one clause of a 413's message)."""

    reason: str


Strategy = Callable[[Problem], Estimate | Declined]


# Up to this many inputs the forward-Laplacian pass goes first even where a dense Hessian
# fits: it carries n (+1) columns where the matrix has n^2 entries (PINN, 2 inputs, 4096
# points: about 2x torch.func eagerly). Past it, a dense matrix that fits is as fast.
FORWARD_LAPLACIAN_BEFORE_DENSE_N = 64


def forward_laplacian(problem: Problem) -> Estimate | Declined:
    """The graph engine's forward-Laplacian pass (``engine.graph_second_order``): exact,
    no matrix and no HVPs; ``n`` input columns per sample (counted as ``n`` products),
    under the same work and product limits as the other exact strategies."""
    method, why = problem.exact_method()
    if method is None:
        return Declined(why)
    setup = problem.setup
    if method == "dense" and setup.n > FORWARD_LAPLACIAN_BEFORE_DENSE_N:
        return Declined("the dense Hessian fits and is as fast at this size")
    found = graph_second_order(
        problem.model,
        problem.x,
        trace=problem.kind == "trace",
        output_index=problem.output_index,
        objective=problem.objective,
        memory_budget_bytes=problem.memory_budget_bytes,
        progress=problem.progress,
        compile_after=problem.compile_after,
    )
    if found is None:
        return Declined("forward Laplacian: the graph engine cannot run this model")
    return Estimate(
        values=found.values,  # [B] or already in the input's shape
        standard_error=None,
        exact=True,
        products=setup.batch * setup.n,
        method="forward-laplacian",
        seed=problem.seed,
        output=found.output,
    )


def dense(problem: Problem) -> Estimate | Declined:
    """The dense Hessians of chunks of samples (``compute_hessian``: structured, graph or
    generic path) and their diagonals: exact, and the fastest when ``n x n`` fits."""
    method, why = problem.exact_method()
    if method != "dense":
        return Declined(why or "the HVP basis applies (a dense Hessian is over the budget)")
    setup = problem.setup
    batch, n = setup.batch, setup.n
    chunk = plans.dense_sample_chunk(n, batch, setup.itemsize, problem.memory_budget_bytes)
    problem.progress.plan(batch * n)
    diagonals, outputs = [], []
    for start in range(0, batch, chunk):
        stop = min(batch, start + chunk)
        problem.progress.check()
        result = compute_hessian(
            problem.model,
            problem.x[start:stop],
            output_index=problem.output_index,
            objective=objective_rows(setup, start, stop, problem.objective),
            memory_budget_bytes=problem.memory_budget_bytes // plans.DENSE_WORKING_SHARE,
        )
        diagonals.append(torch.diagonal(result.selected, dim1=-2, dim2=-1).clone())
        outputs.append(result.output)
        del result
        problem.progress.advance((stop - start) * n)
    return Estimate(
        values=problem.reduce(torch.cat(diagonals)),
        standard_error=None,
        exact=True,
        products=batch * n,
        method="dense",
        seed=problem.seed,
        output=torch.cat(outputs),
    )


def hvp_basis(problem: Problem) -> Estimate | Declined:
    """``e_i^T H e_i`` from HVPs on chunks of basis vectors: exact, ``n`` products per
    sample, never more than one chunk of them in memory."""
    method, why = problem.exact_method()
    if method != "hvp-basis":
        return Declined(why or "the dense strategy applies")
    setup = problem.setup
    batch, n = setup.batch, setup.n
    operator = problem.operator()
    samples, chunk = operator.chunks(n)
    problem.progress.plan(batch * n)
    diagonals = problem.x.new_empty(batch, n)
    for start in range(0, batch, samples):
        stop = min(batch, start + samples)
        for first in range(0, n, chunk):
            last = min(n, first + chunk)
            rows = torch.arange(last - first, device=problem.x.device)
            basis = problem.x.new_zeros(last - first, n)
            basis[rows, first + rows] = 1
            products = operator.apply_samples(
                start, stop, basis.expand(stop - start, last - first, n)
            )
            diagonals[start:stop, first:last] = products[:, rows, first + rows]
    return Estimate(
        values=problem.reduce(diagonals),
        standard_error=None,
        exact=True,
        products=operator.products,
        method="hvp-basis",
        seed=problem.seed,
        output=model_output(problem.model, problem.x, setup, problem.memory_budget_bytes),
    )


def _stochastic_products(problem: Problem, least: int) -> int | Declined:
    """Products per sample of a stochastic estimate, or why there is none."""
    if problem.exact is True:
        return Declined("stochastic: exact=true was asked")
    setup = problem.setup
    m = plans.stochastic_products(setup.batch, problem.max_products)
    if m < least:
        return Declined(
            f"stochastic: needs at least {least} products per sample; max_products="
            f"{problem.max_products} gives {m} for {setup.batch} samples"
        )
    per_product = plans.bytes_per_product(
        "hvp", n=setup.n, activation_numel=setup.activation_numel, itemsize=setup.itemsize
    )
    if per_product > problem.memory_budget_bytes:
        return Declined(
            f"stochastic: one product needs {per_product} bytes, over "
            f"memory_budget_bytes={problem.memory_budget_bytes}"
        )
    return m


def stochastic(problem: Problem) -> Estimate | Declined:
    """Hutch++ for a trace (Hutchinson's with fewer than 4 products per sample),
    Hutchinson's for a diagonal: ``max_products`` (default 64 per sample) in all."""
    least = 2
    m = _stochastic_products(problem, least)
    if isinstance(m, Declined):
        return m
    setup = problem.setup
    operator = problem.operator()
    problem.progress.plan(setup.batch * m)
    x = problem.x
    if problem.kind == "diagonal":
        method = "hutchinson"
        values, error = estimators.hutchinson_diagonal(
            operator.apply, setup.batch, setup.n, m, seed=problem.seed, like=x
        )
        values, error = problem.reduce(values), problem.reduce(error)
    elif m >= 4:
        method = "hutch++"
        values, error = estimators.hutchpp_trace(
            operator.apply, setup.batch, setup.n, m, seed=problem.seed, like=x
        )
    else:
        method = "hutchinson"
        values, error = estimators.hutchinson_trace(
            operator.apply, setup.batch, setup.n, m, seed=problem.seed, like=x
        )
    return Estimate(
        values=values,
        standard_error=error,
        exact=False,
        products=operator.products,
        method=method,
        seed=problem.seed,
        output=model_output(problem.model, x, setup, problem.memory_budget_bytes),
    )


def run(problem: Problem, strategies: Sequence[Strategy], api_name: str) -> Estimate:
    """The first strategy's answer that does not decline; ``OperatorTooLarge`` (413)
    naming every reason when all do."""
    reasons = []
    for strategy in strategies:
        found = strategy(problem)
        if isinstance(found, Estimate):
            return found
        if found.reason not in reasons:  # the exact strategies share one rule's reason
            reasons.append(found.reason)
    setup = problem.setup
    asked = "exact=true" if problem.exact else "this request"
    raise OperatorTooLarge(
        f"{api_name}: {asked} does not fit ({'; '.join(reasons)}); ask exact=false with "
        f"max_products (a stochastic estimate with a standard error), a larger memory "
        f"budget, or fewer samples",
        estimated_bytes=setup.n * setup.n * setup.itemsize * setup.batch,
        estimated_products=setup.n * setup.batch,
    )


# The policy of diagonals and traces alike (``diagonal.STRATEGIES``, ``trace.STRATEGIES``):
# the graph engine's forward-Laplacian pass goes first (exact, the cheapest where it runs).
POLICY: tuple[Strategy, ...] = (
    forward_laplacian,  # exact: the graph engine's pass, no matrix, no HVPs
    dense,  # exact: B n x n matrices in chunks of samples, when one fits
    hvp_basis,  # exact: n HVPs on basis vectors per sample
    stochastic,  # a diagonal: Hutchinson (mean of v * Hv); a trace: Hutch++ (Hutchinson
    # below 4 products per sample); each with its standard error
)
