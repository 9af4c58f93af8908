"""Shared pieces of the operator tests: bundled models with their trained weights, dense
float64 references from ``torch.func`` alone, one torch thread."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hessian_service.repository as repository
from hessian_service.repository.zoo import build

MODELS = Path(repository.__file__).parent / "models"


def bundled(name: str) -> nn.Module:
    """A bundled zoo model with its shipped weights, float64, frozen."""
    model = build(name)
    model.load_state_dict(load_file(str(MODELS / name / "weights.safetensors")))
    return model.double().eval().requires_grad_(False)


def scalar_of(model: nn.Module, shape: tuple[int, ...], index: int) -> Callable[..., torch.Tensor]:
    """One sample's flat inputs -> raw output ``index`` (the reference's scalar)."""

    def scalar(flat: torch.Tensor) -> torch.Tensor:
        value: torch.Tensor = model(flat.reshape(1, *shape)).reshape(-1)[index]
        return value

    return scalar


def dense_diagonals(model: nn.Module, x: torch.Tensor, index: int) -> torch.Tensor:
    """``[B, *sample_shape]``: the diagonals of ``dense_hessians`` (no engine code)."""
    return torch.diagonal(dense_hessians(model, x, index), dim1=-2, dim2=-1).reshape(x.shape)


def dense_hessians(model: nn.Module, x: torch.Tensor, index: int) -> torch.Tensor:
    """``[B, n, n]`` by ``torch.func.jacfwd(jacrev)`` per sample: no engine code (the math
    attention kernel, whose backward has a derivative, as the tests of the graph table)."""
    shape = tuple(x.shape[1:])
    second = torch.func.jacfwd(torch.func.jacrev(scalar_of(model, shape, index)))
    with sdpa_kernel(SDPBackend.MATH):
        return torch.stack([second(sample.reshape(-1)) for sample in x])


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` (the tests' 1e-10 criterion)."""
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: on 2 shared cores, two threads per process make products 10x
    slower under load (measured); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
