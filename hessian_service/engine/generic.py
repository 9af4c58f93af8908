"""The generic derivative path: torch.func transforms over any differentiable module.

No Python loop over rows: Jacobians are ``vmap``-ed vector-Jacobian (reverse) or
Jacobian-vector (forward) products over basis vectors, Hessians are forward-over-reverse
(``jvp`` of ``jacrev``) over basis vectors, and the batch is one more ``vmap``. Chunk
sizes come from a ``Plan`` and bound the memory in use; they never change the result.

Every transform runs in ``differentiable.derivative_mode``: grad mode on even under a
caller's ``torch.no_grad()`` (SiLU's and Mish's backward then have forward-mode rules,
so their Hessians are forward-over-reverse), the math attention kernel, functional
recurrent layers and unoptimized TorchScript, so GRU, LSTM and attention models work;
what still fails (a TorchScript graph's own GRU or fused attention op) is retried once
with torch's Python decompositions (``differentiable.run_differentiable``). Results are
detached.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import jacrev, jvp, vjp, vmap

from hessian_service.engine.differentiable import run_differentiable
from hessian_service.engine.methods import Algorithm
from hessian_service.engine.planner import Plan

# One sample (shaped like the model's per-sample input) and its target row -> [k] scalars.
ScalarsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# The same, also returning the model's flat output (as auxiliary data, not differentiated).
ScalarsWithOutputFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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
    reverse = plan.method is Algorithm.REVERSE_OVER_REVERSE

    def per_sample(sample: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        def flat_scalars(flat: torch.Tensor) -> torch.Tensor:
            return scalars(flat.reshape(sample_shape), target)

        gradient = jacrev(flat_scalars)  # flat [n] -> [k, n]
        flat = sample.reshape(-1)
        if reverse:
            rows: torch.Tensor = jacrev(gradient, chunk_size=plan.basis_chunk_or_all)(flat)
            return rows  # [k, n_i, n_j]

        def column(direction: torch.Tensor) -> torch.Tensor:
            return _directional_derivative(gradient, flat, direction)  # d(grad)/dx_j: [k, n]

        columns = vmap(column, chunk_size=plan.basis_chunk_or_all)(_basis(n, flat))  # [n_j, k, n_i]
        hessian_columns: torch.Tensor = columns.permute(1, 2, 0)
        return hessian_columns

    matrices: torch.Tensor = run_differentiable(lambda: vmap(per_sample)(x, targets))
    return matrices.detach()  # callers chunk the samples (plan.batch_chunk)


def jacobian(
    scalars: ScalarsWithOutputFn, x: torch.Tensor, targets: torch.Tensor, plan: Plan
) -> tuple[torch.Tensor, torch.Tensor]:
    """Jacobians ``[B, k, n]`` of the ``k`` scalars of each sample of ``x``, and the
    model's flat output ``[B, m]`` from the same pass.

    ``plan.method`` picks reverse mode (one vector-Jacobian product per output row) or
    forward mode (one Jacobian-vector product per input).
    """
    sample_shape = x.shape[1:]
    n = x[0].numel()
    forward = plan.method is Algorithm.FORWARD

    def per_sample(sample: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def flat_scalars(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return scalars(flat.reshape(sample_shape), target)

        flat = sample.reshape(-1)
        if not forward:
            rows, output = jacrev(flat_scalars, chunk_size=plan.basis_chunk_or_all, has_aux=True)(
                flat
            )
            return rows, output

        def column(direction: torch.Tensor) -> torch.Tensor:
            return _directional_derivative(lambda z: flat_scalars(z)[0], flat, direction)

        columns: torch.Tensor = vmap(column, chunk_size=plan.basis_chunk_or_all)(_basis(n, flat))
        return columns.transpose(0, 1), flat_scalars(flat)[1]

    matrix, output = run_differentiable(
        lambda: vmap(per_sample, chunk_size=plan.batch_chunk_or_all)(x, targets)
    )
    return matrix.detach(), output.detach()


def jacobian_of_outputs(
    outputs: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    cotangents: torch.Tensor,
    plan: Plan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[B, k, n]`` of the input Jacobian picked by ``cotangents [k, m]`` (one-hot
    rows), and the flat outputs ``[B, m]``, from one forward pass per sample: the vjp's
    primal output is the model's output, so nothing runs twice."""
    sample_shape = x.shape[1:]

    def per_sample(sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pulled = vjp(lambda flat: outputs(flat.reshape(sample_shape)), sample.reshape(-1))
        output, pullback = pulled[0], pulled[1]
        (rows,) = vmap(pullback, chunk_size=plan.basis_chunk_or_all)(cotangents)
        return rows, output

    rows, output = run_differentiable(
        lambda: vmap(per_sample, chunk_size=plan.batch_chunk_or_all)(x)
    )
    return rows.detach(), output.detach()
