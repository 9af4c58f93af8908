"""Pure derivative math on tensors: no HTTP, no settings, only torch."""

from hessian_service.engine.api import (
    AUTODIFF_LOCK,
    METHODS,
    DerivativeResult,
    SecondOrder,
    compute_hessian,
    compute_jacobian,
    graph_report,
    graph_second_order,
    hessian,
    jacobian,
)
from hessian_service.engine.methods import Algorithm, DerivativeKind, EnginePath
from hessian_service.engine.objectives import Objective, ObjectiveKind
from hessian_service.engine.planner import Plan
from hessian_service.engine.structure import Curvature, classify, classify_ops

__all__ = [
    "AUTODIFF_LOCK",
    "METHODS",
    "Algorithm",
    "Curvature",
    "DerivativeKind",
    "DerivativeResult",
    "EnginePath",
    "Objective",
    "ObjectiveKind",
    "Plan",
    "SecondOrder",
    "classify",
    "classify_ops",
    "compute_hessian",
    "compute_jacobian",
    "graph_report",
    "graph_second_order",
    "hessian",
    "jacobian",
]
