"""Matrix-free derivative operators: products, diagonals, traces and eigenpairs.

Past a few thousand inputs a dense input Hessian (``n^2`` numbers) is out of reach; what
people compute instead is built here on Hessian-vector products (forward-over-reverse,
never forming ``H``) and Jacobian products, in chunks within a memory budget, under
``AUTODIFF_LOCK`` per chunk, counted and cancellable through ``engine.progress``. Every
result carries the model's ``output`` and the ``products`` it cost; ``plan_operator``
estimates both before any work.
"""

from hessian_service.engine.operators.diagonal import hessian_diagonal
from hessian_service.engine.operators.eigen import hessian_eigen
from hessian_service.engine.operators.plan import (
    KINDS,
    OperatorPlan,
    fitting_kinds,
    plan_operator,
)
from hessian_service.engine.operators.products import (
    hessian_vector_products,
    jacobian_vector_products,
    vector_jacobian_products,
)
from hessian_service.engine.operators.results import (
    EigenResult,
    Estimate,
    OperatorTooLarge,
    ProductResult,
)
from hessian_service.engine.operators.trace import hessian_trace

__all__ = [
    "KINDS",
    "EigenResult",
    "Estimate",
    "OperatorPlan",
    "OperatorTooLarge",
    "ProductResult",
    "fitting_kinds",
    "hessian_diagonal",
    "hessian_eigen",
    "hessian_trace",
    "hessian_vector_products",
    "jacobian_vector_products",
    "plan_operator",
    "vector_jacobian_products",
]
