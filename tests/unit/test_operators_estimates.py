"""Hessian diagonals and traces (engine.operators.diagonal / trace): exact strategies
against dense float64 references, stochastic ones against their own standard errors.

Exact: ``max |got - want| <= 1e-10 * max |want|`` (float64). Stochastic: 100 runs on a
32-input tanh MLP (a full-rank Hessian, so the estimators have real variance), as 10
seeds of a batch of 10 copies of one sample (each sample of a batch draws its own
vectors, so its estimate is an independent run; one call per seed keeps the test fast):

- trace (Hutch++, 30 products): in at least 95 of the 100 runs ``|estimate - tr H|
  <= 3 standard errors``;
- diagonal (Hutchinson, 64 products): a run *covers* when at least 95% of its 32 entries
  are within 3 of their own standard errors (plus 1e-12 for entries whose variance is
  zero); at least 95 of the 100 runs cover;
- Hutch++ against Hutchinson's trace at the same 30 products on a Hessian with a
  decaying spectrum (a 16-wide first layer): mean absolute error over the 100 seeds at
  least 3x smaller.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from hessian_service.engine import operators as ops
from hessian_service.engine.operators import diagonal, estimators, strategies, trace
from hessian_service.engine.operators.results import Estimate
from hessian_service.engine.progress import NO_PROGRESS
from tests.unit.operators_helpers import bundled, dense_hessians, one_thread

pytestmark = pytest.mark.usefixtures("one_thread")
__all__ = ["one_thread"]

SEEDS = range(10)
COPIES = 10


def _mlp(widths: tuple[int, ...], seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(widths):
        linear = nn.Linear(fan_in, fan_out)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(fan_out, fan_in, generator=generator) / fan_in**0.5)
            linear.bias.copy_(torch.randn(fan_out, generator=generator) * 0.1)
        layers += [linear, nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double().eval().requires_grad_(False)


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return float((got - want).abs().max()) <= 1e-10 * float(want.abs().max())


@pytest.mark.parametrize(
    "budget, method", [(1 << 30, "dense"), (8 << 20, "forward-laplacian"), (8 << 20, "hvp-basis")]
)
def test_exact_diagonal_and_trace_equal_the_dense_ones(budget: int, method: str) -> None:
    # 1 GiB: the dense 784x784 Hessian fits and, at n = 784, goes before the graph pass.
    # 8 MiB: one 784x784 float64 Hessian (4.9 MB, twice for the dense strategy) no longer
    # fits: the forward-Laplacian pass answers; the HVP basis (one product, 0.2 MB, fits)
    # is what answers for models the graph engine cannot run, called here by itself.
    model = bundled("mlp_tanh")
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    hessians = dense_hessians(model, x, 3)
    want = torch.diagonal(hessians, dim1=-2, dim2=-1)
    for kind, public in (("diagonal", ops.hessian_diagonal), ("trace", ops.hessian_trace)):
        if method == "hvp-basis":
            problem = strategies.make_problem(
                "test", kind, model, x, 3, None, True, None, None, 0, budget, NO_PROGRESS
            )
            got = strategies.hvp_basis(problem)
            assert isinstance(got, Estimate)
        else:
            got = public(model, x, output_index=3, memory_budget_bytes=budget, exact=True)
        assert (got.method, got.exact, got.standard_error) == (method, True, None)
        assert got.products == 2 * 784
        if kind == "diagonal":
            assert got.values.shape == x.shape
            assert _close(got.values.reshape(2, -1), want)
        else:
            assert _close(got.values, want.sum(-1))


def test_exact_true_that_does_not_fit_is_a_413_error_naming_the_estimate() -> None:
    model = _mlp((32, 64, 1), seed=0)
    x = torch.randn(3, 32, dtype=torch.float64)
    with pytest.raises(ops.OperatorTooLarge, match=r"exact=true does not fit .*96 products"):
        ops.hessian_trace(model, x, exact=True, max_products=50)
    # exact=None with the same budget: the stochastic estimate instead, within it.
    estimate = ops.hessian_trace(model, x, max_products=50)
    assert (estimate.exact, estimate.method, estimate.products) == (False, "hutch++", 48)
    assert estimate.standard_error is not None and estimate.standard_error.shape == (3,)


def test_strategies_are_one_ordered_list() -> None:
    ordered = (
        strategies.forward_laplacian,
        strategies.dense,
        strategies.hvp_basis,
        strategies.stochastic,
    )
    assert ordered == diagonal.STRATEGIES
    assert trace.STRATEGIES == diagonal.STRATEGIES


def test_stochastic_trace_and_diagonal_fall_within_three_standard_errors() -> None:
    model = _mlp((32, 48, 48, 1), seed=1)
    sample = torch.randn(1, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = sample.expand(COPIES, 32)
    true_diagonal = torch.diagonal(dense_hessians(model, sample, 0)[0])
    traces = diagonals = 0
    for seed in SEEDS:
        got = ops.hessian_trace(model, x, exact=False, max_products=30 * COPIES, seed=seed)
        assert got.method == "hutch++" and got.products == 30 * COPIES
        assert got.standard_error is not None
        error = (got.values - true_diagonal.sum()).abs()
        traces += int((error <= 3 * got.standard_error).sum())
        est = ops.hessian_diagonal(model, x, exact=False, max_products=64 * COPIES, seed=seed)
        assert est.method == "hutchinson" and est.standard_error is not None
        within = (est.values - true_diagonal).abs() <= 3 * est.standard_error + 1e-12
        diagonals += int((within.double().mean(-1) >= 0.95).sum())
    assert traces >= 95, traces
    assert diagonals >= 95, diagonals


def test_hutchpp_beats_hutchinson_at_the_same_product_count() -> None:
    # A 16-wide first layer: rank <= 16, more than Hutch++'s 10-column sketch (so it is
    # not exact), with a decaying spectrum. Measured: mean errors 0.0102 against 0.0732.
    model = _mlp((32, 16, 32, 1), seed=2)
    sample = torch.randn(1, 32, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x = sample.expand(COPIES, 32)
    exact = torch.diagonal(dense_hessians(model, sample, 0)[0]).sum()

    def apply(vectors: torch.Tensor) -> torch.Tensor:
        return ops.hessian_vector_products(model, x, vectors).values

    hutchpp = hutchinson = 0.0
    for seed in SEEDS:
        got = ops.hessian_trace(model, x, exact=False, max_products=30 * COPIES, seed=seed)
        hutchpp += float((got.values - exact).abs().sum())
        plain, _ = estimators.hutchinson_trace(apply, COPIES, 32, 30, seed=seed, like=x)
        hutchinson += float((plain - exact).abs().sum())
    assert hutchpp * 3 <= hutchinson, (hutchpp / 100, hutchinson / 100)
