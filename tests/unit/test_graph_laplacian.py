"""The forward-Laplacian pass's chunking and progress (``engine.graph_second_order``):
its values on every architecture are checked in ``test_graph_table.py``; here a budget of
three input columns forces several passes and sample chunks, whose sums must still equal
the dense float64 diagonal (1e-10 relative), and a cancelled progress stops the pass."""

from __future__ import annotations

import pytest
import torch

from bench.architectures import by_name
from hessian_service.engine import graph_second_order
from hessian_service.engine.api import LAPLACIAN_WORKING_SHARE, graph_plan_for
from hessian_service.engine.graph import laplacian
from hessian_service.engine.graph.plan import GraphPlan
from hessian_service.engine.progress import Cancelled, Progress
from tests.unit.operators_helpers import dense_diagonals

TOLERANCE = 1e-10


def _model_and_inputs() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = by_name("residual_mlp").build().double().eval()
    return model, torch.randn(4, 16, dtype=torch.float64)


def _column_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    found = graph_plan_for(model, x, output_index=0)
    assert isinstance(found, GraphPlan)
    return laplacian.bytes_per_column(found, x.element_size())


def test_a_small_budget_sums_several_passes_to_the_dense_diagonal() -> None:
    model, x = _model_and_inputs()
    # three columns of one sample, two tangents each, in the columns' share of the budget
    budget = LAPLACIAN_WORKING_SHARE * 3 * 2 * _column_bytes(model, x)
    progress = Progress()
    result = graph_second_order(
        model, x, trace=False, output_index=0, memory_budget_bytes=budget, progress=progress
    )
    assert result is not None
    assert result.columns == 3 and result.passes == 4 * 6  # 4 samples x ceil(16 / 3) passes
    expected = dense_diagonals(model, x, 0)
    assert float((result.values - expected).abs().max()) <= TOLERANCE * float(expected.abs().max())
    trace = graph_second_order(model, x, trace=True, output_index=0, memory_budget_bytes=budget)
    assert trace is not None
    assert torch.allclose(trace.values, expected.sum(-1), rtol=TOLERANCE, atol=0)
    snapshot = progress.snapshot()
    assert snapshot.done == snapshot.total == 4 * 16


def test_a_cancelled_progress_stops_the_pass() -> None:
    model, x = _model_and_inputs()
    progress = Progress()
    progress.cancel()
    with pytest.raises(Cancelled):
        graph_second_order(model, x, trace=True, output_index=0, progress=progress)
