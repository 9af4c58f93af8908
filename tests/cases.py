"""One table of seeded float64 cases for the engine tests, turned into fixtures.

Each case builds a small network (every supported layer and non-linearity appears in at
least one) and an input batch; the references are computed independently with plain
autograd (``torch.autograd.functional``) or finite differences.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hessian_service.repository.zoo import Quadratic


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    sample_shape: tuple[int, ...]
    outputs: int


def _mlp(activation: type[nn.Module], n: int = 6, width: int = 5, out: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Linear(n, width),
        activation(),
        nn.Linear(width, width),
        activation(),
        nn.Linear(width, out),
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 4),
    )


def _conv1d_pool() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 3, 3),
        nn.Softplus(),
        nn.AvgPool1d(2),
        nn.Flatten(),
        nn.Linear(3 * 3, 2),
    )


def _batchnorm() -> nn.Module:
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.SiLU(), nn.Linear(4, 3))
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm1d)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return model


CASES: list[Case] = [
    Case("mlp_tanh", lambda: _mlp(nn.Tanh), (6,), 3),
    Case("mlp_sigmoid", lambda: _mlp(nn.Sigmoid), (6,), 3),
    Case("mlp_gelu_wide", lambda: _mlp(nn.GELU, n=4, width=9, out=2), (4,), 2),
    Case("mlp_elu_deep", lambda: nn.Sequential(_mlp(nn.ELU), nn.Tanh(), nn.Linear(3, 3)), (6,), 3),
    Case("cnn_tanh", _cnn, (1, 5, 5), 4),
    Case("conv1d_softplus_avgpool", _conv1d_pool, (2, 8), 2),
    Case("batchnorm_silu", _batchnorm, (5,), 3),
    Case("quadratic", lambda: Quadratic(4), (4,), 4),
]


def build_case(case: Case, seed: int = 0, batch: int = 3) -> tuple[nn.Module, torch.Tensor]:
    """The case's model (float64, eval, frozen) and a seeded input batch ``[batch, *S]``."""
    torch.manual_seed(seed)
    model = case.build().double().eval().requires_grad_(False)
    x = torch.randn(batch, *case.sample_shape, dtype=torch.float64)
    return model, x


def scalar_of(model: nn.Module, index: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """One sample -> output ``index`` of the flattened output, for autograd references."""
    return lambda sample: model(sample.unsqueeze(0)).reshape(-1)[index]


def reference_hessian(
    function: Callable[[torch.Tensor], torch.Tensor], sample: torch.Tensor
) -> torch.Tensor:
    """``torch.autograd.functional.hessian`` (double backward, no torch.func), as n x n."""
    n = sample.numel()
    return torch.autograd.functional.hessian(function, sample).reshape(n, n)


def finite_difference_hessian(
    function: Callable[[torch.Tensor], torch.Tensor], sample: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """Central differences of the autograd gradient, column by column, as n x n."""

    def gradient(at: torch.Tensor) -> torch.Tensor:
        at = at.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(function(at), at)
        return grad.reshape(-1)

    flat = sample.reshape(-1)
    columns = []
    for j in range(flat.numel()):
        step = torch.zeros_like(flat)
        step[j] = eps
        plus = gradient((flat + step).reshape(sample.shape))
        minus = gradient((flat - step).reshape(sample.shape))
        columns.append((plus - minus) / (2 * eps))
    return torch.stack(columns, dim=1)
