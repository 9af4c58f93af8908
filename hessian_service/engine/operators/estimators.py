"""Randomized diagonal and trace estimators on a batched matrix-vector product.

``apply(V)`` maps ``V [B, c, n]`` to ``[B, c, n]``: row ``j`` of sample ``b`` is
``A_b V[b, j]`` for a symmetric ``A_b`` (here the input Hessian of sample ``b``). Each
estimator draws its own Rademacher vectors from ``seed`` (a CPU generator, so a seed gives
the same vectors on every device), one independent set per sample, and returns the
estimate with its standard error: the sample standard deviation of the estimator's ``r``
independent terms over ``sqrt(r)`` (the central limit theorem's scale; with few terms the
error of the error is itself large).

- Hutchinson's diagonal: ``E[v * (A v)] = diag(A)`` for Rademacher ``v``; the variance
  of entry ``i`` is ``sum_{k != i} A_ik^2``, so a diagonal-dominant matrix is cheap.
- Hutchinson's trace: ``E[v^T A v] = tr(A)``, variance ``2 (||A||_F^2 - sum A_ii^2)``.
- Hutch++ (Meyer, Musco, Musco, Woodruff, "Hutch++: Optimal Stochastic Trace
  Estimation", SOSA 2021): a third of the products sketch ``A S``, ``Q = qr(A S)``;
  ``tr(Q^T A Q)`` is computed exactly with another third, and Hutchinson's estimator runs
  on the deflated ``(I - Q Q^T) A (I - Q Q^T)`` with the last third. The error falls as
  ``1/m`` instead of ``1/sqrt(m)`` when the spectrum decays (the top eigenvalues, which
  dominate Hutchinson's variance, are taken exactly). The standard error is the
  residual part's: the exact part has none.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Apply = Callable[[torch.Tensor], torch.Tensor]


def rademacher(shape: tuple[int, ...], *, seed: int, like: torch.Tensor) -> torch.Tensor:
    """Independent +-1 entries from ``seed``, in ``like``'s dtype and device."""
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8)
    return (signs.to(like.dtype) * 2 - 1).to(like.device)


def _mean_and_error(terms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over axis 1 and its standard error (sample std, ddof 1, over sqrt(count))."""
    count = terms.shape[1]
    return terms.mean(1), terms.std(1, correction=1) / math.sqrt(count)


def hutchinson_diagonal(
    apply: Apply, batch: int, n: int, m: int, *, seed: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``diag(A_b)`` estimates ``[B, n]`` and standard errors from ``m >= 2`` products."""
    vectors = rademacher((batch, m, n), seed=seed, like=like)
    return _mean_and_error(vectors * apply(vectors))


def hutchinson_trace(
    apply: Apply, batch: int, n: int, m: int, *, seed: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``tr(A_b)`` estimates ``[B]`` and standard errors from ``m >= 2`` products."""
    vectors = rademacher((batch, m, n), seed=seed, like=like)
    return _mean_and_error((vectors * apply(vectors)).sum(-1))


def hutchpp_split(m: int) -> tuple[int, int]:
    """(sketch columns, residual vectors) of Hutch++ with ``m`` products: ``m // 3``
    for the sketch and as many for its exact part, the rest (at least 2) residual."""
    sketch = m // 3
    return sketch, m - 2 * sketch


def hutchpp_trace(
    apply: Apply, batch: int, n: int, m: int, *, seed: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``tr(A_b)`` estimates ``[B]`` and standard errors by Hutch++ from ``m >= 4``
    products (``hutchpp_split``)."""
    sketch, residual = hutchpp_split(m)
    draws = rademacher((batch, sketch + residual, n), seed=seed, like=like)
    s, g = draws[:, :sketch], draws[:, sketch:]
    q = torch.linalg.qr(apply(s).transpose(1, 2)).Q  # [B, n, sketch], orthonormal columns
    exact_part = (q.transpose(1, 2) * apply(q.transpose(1, 2).contiguous())).sum((1, 2))
    g = g - (g @ q) @ q.transpose(1, 2)  # (I - Q Q^T) g, row by row
    terms = (g * apply(g)).sum(-1)  # g^T (I - QQ^T) A (I - QQ^T) g
    mean, error = _mean_and_error(terms)
    return exact_part + mean, error
