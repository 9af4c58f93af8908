"""The last-resort derivative path: plain ``torch.autograd``, one row at a time.

Some models cannot go through ``torch.func`` transforms (a TorchScript model with
data-dependent control flow fails under ``vmap``, for one). This path needs nothing but
reverse-mode autograd: per sample, one ``autograd.grad`` per Jacobian row and, for a
Hessian, one more per row of the gradient. It is slow (the classic loop the service
exists to avoid) and used only when the model's capability probe found that the
vectorized paths do not work. Unused inputs give exact zeros, never an error. It runs in
``differentiable.derivative_mode`` (the math attention kernel, whose backward has a
derivative of its own; unoptimized TorchScript), so that a second ``autograd.grad``
works for attention too, and what still fails (a TorchScript graph traced with the fused
attention ops) is retried with torch's Python decompositions
(``differentiable.run_differentiable``).
"""

from __future__ import annotations

import torch

from hessian_service.engine.differentiable import run_differentiable
from hessian_service.engine.generic import ScalarsFn, ScalarsWithOutputFn


def gradient(
    output: torch.Tensor,
    wrt: torch.Tensor,
    direction: torch.Tensor | None = None,
    *,
    create_graph: bool,
) -> torch.Tensor:
    """``d(direction . output) / d wrt`` by autograd (``direction`` None: a scalar
    output), exact zeros where the output does not depend on ``wrt``."""
    if not output.requires_grad:  # the output does not depend on the input at all
        return torch.zeros_like(wrt)
    (found,) = torch.autograd.grad(
        output, wrt, direction, retain_graph=True, create_graph=create_graph, allow_unused=True
    )
    return torch.zeros_like(wrt) if found is None else found


def hessian(scalars: ScalarsFn, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Hessians ``[B, k, n, n]`` of the ``k`` scalars of each sample of ``x`` (``[B, *S]``)."""
    sample_shape = x.shape[1:]

    def compute() -> torch.Tensor:
        per_sample = []
        for sample, target in zip(x, targets, strict=True):
            flat = sample.reshape(-1).detach().requires_grad_(True)
            values = scalars(flat.reshape(sample_shape), target)
            matrices = []
            for value in values:
                first = gradient(value, flat, create_graph=True)
                rows = [gradient(entry, flat, create_graph=False) for entry in first]
                matrices.append(torch.stack(rows))
            per_sample.append(torch.stack(matrices))
        return torch.stack(per_sample)

    return run_differentiable(compute).detach()


def jacobian(
    scalars: ScalarsWithOutputFn, x: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Jacobians ``[B, k, n]`` of the ``k`` scalars of each sample, and the flat outputs."""
    sample_shape = x.shape[1:]

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        matrices, outputs = [], []
        for sample, target in zip(x, targets, strict=True):
            flat = sample.reshape(-1).detach().requires_grad_(True)
            values, output = scalars(flat.reshape(sample_shape), target)
            matrices.append(torch.stack([gradient(v, flat, create_graph=False) for v in values]))
            outputs.append(output.detach())
        return torch.stack(matrices), torch.stack(outputs)

    matrices, outputs = run_differentiable(compute)
    return matrices.detach(), outputs
