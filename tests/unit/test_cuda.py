"""On CUDA, both engine paths equal the CPU float64 answer (skipped without a GPU).

Tolerances: float64 on CUDA 1e-10 absolute against CPU float64 (different kernels, same
precision); float32 on CUDA 1e-4 relative to the largest entry.
"""

from __future__ import annotations

import pytest
import torch

from hessian_service import engine
from hessian_service.engine import Objective
from hessian_service.repository.zoo import build

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("name", ["mlp_tanh", "digits_cnn", "quadratic4"])
@pytest.mark.parametrize("method", ["auto", "generic"])
def test_cuda_matches_cpu_float64(name: str, method: str) -> None:
    torch.manual_seed(0)
    model = build(name).eval().requires_grad_(False)
    shape = (4,) if name == "quadratic4" else (1, 28, 28)
    x = torch.rand(3, *shape, dtype=torch.float64)
    cpu = engine.hessian(model.double(), x, output_index=[0, 2], method=method)
    gpu64 = engine.hessian(model.double().cuda(), x.cuda(), output_index=[0, 2], method=method)
    assert gpu64.is_cuda
    assert float((gpu64.cpu() - cpu).abs().max()) <= 1e-10
    gpu32 = engine.hessian(
        model.float().cuda(), x.float().cuda(), output_index=[0, 2], method=method
    )
    scale = float(cpu.abs().max()) or 1.0
    assert float((gpu32.double().cpu() - cpu).abs().max()) / scale <= 1e-4
    objective = Objective("cross_entropy", target=torch.tensor(1))
    if name != "quadratic4":
        loss_cpu = engine.hessian(model.double().cpu(), x, objective=objective, method=method)
        loss_gpu = engine.hessian(
            model.double().cuda(),
            x.cuda(),
            objective=Objective("cross_entropy", target=torch.tensor(1).cuda()),
            method=method,
        )
        assert float((loss_gpu.cpu() - loss_cpu).abs().max()) <= 1e-10
        jac_cpu = engine.jacobian(model.double().cpu(), x, method=method)
        jac_gpu = engine.jacobian(model.double().cuda(), x.cuda(), method=method)
        assert float((jac_gpu.cpu() - jac_cpu).abs().max()) <= 1e-10
