"""Trusted model architectures that ship with the service.

A bundled model's manifest names one of these builders; its weights come from a
safetensors file, so loading a bundled model never executes user-supplied code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class Quadratic(nn.Module):
    """``f(x) = x * x * coeff``, elementwise: the textbook case with a known Hessian."""

    def __init__(self, size: int = 4) -> None:
        super().__init__()
        self.register_buffer("coeff", torch.arange(size, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x * self.get_buffer("coeff")


def linear4() -> nn.Module:
    """``nn.Linear(4, 1)``: an affine model, whose Hessian is identically zero."""
    return nn.Linear(4, 1)


def quadratic4() -> nn.Module:
    """``f(x) = x * x * arange(4)`` on 4 inputs, 4 outputs."""
    return Quadratic(4)


def _mlp(activation: type[nn.Module]) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 256),
        activation(),
        nn.Linear(256, 256),
        activation(),
        nn.Linear(256, 10),
    )


def mlp_tanh() -> nn.Module:
    """784-256-256-10 with tanh on a ``[1, 28, 28]`` image."""
    return _mlp(nn.Tanh)


def mlp_relu() -> nn.Module:
    """784-256-256-10 with ReLU: its input Hessian is zero almost everywhere."""
    return _mlp(nn.ReLU)


def digits_cnn() -> nn.Module:
    """Small CNN on ``[1, 28, 28]`` images: conv 3x3, tanh, conv 3x3 stride 2, tanh, linear."""
    return nn.Sequential(
        nn.Conv2d(1, 8, kernel_size=3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 16, kernel_size=3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(16 * 14 * 14, 10),
    )


def photo_digits_cnn() -> nn.Module:
    """CNN on ``[3, 64, 64]`` colour images (12,288 inputs): three conv 3x3 stride 2 with
    tanh (64 -> 32 -> 16 -> 8), then linear to 10 classes.

    The large-input model: its dense float32 input Hessian is 604 MB, so it is served by
    Hessian-vector products, diagonals, traces and eigenpairs rather than the matrix.
    tanh keeps the input Hessian non-zero.
    """
    return nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 16, kernel_size=3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "linear4": linear4,
    "quadratic4": quadratic4,
    "mlp_tanh": mlp_tanh,
    "mlp_relu": mlp_relu,
    "digits_cnn": digits_cnn,
    "photo_digits_cnn": photo_digits_cnn,
}


def build(architecture: str) -> nn.Module:
    """Instantiate a zoo architecture by name (``KeyError`` names the known ones)."""
    try:
        builder = ARCHITECTURES[architecture]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise KeyError(f"unknown architecture {architecture!r}; known: {known}") from None
    return builder()
