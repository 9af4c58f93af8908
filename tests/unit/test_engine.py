"""The engine against independent references, in float64.

Tolerances: 1e-10 absolute against ``torch.autograd.functional`` (both exact up to
rounding); 1e-6 against central finite differences of the autograd gradient (step 1e-5,
truncation error O(eps^2)); closed forms to 1e-12.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessian_service import engine
from hessian_service.engine import Curvature, Objective, classify
from hessian_service.engine.planner import plan_hessian, plan_jacobian
from hessian_service.repository.zoo import Quadratic
from tests.cases import (
    Case,
    build_case,
    finite_difference_hessian,
    reference_hessian,
    scalar_of,
)

EXACT = 1e-10


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    diff = (actual - expected).abs()
    worst = int(diff.argmax()) if diff.numel() else 0
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert float(diff.max()) <= atol, (
        f"max abs diff {float(diff.max()):.3e} > {atol:.0e} at flat index {worst}; "
        f"{int((diff > atol).sum())} of {diff.numel()} entries differ"
    )


METHODS = pytest.mark.parametrize("method", ["auto", "generic"])


@METHODS
def test_hessian_of_each_output_matches_autograd(case: Case, method: str) -> None:
    model, x = build_case(case)
    n = x[0].numel()
    indices = list(range(case.outputs))
    result = engine.hessian(model, x, output_index=indices, method=method)
    assert result.shape == (x.shape[0], case.outputs, n, n)
    assert result.dtype == torch.float64 and not result.requires_grad
    for b in range(x.shape[0]):
        for k in indices:
            assert_close(result[b, k], reference_hessian(scalar_of(model, k), x[b]), EXACT)


@METHODS
def test_hessian_matches_finite_differences(case: Case, method: str) -> None:
    model, x = build_case(case, seed=1, batch=1)
    result = engine.hessian(model, x, output_index=0, method=method)
    assert_close(result[0], finite_difference_hessian(scalar_of(model, 0), x[0]), 1e-6)


def _objective_references(model: nn.Module, m: int) -> list[tuple[Objective, object]]:
    target = torch.linspace(-1.0, 1.0, m, dtype=torch.float64)
    return [
        (Objective("sum"), lambda s: model(s.unsqueeze(0)).sum()),
        (
            Objective("log_softmax", index=m - 1),
            lambda s: F.log_softmax(model(s.unsqueeze(0)).reshape(1, -1), dim=1)[0, m - 1],
        ),
        (
            Objective("mse", target=target),
            lambda s: F.mse_loss(model(s.unsqueeze(0)).reshape(-1), target),
        ),
        (
            Objective("cross_entropy", target=torch.tensor(1)),
            lambda s: F.cross_entropy(model(s.unsqueeze(0)).reshape(1, -1), torch.tensor([1])),
        ),
    ]


@METHODS
def test_each_objective_matches_autograd_of_torch_losses(case: Case, method: str) -> None:
    model, x = build_case(case, seed=2, batch=2)
    for objective, reference in _objective_references(model, case.outputs):
        result = engine.hessian(model, x, objective=objective, method=method)
        for b in range(x.shape[0]):
            assert_close(result[b], reference_hessian(reference, x[b]), EXACT)  # type: ignore[arg-type]


def test_per_sample_objective_targets_are_not_mixed() -> None:
    model, x = build_case(
        Case("mlp", lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh()), (3,), 4), batch=2
    )
    classes = torch.tensor([0, 3])
    result = engine.hessian(model, x, objective=Objective("cross_entropy", target=classes))
    for b in range(2):
        reference = reference_hessian(
            lambda s, b=b: F.cross_entropy(model(s.unsqueeze(0)), classes[b : b + 1]), x[b]
        )
        assert_close(result[b], reference, EXACT)


@METHODS
def test_jacobian_matches_autograd_in_reverse_and_forward_mode(case: Case, method: str) -> None:
    model, x = build_case(case)
    n = x[0].numel()
    result = engine.jacobian(model, x, method=method)
    assert result.shape == (x.shape[0], case.outputs, n)
    for b in range(x.shape[0]):
        reference = torch.autograd.functional.jacobian(
            lambda s: model(s.unsqueeze(0)).reshape(-1), x[b]
        ).reshape(case.outputs, n)
        assert_close(result[b], reference, 1e-12)
    # A budget too small for one reverse pass per row still matches; forward mode too.
    rows = list(range(case.outputs)) * (n // case.outputs + 1)  # more rows than inputs
    forward = engine.compute_jacobian(model, x, output_index=rows)
    assert forward.method == "generic:forward"
    assert_close(forward.matrix[:, : case.outputs], result, 1e-12)


def test_closed_forms() -> None:
    # f(x) = x * x * arange(4): Hessian of output 2 is diag(0, 0, 4, 0); gradient (0, 0, 8, 0).
    quadratic = Quadratic(4).double()
    x = torch.full((1, 4), 2.0, dtype=torch.float64)
    assert torch.equal(
        engine.hessian(quadratic, x, output_index=2)[0],
        torch.diag(torch.tensor([0.0, 0, 4, 0]).double()),
    )
    assert torch.equal(
        engine.jacobian(quadratic, x, output_index=2)[0], torch.tensor([0.0, 0, 8, 0]).double()
    )

    # Linear(4, 1): zero Hessian (no autograd error); MSE: 2 / m * w w^T = 0.5 everywhere.
    linear = nn.Linear(4, 1).double().requires_grad_(False)
    nn.init.constant_(linear.weight, 0.5)
    nn.init.constant_(linear.bias, 0.5)
    ones = torch.ones(1, 4, dtype=torch.float64)
    assert torch.equal(engine.hessian(linear, ones)[0], torch.zeros(4, 4, dtype=torch.float64))
    mse = engine.hessian(linear, ones, objective=Objective("mse", target=torch.tensor(1.0)))
    assert torch.equal(mse[0], torch.full((4, 4), 0.5, dtype=torch.float64))


def test_one_hidden_layer_tanh_closed_form() -> None:
    # f = v^T tanh(W x + b):  H = W^T diag(v * tanh''(z)) W,  tanh'' = -2 tanh (1 - tanh^2).
    torch.manual_seed(3)
    hidden = nn.Linear(5, 7).double()
    head = nn.Linear(7, 1, bias=False).double()
    model = nn.Sequential(hidden, nn.Tanh(), head).requires_grad_(False)
    x = torch.randn(2, 5, dtype=torch.float64)
    result = engine.hessian(model, x, output_index=0)
    for b in range(2):
        t = torch.tanh(hidden(x[b]))
        curvature = head.weight[0] * (-2 * t * (1 - t * t))
        expected = hidden.weight.T @ torch.diag(curvature) @ hidden.weight
        assert_close(result[b], expected, 1e-12)


def test_cross_entropy_of_linear_model_closed_form() -> None:
    # Softmax cross-entropy on logits W x: H = W^T (diag(p) - p p^T) W.
    torch.manual_seed(4)
    linear = nn.Linear(6, 4).double().requires_grad_(False)
    x = torch.randn(1, 6, dtype=torch.float64)
    result = engine.hessian(linear, x, objective=Objective("cross_entropy", target=torch.tensor(2)))
    p = torch.softmax(linear(x)[0], dim=0)
    expected = linear.weight.T @ (torch.diag(p) - torch.outer(p, p)) @ linear.weight
    assert_close(result[0], expected, 1e-12)


def test_batch_equals_single_calls_and_lists_equal_single_indices() -> None:
    model, x = build_case(
        Case(
            "cnn",
            lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)),
            (1, 5, 5),
            3,
        ),
        batch=4,
    )
    batched = engine.hessian(model, x, output_index=[0, 2])
    for b in range(4):
        assert_close(batched[b, 0], engine.hessian(model, x[b : b + 1], output_index=0)[0], 1e-13)
        assert_close(batched[b, 1], engine.hessian(model, x[b : b + 1], output_index=2)[0], 1e-13)


def test_small_memory_budget_chunks_without_changing_the_result() -> None:
    model, x = build_case(
        Case(
            "cnn",
            lambda: nn.Sequential(
                nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(50, 3)
            ),
            (1, 5, 5),
            3,
        ),
        batch=3,
    )
    roomy = engine.compute_hessian(model, x, output_index=1, method="generic")
    tight = engine.compute_hessian(
        model, x, output_index=1, memory_budget_bytes=20_000, method="generic"
    )
    assert roomy.plan.basis_chunk == 25 and roomy.plan.batch_chunk == 3
    assert tight.plan.basis_chunk < 25 and tight.plan.batch_chunk == 1
    assert_close(tight.matrix, roomy.matrix, 1e-13)
    jac_tight = engine.compute_jacobian(model, x, memory_budget_bytes=5_000, method="generic")
    assert jac_tight.plan.basis_chunk < 3
    assert_close(jac_tight.matrix, engine.jacobian(model, x), 1e-13)


def test_planner_respects_the_budget_and_picks_the_cheaper_mode() -> None:
    plan = plan_hessian(
        n=784, batch=32, activation_numel=20_000, itemsize=4, memory_budget_bytes=1 << 28
    )
    assert plan.estimated_bytes <= 1 << 28
    assert (
        plan_jacobian(n=784, rows=10, batch=1, activation_numel=1000, itemsize=4).method
        == "generic:reverse"
    )
    assert (
        plan_jacobian(n=4, rows=10, batch=1, activation_numel=1000, itemsize=4).method
        == "generic:forward"
    )


def test_structure_classification() -> None:
    assert (
        classify(nn.Sequential(nn.Linear(3, 3), nn.Dropout(), nn.Linear(3, 1))) is Curvature.AFFINE
    )
    assert (
        classify(nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU(), nn.MaxPool2d(2)))
        is Curvature.PIECEWISE_LINEAR
    )
    assert classify(nn.Sequential(nn.Linear(3, 3), nn.Tanh())) is Curvature.GENERAL
    assert classify(Quadratic(4)) is Curvature.GENERAL


class _TanhLinear(nn.Linear):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(input))


class _KeepsReLU(nn.ReLU):
    """A subclass that keeps torch's forward."""


