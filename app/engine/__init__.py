"""Pure derivative math on tensors: no HTTP, no settings, only torch."""

from app.engine.api import (
    AUTODIFF_LOCK,
    DerivativeResult,
    compute_hessian,
    compute_jacobian,
    hessian,
    jacobian,
)
from app.engine.objectives import Objective
from app.engine.planner import Plan
from app.engine.structure import Curvature, classify

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
