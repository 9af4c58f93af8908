"""The graph engine's planner, cache, report and fallbacks (engine/graph/).

Values are checked against torch.func.hessian in float64 (1e-10 relative); the planner's
choices (the cut, known zeros, the executor) are asserted, since they are what makes the
path fast, and a wrong choice would still give right numbers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import hessian as func_hessian

from hessian_service import engine
from hessian_service.engine import Algorithm, EnginePath, Objective
from hessian_service.engine.api import graph_plan_for
from hessian_service.engine.graph import direct
from hessian_service.engine.graph import hessian as vmap_executor
from hessian_service.engine.graph.cache import Unsupported
from hessian_service.engine.graph.plan import GraphPlan

TOLERANCE = 1e-10


def _reference(model: nn.Module, x: torch.Tensor, index: int) -> torch.Tensor:
    return torch.stack(
        [
            func_hessian(lambda s: model(s.unsqueeze(0)).reshape(-1)[index])(x[b]).reshape(
                x[0].numel(), x[0].numel()
            )
            for b in range(x.shape[0])
        ]
    )


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = max(1.0, float(want.detach().abs().max()))
    assert float((got - want).abs().max()) <= TOLERANCE * scale


class _Residual(nn.Module):
    """784 -> 32, then ``h + tanh(W h)`` twice, then 3 outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(24, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x.flatten(1))
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.out(h)


def _plan(model: nn.Module, x: torch.Tensor, **selection: object) -> GraphPlan:
    found = graph_plan_for(model, x, **selection)  # type: ignore[arg-type]
    assert isinstance(found, GraphPlan), found
    return found


def test_residual_mlp_is_cut_at_its_first_linear_output() -> None:
    torch.manual_seed(0)
    model = _Residual().double().eval().requires_grad_(False)
    x = torch.randn(3, 2, 12, dtype=torch.float64)
    found = _plan(model, x, output_index=1)
    assert (found.cut_size, found.cut_is_input, found.affine_prefix) == (8, False, True)
    assert found.direct_reason is None
    result = engine.compute_hessian(model, x, output_index=1)
    assert result.method is Algorithm.GRAPH_CUT
    _assert_close(result.selected, _reference(model, x, 1))


def test_relu_network_under_cross_entropy_is_cut_at_its_logits() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(27, 5)
    )
    model = model.double().eval().requires_grad_(False)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    target = torch.tensor([1, 4])
    objective = Objective(kind="cross_entropy", target=target)
    found = _plan(model, x, objective=objective)
    assert (found.cut_size, found.cut_is_input, found.affine_prefix) == (5, False, False)
    result = engine.compute_hessian(model, x, objective=objective, method="graph")
    assert result.method is Algorithm.GRAPH_CUT
    # auto keeps the structured patches for a convolutional head (faster there).
    automatic = engine.compute_hessian(model, x, objective=objective)
    assert automatic.method is Algorithm.STRUCTURED

    def loss(sample: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(sample.unsqueeze(0)), label.unsqueeze(0))

    want = torch.stack([func_hessian(loss)(x[b], target[b]).reshape(64, 64) for b in range(2)])
    _assert_close(result.selected, want)
    _assert_close(automatic.selected, want)


def test_raw_output_of_a_piecewise_linear_network_is_zero_without_work() -> None:
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2)).double().eval()
    x = torch.randn(4, 5, dtype=torch.float64)
    found = _plan(model, x, output_index=0)
    assert found.is_zero and not found.curvature
    result = engine.compute_hessian(model, x, output_index=0)
    assert result.method is Algorithm.GRAPH_ZERO
    assert torch.equal(result.selected, torch.zeros(4, 5, 5, dtype=torch.float64))


def test_both_executors_agree_with_torch_func() -> None:
    torch.manual_seed(2)
    model = _Residual().double().eval().requires_grad_(False)
    x = torch.randn(2, 2, 12, dtype=torch.float64)
    found = _plan(model, x, output_index=[0, 2])
    targets = torch.zeros(2, dtype=torch.float64)
    by_direct = direct.hessian(found, x, targets, 2)[0]
    by_vmap = vmap_executor.hessian(found, x, targets, 2)
    for index, column in ((0, 0), (2, 1)):
        want = _reference(model, x, index)
        _assert_close(by_direct[:, column], want)
        _assert_close(by_vmap[:, column], want)


def test_changing_a_weight_in_place_makes_a_new_plan() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double().eval()
    x = torch.randn(2, 3, dtype=torch.float64)
    before = engine.compute_hessian(model, x, output_index=0, method="graph").selected
    first_plan = _plan(model, x, output_index=0)
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    after = engine.compute_hessian(model, x, output_index=0, method="graph").selected
    assert _plan(model, x, output_index=0) is not first_plan
    assert not torch.allclose(before, after)
    _assert_close(after, _reference(model, x, 0))


class _Branching(nn.Module):
    """Data-dependent control flow: no single graph computes it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return torch.tanh(x).sum(-1, keepdim=True)
        return torch.sin(x).sum(-1, keepdim=True)


def test_data_dependent_control_flow_ends_in_the_row_loop_and_says_why() -> None:
    """Neither a graph nor vmap can follow a branch on values; the row loop can."""
    x = torch.tensor([[0.3, 0.2], [-0.4, -0.1]], dtype=torch.float64)
    found = graph_plan_for(_Branching(), x, output_index=0)
    assert isinstance(found, Unsupported) and "capture failed" in found.reason
    report = engine.graph_report(_Branching(), x, output_index=0)
    assert report["supported"] is False and "data-dependent" in str(report["reason"])
    result = engine.compute_hessian(_Branching(), x, output_index=0)
    assert result.method is Algorithm.ROW_LOOP
    _assert_close(result.selected, _reference(_Branching(), x, 0))
    with pytest.raises(ValueError, match="method='graph' cannot run this model"):
        engine.compute_hessian(_Branching(), x, output_index=0, method="graph")


class _LongCumprod(nn.Module):
    """``cumprod`` has no rule and is too large for the dense one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumprod(torch.tanh(x), dim=-1)[:, -1:]


def test_a_node_without_a_rule_is_named_in_the_report() -> None:
    x = torch.rand(1, 1100, dtype=torch.float64)
    report = engine.graph_report(_LongCumprod(), x, output_index=0)
    assert report["supported"] is False
    assert "cumprod" in str(report["fallback_node"])
    small = torch.rand(2, 6, dtype=torch.float64)
    covered = engine.graph_report(_LongCumprod(), small, output_index=0)
    assert covered["supported"] is True and covered["executor"] == "vmap"
    result = engine.compute_hessian(_LongCumprod(), small, output_index=0)
    assert result.method.path is EnginePath.GRAPH
    _assert_close(result.selected, _reference(_LongCumprod(), small, 0))
