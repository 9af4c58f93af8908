"""The operators' plans (engine.operators.plan) against measured runs, and cancellation.

Products: a plan's count equals what the run counts (eigen: at most). Bytes: the peak
resident memory an HVP run adds, measured in a fresh process as test_memory_budget.py
does (VmHWM reset after a warm-up), stays within the plan's working bytes plus the
result and 64 MiB of allocator and torch slack, and the plan never exceeds the budget.
Cancellation: a ``Progress`` cancelled after its first chunk stops every operator with
``Cancelled`` and the done counter has risen.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest
import torch
from torch import nn

from hessian_service.engine import operators as ops
from hessian_service.engine.operators.selection import prepare
from hessian_service.engine.progress import Cancelled, Progress
from tests.unit.operators_helpers import bundled, one_thread

pytestmark = pytest.mark.usefixtures("one_thread")
__all__ = ["one_thread"]
MiB = 1 << 20


def _plan(
    kind: str, model: nn.Module, x: torch.Tensor, budget: int, **extra: int | bool
) -> ops.OperatorPlan:
    setup = prepare("test", model, x, output_index=2, objective=None, one_scalar=True)
    return ops.plan_operator(
        kind,
        n=setup.n,
        batch=setup.batch,
        activation_numel=setup.activation_numel,
        itemsize=setup.itemsize,
        memory_budget_bytes=budget,
        **extra,  # type: ignore[arg-type]
    )


def test_planned_products_equal_the_counted_ones() -> None:
    model = bundled("mlp_tanh")
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    vectors = torch.randn(2, 3, 1, 28, 28, dtype=torch.float64)
    run = ops.hessian_vector_products(model, x, vectors, output_index=2, memory_budget_bytes=MiB)
    plan = _plan("hvp", model, x, MiB, vectors=3)
    assert (plan.products, plan.fits) == (run.products, True) == (6, True)
    # The plan knows sizes, not graphs: where it plans the HVP basis, the graph engine's
    # forward-Laplacian pass answers instead when it can run the model, with the same
    # count (n columns per sample) inside the same budget.
    for budget, method, ran in (
        (1 << 30, "dense", "dense"),
        (8 * MiB, "hvp-basis", "forward-laplacian"),
    ):
        plan = _plan("diagonal", model, x, budget)
        run_d = ops.hessian_diagonal(model, x, output_index=2, memory_budget_bytes=budget)
        assert (plan.method, plan.products) == (method, 1568)
        assert (run_d.method, run_d.products) == (ran, 1568)
    plan = _plan("trace", model, x, 1 << 30, exact=False, max_products=40)
    run_t = ops.hessian_trace(model, x, output_index=2, exact=False, max_products=40)
    assert (plan.method, plan.products) == (run_t.method, run_t.products) == ("hutch++", 40)
    plan = _plan("eigen", model, x, 1 << 30, k=3)
    run_e = ops.hessian_eigen(model, x, output_index=2, k=3)
    assert run_e.products <= plan.products and plan.method == "lanczos"
    tight = _plan("diagonal", model, x, 4096, exact=True)
    assert not tight.fits and "exact=true" in tight.reason
    assert "diagonal" in ops.fitting_kinds(
        n=784, batch=2, activation_numel=2000, itemsize=8, memory_budget_bytes=8 * MiB
    )


SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from hessian_service.engine import operators as ops
    from hessian_service.engine.operators.selection import prepare
    from hessian_service.repository.zoo import build

    budget = int(sys.argv[1])
    torch.manual_seed(0)
    model = build("digits_cnn").double().eval().requires_grad_(False)
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    vectors = torch.randn(4, 16, 1, 28, 28, dtype=torch.float64)
    ops.hessian_vector_products(model, x[:1], vectors[:1, :1], output_index=2)  # warm-up
    def status(field):
        with open("/proc/self/status") as lines:
            for line in lines:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    base = status("VmRSS")
    result = ops.hessian_vector_products(model, x, vectors, output_index=2,
                                         memory_budget_bytes=budget)
    peak = status("VmHWM")
    setup = prepare("t", model, x, output_index=2, objective=None, one_scalar=True)
    plan = ops.plan_operator("hvp", n=784, batch=4, activation_numel=setup.activation_numel,
                             itemsize=8, memory_budget_bytes=budget, vectors=16)
    print(json.dumps({"extra": peak - base, "plan": plan.bytes, "result": plan.result_bytes,
                      "products": result.products, "planned": plan.products}))
    """
)


def test_planned_bytes_bound_the_measured_peak() -> None:
    budget = 16 * MiB
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(budget)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env={"PATH": "", "MALLOC_ARENA_MAX": "1"},
    )
    measured = json.loads(completed.stdout.strip().splitlines()[-1])
    assert measured["products"] == measured["planned"] == 64
    assert measured["plan"] <= budget
    assert measured["extra"] <= measured["plan"] + measured["result"] + 64 * MiB, measured


class CancelAfterFirstChunk(Progress):
    """A real ``Progress`` whose owner cancels it as soon as the first chunk is counted
    (what ``DELETE /jobs/{id}`` does, without the timing of a second thread)."""

    def advance(self, products: int = 1) -> None:
        super().advance(products)
        self.cancel()


def _operators(model: nn.Module, x: torch.Tensor) -> dict[str, Callable[[Progress], object]]:
    vectors = torch.randn(x.shape[0], 4, *x.shape[1:], dtype=torch.float64)
    budget = 1  # one pair per chunk: many chunks
    return {
        "hvp": lambda p: ops.hessian_vector_products(
            model, x, vectors, output_index=2, memory_budget_bytes=budget, progress=p
        ),
        "jvp": lambda p: ops.jacobian_vector_products(
            model, x, vectors, memory_budget_bytes=budget, progress=p
        ),
        "vjp": lambda p: ops.vector_jacobian_products(
            model,
            x,
            torch.randn(x.shape[0], 4, 10, dtype=torch.float64),
            memory_budget_bytes=budget,
            progress=p,
        ),
        "diagonal-dense": lambda p: ops.hessian_diagonal(
            model, x, output_index=2, memory_budget_bytes=12 * MiB, progress=p
        ),
        "diagonal-by-columns": lambda p: ops.hessian_diagonal(
            model, x, output_index=2, memory_budget_bytes=MiB, exact=True, progress=p
        ),
        "trace-stochastic": lambda p: ops.hessian_trace(
            model, x, output_index=2, exact=False, memory_budget_bytes=MiB, progress=p
        ),
        "eigen": lambda p: ops.hessian_eigen(model, x, output_index=2, progress=p),
    }


@pytest.mark.parametrize("name", list(_operators(nn.Identity(), torch.zeros(1, 1))))
def test_cancelled_progress_stops_every_operator(name: str) -> None:
    model = bundled("mlp_tanh")
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    progress = CancelAfterFirstChunk()
    with pytest.raises(Cancelled):
        _operators(model, x)[name](progress)
    snapshot = progress.snapshot()
    assert 0 < snapshot.done < snapshot.total, snapshot
