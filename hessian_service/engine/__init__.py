"""Pure derivative math on tensors: no HTTP, no settings, only torch."""

from hessian_service.engine.api import (
    AUTODIFF_LOCK,
    DerivativeResult,
    compute_hessian,
    compute_jacobian,
    hessian,
    jacobian,
)
from hessian_service.engine.objectives import Objective
from hessian_service.engine.planner import Plan
from hessian_service.engine.structure import Curvature, classify

__all__ = [
    "AUTODIFF_LOCK",
    "Curvature",
    "DerivativeResult",
    "Objective",
    "Plan",
    "classify",
    "compute_hessian",
    "compute_jacobian",
    "hessian",
    "jacobian",
]