def test_classification_trusts_only_modules_that_compute_as_their_class() -> None:
    """A Linear subclass with its own forward, or a hook that squares a Linear's output,
    is not affine whatever its class says; a subclass that keeps the forward still counts."""
    assert classify(nn.Sequential(_TanhLinear(3, 3), nn.Linear(3, 1))) is Curvature.GENERAL
    hooked = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    hooked[0].register_forward_hook(lambda _module, _inputs, output: output * output)
    assert classify(hooked) is Curvature.GENERAL
    kept = nn.Sequential(nn.Linear(3, 3), _KeepsReLU(), nn.Linear(3, 1))
    assert classify(kept) is Curvature.PIECEWISE_LINEAR


def test_relu_network_hessian_is_zero_but_its_loss_hessian_is_not() -> None:
    torch.manual_seed(5)
    model = (
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double().requires_grad_(False)
    )
    x = torch.randn(1, 4, dtype=torch.float64)
    assert not engine.hessian(model, x, output_index=1).count_nonzero()
    loss = engine.hessian(model, x, objective=Objective("cross_entropy", target=torch.tensor(0)))
    assert loss.abs().max() > 1e-3
    assert_close(
        loss[0],
        reference_hessian(
            lambda s: F.cross_entropy(model(s.unsqueeze(0)), torch.tensor([0])), x[0]
        ),
        EXACT,
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"output_index": 3}, "hessian: output_index 3 is out of range for 3 outputs"),
        ({"output_index": []}, "hessian: output_index must not be an empty list"),
        ({}, "hessian: output_index is required when the model has 3 outputs"),
        (
            {"output_index": 0, "objective": Objective("sum")},
            "hessian: give output_index or objective",
        ),
        ({"output_index": 0, "method": "magic"}, "hessian: method must be one of"),
    ],
)
def test_hessian_checks_arguments_before_work(kwargs: dict[str, object], message: str) -> None:
    model = nn.Linear(2, 3)
    with pytest.raises(ValueError, match=message):
        engine.hessian(model, torch.zeros(1, 2), **kwargs)  # type: ignore[arg-type]


def test_input_checks() -> None:
    with pytest.raises(ValueError, match="jacobian: x must be a floating-point tensor"):
        engine.jacobian(nn.Linear(2, 1), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="jacobian: x must be a batch"):
        engine.jacobian(nn.Linear(2, 1), torch.zeros(2))
    with pytest.raises(ValueError, match="Objective: mse needs a target"):
        Objective("mse")
