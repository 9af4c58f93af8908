"""The ``weighted_sum`` objective, ``sum(w * o)`` (UM-Bridge's ``sens^T f``), on every
engine path that takes an objective, against ``torch.func`` of the same scalar written
out by hand (no engine code), in float64.

Tolerance: ``||got - want|| / ||want|| <= 1e-10`` (float64; only the order of sums
differs).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.architectures import by_name
from hessian_service.engine import Objective, compute_hessian, compute_jacobian
from hessian_service.engine import operators as ops
from tests.unit.operators_helpers import bundled, one_thread, relative

pytestmark = pytest.mark.usefixtures("one_thread")
__all__ = ["one_thread"]  # the fixture, imported for pytestmark

TOL = 1e-10
# A bundled structured model, a bundled chain, and two graph-engine architectures.
CASES = ["digits_cnn", "mlp_tanh", "residual_mlp", "layernorm_gelu_mlp"]


def _case(name: str) -> tuple[nn.Module, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    if name in ("digits_cnn", "mlp_tanh"):
        return bundled(name), torch.rand(2, 1, 28, 28, generator=generator, dtype=torch.float64)
    arch = by_name(name)
    x = torch.randn(2, *arch.sample_shape, generator=generator, dtype=torch.float64)
    return arch.build().double().eval(), x


def _weighted(model: nn.Module, shape: tuple[int, ...], weights: torch.Tensor):  # type: ignore[no-untyped-def]
    def scalar(flat: torch.Tensor) -> torch.Tensor:
        return (model(flat.reshape(1, *shape)).reshape(-1) * weights).sum()

    return scalar


def _references(model: nn.Module, x: torch.Tensor, weights: torch.Tensor):  # type: ignore[no-untyped-def]
    """Per-sample gradients ``[B, n]`` and Hessians ``[B, n, n]`` of ``sum(w_b * f(x_b))``."""
    shape = tuple(x.shape[1:])
    grads, hessians = [], []
    with sdpa_kernel(SDPBackend.MATH):
        for b, sample in enumerate(x):
            scalar = _weighted(model, shape, weights[b])
            grads.append(torch.func.grad(scalar)(sample.reshape(-1)))
            hessians.append(torch.func.hessian(scalar)(sample.reshape(-1)))
    return torch.stack(grads), torch.stack(hessians)


@pytest.mark.parametrize("name", CASES)
def test_weighted_sum_gradient_hessian_and_products(name: str) -> None:
    model, x = _case(name)
    m = model(x[:1]).numel()
    weights = torch.randn(2, m, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    objective = Objective("weighted_sum", target=weights)
    grads, hessians = _references(model, x, weights)
    assert hessians.abs().max() > 1e-6  # a curved case: a wrong Hessian cannot pass as zero

    gradient = compute_jacobian(model, x, objective=objective).matrix
    assert relative(gradient.reshape(2, -1), grads) <= TOL
    hessian = compute_hessian(model, x, objective=objective).matrix  # [B, 1, n, n]
    assert relative(hessian.reshape(hessians.shape), hessians) <= TOL

    vectors = torch.randn(2, 3, *x.shape[1:], dtype=torch.float64)
    hvp = ops.hessian_vector_products(model, x, vectors, objective=objective)
    want = torch.einsum("bij,bmj->bmi", hessians, vectors.reshape(2, 3, -1))
    assert relative(hvp.values.reshape(2, 3, -1), want) <= TOL
    diagonal = ops.hessian_diagonal(model, x, objective=objective, exact=True)
    want_diagonal = torch.diagonal(hessians, dim1=-2, dim2=-1)
    assert relative(diagonal.values.reshape(2, -1), want_diagonal) <= TOL


def test_one_weight_row_is_shared_by_every_sample() -> None:
    model, x = _case("mlp_tanh")
    row = torch.linspace(-1.0, 1.0, 10, dtype=torch.float64)
    shared = compute_hessian(model, x, objective=Objective("weighted_sum", target=row)).matrix
    per_sample = Objective("weighted_sum", target=row.expand(2, 10).clone())
    assert relative(shared, compute_hessian(model, x, objective=per_sample).matrix) <= 1e-14
    _, hessians = _references(model, x, row.expand(2, 10))
    assert relative(shared.reshape(hessians.shape), hessians) <= TOL
