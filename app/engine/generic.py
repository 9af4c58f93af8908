"""The generic derivative path: torch.func transforms over any differentiable module.

No Python loop over rows: Jacobians are ``vmap``-ed vector-Jacobian (reverse) or
Jacobian-vector (forward) products over basis vectors, Hessians are forward-over-reverse
(``jvp`` of ``jacrev``) over basis vectors, and the batch is one more ``vmap``. Chunk
sizes come from a ``Plan`` and bound the memory in use; they never change the result.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import jacrev, jvp, vmap

from app.engine.planner import Plan

# One sample (shaped like the model's per-sample input) and its target row -> [k] scalars.
ScalarsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _directional_derivative(
    function: Callable[[torch.Tensor], torch.Tensor], at: torch.Tensor, direction: torch.Tensor
) -> torch.Tensor:
    """``d/dt function(at + t * direction)`` at ``t = 0``: one forward-mode pass."""
    tangent: torch.Tensor = jvp(function, (at,), (direction,))[1]
    return tangent


def _basis(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device)


def hessian(scalars: ScalarsFn, x: torch.Tensor, targets: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Hessians ``[B, k, n, n]`` of the ``k`` scalars of each sample of ``x`` (``[B, *S]``).

    Forward-over-reverse (a ``jvp`` of the gradient per basis vector) unless
    ``plan.method`` asks for reverse-over-reverse, which also works for operators that
    have no forward-mode derivative of their backward (SiLU's, for one).
    """
    sample_shape = x.shape[1:]
    n = x[0].numel()
    reverse = plan.method.endswith("reverse-over-reverse")

    def per_sample(sample: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        def flat_scalars(flat: torch.Tensor) -> torch.Tensor:
            return scalars(flat.reshape(sample_shape), target)

        gradient = jacrev(flat_scalars)  # flat [n] -> [k, n]
        flat = sample.reshape(-1)
        if reverse:
            rows: torch.Tensor = jacrev(gradient, chunk_size=plan.basis_chunk)(flat)
            return rows  # [k, n_i, n_j]

        def column(direction: torch.Tensor) -> torch.Tensor:
            return _directional_derivative(gradient, flat, direction)  # d(grad)/dx_j: [k, n]

        columns = vmap(column, chunk_size=plan.basis_chunk)(_basis(n, flat))  # [n_j, k, n_i]
        hessian_columns: torch.Tensor = columns.permute(1, 2, 0)
        return hessian_columns

    return vmap(per_sample, chunk_size=plan.batch_chunk)(x, targets)


def jacobian(
    scalars: ScalarsFn, x: torch.Tensor, targets: torch.Tensor, plan: Plan
) -> torch.Tensor:
    """Jacobians ``[B, k, n]`` of the ``k`` scalars of each sample of ``x``.

    ``plan.method`` picks reverse mode (one vector-Jacobian product per output row) or
    forward mode (one Jacobian-vector product per input).
    """
    sample_shape = x.shape[1:]
    n = x[0].numel()
    forward = plan.method.endswith("forward")

    def per_sample(sample: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        def flat_scalars(flat: torch.Tensor) -> torch.Tensor:
            return scalars(flat.reshape(sample_shape), target)

        flat = sample.reshape(-1)
        if not forward:
            rows: torch.Tensor = jacrev(flat_scalars, chunk_size=plan.basis_chunk)(flat)
            return rows

        def column(direction: torch.Tensor) -> torch.Tensor:
            return _directional_derivative(flat_scalars, flat, direction)

        columns: torch.Tensor = vmap(column, chunk_size=plan.basis_chunk)(_basis(n, flat))
        return columns.transpose(0, 1)

    return vmap(per_sample, chunk_size=plan.batch_chunk)(x, targets)
