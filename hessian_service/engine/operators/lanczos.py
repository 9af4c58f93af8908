"""Batched Lanczos with full reorthogonalization: extreme eigenpairs from products.

Why our own and not ``scipy.sparse.linalg.eigsh`` (ARPACK): every sample of a batch runs
its own Lanczos recurrence, and here all of them step together, so one Lanczos step is
one batched product for the whole batch (ARPACK solves one problem at a time, one vector
per call, on the CPU in float64); every product is counted as it is made, so
``max_products`` is a hard limit and the best Ritz pairs so far are returned when it
ends (ARPACK's ``maxiter`` counts restarts, not products); a ``Cancelled`` raised in a
product leaves nothing half-done in a Fortran state machine; and it runs on whatever
device and dtype the model does, with no runtime dependency beyond torch.

The cost of that simplicity: no restarts, so the Krylov basis (``B x K x n``) is kept,
and its size bounds the steps (``plan.krylov_steps``); full reorthogonalization (Gram-
Schmidt twice against the whole basis, "twice is enough") keeps the basis orthonormal
to rounding, so no spurious copies of converged eigenvalues appear, at ``O(K n)`` per
step, small next to a product. Like any single-vector Krylov method it finds one copy
of a repeated eigenvalue per breakdown: on a breakdown (an invariant subspace, as for a
low-rank Hessian) the recurrence restarts from a fresh random vector orthogonal to the
basis, so the other copies and the rest of the spectrum are still reached.

Convergence: the residual of Ritz pair ``(theta, y)`` is ``beta_j |s_j|`` (the last
entry of its eigenvector of the tridiagonal ``T``, times the last off-diagonal); the
wanted ``k`` pairs of a sample have converged when each is within ``tol`` times the
largest Ritz magnitude (an estimate of ``||H||_2``). The caller measures the true
residuals with one more product per pair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hessian_service.engine.operators.estimators import rademacher

Apply = Callable[[torch.Tensor], torch.Tensor]
WHICH: tuple[str, ...] = ("largest", "smallest", "magnitude")


@dataclass(frozen=True)
class RitzPairs:
    """The wanted ``k`` Ritz pairs of each sample, in the order ``which`` asks for."""

    values: torch.Tensor  # [B, k]
    vectors: torch.Tensor  # [B, k, n], orthonormal rows
    estimated_residuals: torch.Tensor  # [B, k]
    scale: torch.Tensor  # [B]: the largest Ritz magnitude, an estimate of ||H||_2
    steps: int


def wanted(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Indices ``[B, k]`` of the wanted Ritz values of ``theta [B, j]`` (ascending)."""
    if which == "largest":
        return theta.argsort(dim=-1, descending=True)[:, :k]
    if which == "smallest":
        return theta.argsort(dim=-1)[:, :k]
    return theta.abs().argsort(dim=-1, descending=True)[:, :k]


def _tridiagonal(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    matrix = torch.diag_embed(alpha)
    if beta.shape[-1]:
        matrix = matrix + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    return matrix


def _orthogonalize(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``w [B, n]`` less its components in ``basis [B, j, n]`` (Gram-Schmidt, twice)."""
    for _ in range(2):
        w = w - torch.einsum("bjn,bj->bn", basis, torch.einsum("bjn,bn->bj", basis, w))
    return w


def _check_due(step: int) -> bool:
    """Convergence is checked every step early on, then every ``step // 16`` steps: an
    ``eigh`` of ``T`` per check, cheap next to a product but not free at 300 steps."""
    return step < 32 or step % max(1, step // 16) == 0


def lanczos(
    apply: Apply,
    *,
    batch: int,
    n: int,
    k: int,
    which: str,
    tol: float,
    steps: int,
    seed: int,
    like: torch.Tensor,
) -> RitzPairs:
    """The ``k`` wanted Ritz pairs of each sample's operator after at most ``steps``
    Lanczos steps (one batched product each), fewer once every sample converged."""
    dtype, device = like.dtype, like.device
    steps = max(k, min(steps, n))
    basis = torch.zeros(batch, steps, n, dtype=dtype, device=device)
    alpha = torch.zeros(batch, steps, dtype=dtype, device=device)
    beta = torch.zeros(batch, steps, dtype=dtype, device=device)
    tiny = torch.finfo(dtype).eps * 1e3
    q = rademacher((batch, n), seed=seed, like=like)
    q = q / q.norm(dim=-1, keepdim=True)
    theta = s = None
    done = 0
    for j in range(steps):
        basis[:, j] = q
        w = apply(q[:, None, :])[:, 0]
        alpha[:, j] = (q * w).sum(-1)
        w = _orthogonalize(w, basis[:, : j + 1])
        norm = w.norm(dim=-1)
        done = j + 1
        theta, s = torch.linalg.eigh(_tridiagonal(alpha[:, :done], beta[:, :j]))
        scale = theta.abs().amax(-1).clamp_min(torch.finfo(dtype).tiny)
        broken = norm <= tiny * scale
        if done == steps:
            break
        if done >= k and _check_due(j):
            picked = wanted(theta, k, which)
            last = s[:, -1, :].gather(1, picked).abs()
            residual = torch.where(broken, 0.0, norm)[:, None] * last
            if bool((residual <= tol * scale[:, None]).all()):
                break
        if bool(broken.any()):  # invariant subspace: go on from a fresh orthogonal vector
            fresh = rademacher((batch, n), seed=seed + 1 + j, like=like)
            fresh = _orthogonalize(fresh, basis[:, : j + 1])
            fresh = fresh / fresh.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
            w = torch.where(
                broken[:, None], fresh, w / norm.clamp_min(torch.finfo(dtype).tiny)[:, None]
            )
            norm = torch.where(broken, 0.0, norm)
            q = w
        else:
            q = w / norm[:, None]
        beta[:, j] = norm
    assert theta is not None and s is not None
    picked = wanted(theta, k, which)
    values = theta.gather(1, picked)
    coefficients = s.gather(2, picked[:, None, :].expand(batch, done, k))  # [B, j, k]
    vectors = torch.einsum("bjk,bjn->bkn", coefficients, basis[:, :done])
    estimated = norm[:, None] * coefficients[:, -1, :].abs()
    scale = theta.abs().amax(-1).clamp_min(torch.finfo(dtype).tiny)
    return RitzPairs(values, vectors, estimated, scale, done)
