"""Hessian-vector, Jacobian-vector and vector-Jacobian products (engine.operators.products)
against dense float64 references from ``torch.func`` alone.

Tolerance: ``||got - want|| / ||want|| <= 1e-10`` (float64; the products and the
references differ only in the order of floating-point sums).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.architectures import by_name
from hessian_service.engine import Objective, ObjectiveKind
from hessian_service.engine import operators as ops
from hessian_service.engine.progress import Progress
from tests.unit.operators_helpers import bundled, dense_hessians, one_thread, relative

pytestmark = pytest.mark.usefixtures("one_thread")
__all__ = ["one_thread"]  # the fixture, imported for pytestmark

TOL = 1e-10


def _case(name: str) -> tuple[nn.Module, torch.Tensor, int]:
    """(model in float64, a batch of 2, the output index) of a bundled model or a
    graph-path architecture of bench/architectures.py."""
    generator = torch.Generator().manual_seed(7)
    if name in ("digits_cnn", "mlp_tanh"):
        model = bundled(name)
        x = torch.rand(2, 1, 28, 28, generator=generator, dtype=torch.float64)
        return model, x, 2 if name == "digits_cnn" else 3
    arch = by_name(name)
    assert arch.output_index is not None
    x = torch.randn(2, *arch.sample_shape, generator=generator, dtype=torch.float64)
    return arch.build().double(), x, arch.output_index


HVP_CASES = ["digits_cnn", "mlp_tanh", "residual_mlp", "layernorm_gelu_mlp", "multihead_attention"]


@pytest.mark.parametrize("name", HVP_CASES)
def test_hvp_equals_dense_hessian_times_vectors(name: str) -> None:
    model, x, index = _case(name)
    vectors = torch.randn(2, 3, *x.shape[1:], dtype=torch.float64)
    result = ops.hessian_vector_products(model, x, vectors, output_index=index)
    hessians = dense_hessians(model, x, index)
    want = torch.einsum("bij,bmj->bmi", hessians, vectors.reshape(2, 3, -1))
    assert result.values.shape == vectors.shape
    assert relative(result.values.reshape(2, 3, -1), want) <= TOL
    assert result.products == 6
    assert result.method == "forward-over-reverse"
    assert torch.allclose(result.output, model(x), rtol=0, atol=1e-12)


def test_hvp_small_budget_changes_chunks_not_values() -> None:
    model, x, index = _case("residual_mlp")
    vectors = torch.randn(2, 5, *x.shape[1:], dtype=torch.float64)
    roomy = ops.hessian_vector_products(model, x, vectors, output_index=index)
    progress = Progress()
    tight = ops.hessian_vector_products(
        model, x, vectors, output_index=index, memory_budget_bytes=1, progress=progress
    )
    assert relative(tight.values, roomy.values) <= 1e-14
    assert progress.snapshot().done == 10  # one pair per chunk, every chunk counted


def test_hvp_of_an_objective_per_sample_targets() -> None:
    model, x, _ = _case("mlp_tanh")
    targets = torch.tensor([4, 7])
    vectors = torch.randn(2, 2, *x.shape[1:], dtype=torch.float64)
    result = ops.hessian_vector_products(
        model, x, vectors, objective=Objective(ObjectiveKind.CROSS_ENTROPY, target=targets)
    )
    for b in range(2):

        def loss(flat: torch.Tensor, b: int = b) -> torch.Tensor:
            logits = model(flat.reshape(1, 1, 28, 28))
            return F.cross_entropy(logits, targets[b : b + 1])

        hessian = torch.func.hessian(loss)(x[b].reshape(-1))
        want = vectors[b].reshape(2, -1) @ hessian
        assert relative(result.values[b].reshape(2, -1), want) <= TOL


class ValueBranch(nn.Module):
    """Python control flow on a value (``.item()``): torch.func cannot transform it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x)
        return out if float(x.sum().item()) > -1e9 else -out


def test_products_fall_back_to_autograd_and_stay_exact() -> None:
    inner, x, index = _case("residual_mlp")
    model = ValueBranch(inner)
    vectors = torch.randn(2, 3, *x.shape[1:], dtype=torch.float64)
    result = ops.hessian_vector_products(model, x, vectors, output_index=index)
    assert result.method == "autograd"
    want = torch.einsum("bij,bmj->bmi", dense_hessians(inner, x, index), vectors)
    assert relative(result.values, want) <= TOL
    jacobians = torch.stack([torch.func.jacrev(lambda z: inner(z[None])[0])(s) for s in x])
    jvp = ops.jacobian_vector_products(model, x, vectors)
    assert jvp.method == "autograd"
    assert relative(jvp.values, torch.einsum("bkj,bmj->bmk", jacobians, vectors)) <= TOL
    covectors = torch.randn(2, 3, 3, dtype=torch.float64)
    vjp = ops.vector_jacobian_products(model, x, covectors)
    assert vjp.method == "autograd"
    assert relative(vjp.values, torch.einsum("bkj,bmk->bmj", jacobians, covectors)) <= TOL


@pytest.mark.parametrize(
    "name", ["mlp_tanh", "residual_mlp", "layernorm_gelu_mlp", "multihead_attention"]
)
def test_jvp_and_vjp_equal_the_jacobian(name: str) -> None:
    model, x, _ = _case(name)
    shape = tuple(x.shape[1:])
    jacobians = torch.stack(
        [
            torch.func.jacrev(lambda z: model(z.reshape(1, *shape)).reshape(-1))(s.reshape(-1))
            for s in x
        ]
    )  # [B, m, n]
    outputs = jacobians.shape[1]
    vectors = torch.randn(2, 4, *shape, dtype=torch.float64)
    jvp = ops.jacobian_vector_products(model, x, vectors)
    assert jvp.values.shape == (2, 4, *model(x).shape[1:])
    want = torch.einsum("bkj,bmj->bmk", jacobians, vectors.reshape(2, 4, -1))
    assert relative(jvp.values.reshape(2, 4, -1), want) <= TOL
    picked = ops.jacobian_vector_products(model, x, vectors, output_index=[0, outputs - 1])
    assert relative(picked.values, want[:, :, [0, outputs - 1]]) <= TOL
    one = ops.jacobian_vector_products(model, x, vectors, output_index=1)
    assert relative(one.values, want[:, :, 1]) <= TOL
    covectors = torch.randn(2, 4, *model(x).shape[1:], dtype=torch.float64)
    vjp = ops.vector_jacobian_products(model, x, covectors)
    want_vjp = torch.einsum("bkj,bmk->bmj", jacobians, covectors.reshape(2, 4, -1))
    assert vjp.values.shape == vectors.shape
    assert relative(vjp.values.reshape(2, 4, -1), want_vjp) <= TOL
    scalars = torch.randn(2, 4, dtype=torch.float64)
    vjp_one = ops.vector_jacobian_products(model, x, scalars, output_index=2)
    want_one = scalars[..., None] * jacobians[:, None, 2, :]
    assert relative(vjp_one.values.reshape(2, 4, -1), want_one) <= TOL


def test_vectors_of_the_wrong_shape_are_refused_before_work() -> None:
    model, x, index = _case("residual_mlp")
    with pytest.raises(ValueError, match=r"vectors must be shaped \[B=2, m>=1"):
        ops.hessian_vector_products(
            model, x, torch.zeros(2, 3, 15, dtype=torch.float64), output_index=index
        )
    with pytest.raises(ValueError, match="output_index must be one int"):
        ops.hessian_vector_products(model, x, torch.zeros(2, 1, 16), output_index=[0, 1])  # type: ignore[arg-type]
