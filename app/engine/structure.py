"""What a network's modules say about its input Hessian, without computing it.

A network built only from affine maps has an identically zero input Hessian; one whose
only non-linearities are piecewise linear (ReLU, max-pool, ...) has a Hessian that is zero
almost everywhere. Saying so up front removes the two classic surprises: an autograd
error for a linear model and silent zeros for a ReLU net.
"""

from __future__ import annotations

from enum import Enum

from torch import nn

AFFINE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
)
PIECEWISE_LINEAR_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Hardtanh,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)
CONTAINERS: tuple[type[nn.Module], ...] = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class Curvature(str, Enum):
    """How a network's own (output-index) input Hessian behaves everywhere."""

    AFFINE = "affine"  # identically zero
    PIECEWISE_LINEAR = "piecewise_linear"  # zero almost everywhere
    GENERAL = "general"  # anything else: compute it


def classify(model: nn.Module) -> Curvature:
    """Classify a network from its module types.

    Only networks made entirely of known container, affine and piecewise-linear modules
    (and that define no ``forward`` of their own besides those containers) are classed as
    affine or piecewise linear; any other module makes the answer ``GENERAL``, because its
    forward could do anything.
    """
    piecewise = False
    for module in model.modules():
        if type(module) in CONTAINERS:
            continue
        if isinstance(module, AFFINE_MODULES):
            continue
        if isinstance(module, PIECEWISE_LINEAR_MODULES):
            piecewise = True
            continue
        return Curvature.GENERAL
    return Curvature.PIECEWISE_LINEAR if piecewise else Curvature.AFFINE
