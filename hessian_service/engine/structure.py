"""What a network's modules or operators say about its input Hessian, without computing it.

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
# The same two classes as ATen operator names, for graphs (TorchScript, torch.export).
# Operators whose output is affine in their tensor inputs (or that only look at shapes).
AFFINE_OPS = frozenset(
    [
        "linear",
        "conv1d",
        "conv2d",
        "conv3d",
        "_convolution",
        "convolution",
        "addmm",
        "batch_norm",
        "_native_batch_norm_legit_no_training",
        "avg_pool1d",
        "avg_pool2d",
        "avg_pool3d",
        "adaptive_avg_pool1d",
        "adaptive_avg_pool2d",
        "mean",
        "sum",
        "add",
        "sub",
        "neg",
        "view",
        "reshape",
        "flatten",
        "permute",
        "transpose",
        "t",
        "contiguous",
        "squeeze",
        "unsqueeze",
        "expand",
        "cat",
        "stack",
        "select",
        "slice",
        "clone",
        "alias",
        "detach",
        "dropout",
        "feature_dropout",
        "alpha_dropout",
        "size",
        "dim",
        "len",
        "ne",
        "eq",
        "Int",
        "Float",
        "__is__",
        "__isnot__",
        "format",
        "warn",
        "_assert",
        "_guards_fn",
        "sym_size",
        "lift_fresh_copy",
    ]
)
PIECEWISE_LINEAR_OPS = frozenset(
    [
        "relu",
        "relu_",
        "relu6",
        "leaky_relu",
        "hardtanh",
        "hardtanh_",
        "prelu",
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "max_pool2d_with_indices",
        "adaptive_max_pool1d",
        "adaptive_max_pool2d",
        "clamp",
        "abs",
    ]
)


class Curvature(str, Enum):
    """How a network's own (output-index) input Hessian behaves everywhere."""

    AFFINE = "affine"  # identically zero
    PIECEWISE_LINEAR = "piecewise_linear"  # zero almost everywhere
    GENERAL = "general"  # anything else: compute it


# (class, kinds) -> whether the class is one of the kinds and keeps that kind's forward.
_KEEPS_FORWARD: dict[tuple[type[nn.Module], tuple[type[nn.Module], ...]], bool] = {}


def computes_as(module: nn.Module, kinds: tuple[type[nn.Module], ...]) -> bool:
    """True when ``module`` is one of torch's ``kinds`` and computes exactly what that
    class does: a subclass that keeps its ``forward``, with no forward hooks of its own.

    What the engine knows about a module's math (a Linear's weight, a closed-form
    derivative, "affine") holds only then: an overridden forward or a hook that changes
    the output makes any such claim wrong, silently. Hooks registered for every module
    at once are not checked: tools that observe modules install them
    (``FlopCounterMode``'s module tracker does).
    """
    if module._forward_hooks or module._forward_pre_hooks:
        return False
    key = (type(module), kinds)
    if key not in _KEEPS_FORWARD:
        base = next((kind for kind in kinds if isinstance(module, kind)), None)
        _KEEPS_FORWARD[key] = base is not None and type(module).forward is base.forward
    return _KEEPS_FORWARD[key]


def classify(model: nn.Module) -> Curvature:
    """Classify a network from its module types.

    Only networks made entirely of known container, affine and piecewise-linear modules,
    each computing what its torch class does (``computes_as``), are classed as affine or
    piecewise linear; any other module makes the answer ``GENERAL``, because its forward
    could do anything.
    """
    piecewise = False
    for module in model.modules():
        if computes_as(module, CONTAINERS):
            continue
        if computes_as(module, AFFINE_MODULES):
            continue
        if computes_as(module, PIECEWISE_LINEAR_MODULES):
            piecewise = True
            continue
        return Curvature.GENERAL
    return Curvature.PIECEWISE_LINEAR if piecewise else Curvature.AFFINE


def classify_ops(ops: set[str]) -> Curvature:
    """Classify a graph from the ATen operator names it calls (``AFFINE_OPS``,
    ``PIECEWISE_LINEAR_OPS``); any other operator makes the answer ``GENERAL``."""
    if not ops <= AFFINE_OPS | PIECEWISE_LINEAR_OPS:
        return Curvature.GENERAL
    return Curvature.PIECEWISE_LINEAR if ops & PIECEWISE_LINEAR_OPS else Curvature.AFFINE
