"""What the matrix-free operators return, and the one error that means "too large".

Every result carries ``output`` (the model's output at ``x``, ``[B, *out]``) and
``products``: the Hessian-vector (or Jacobian-vector, vector-Jacobian) products the work
cost, the unit the planner, ``max_products`` and ``Progress`` all count in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ProductResult:
    """Products of a derivative with a batch of vectors, per sample.

    ``values``: ``[B, m, *in]`` for Hessian-vector and vector-Jacobian products, ``[B, m,
    *out]`` (``[B, m, k]`` for a list of indices, ``[B, m]`` for one) for Jacobian-vector
    products. ``method`` says which AD mode ran (see ``products.Mode``).
    """

    values: torch.Tensor
    output: torch.Tensor
    products: int
    method: str


@dataclass(frozen=True)
class Estimate:
    """A Hessian diagonal (``values [B, *in]``) or trace (``values [B]``), exact or not.

    ``standard_error`` is ``None`` when ``exact``; otherwise the estimator's own standard
    error per entry (the sample standard deviation of its ``m`` terms over ``sqrt(m)``).
    ``method``: ``dense`` | ``hvp-basis`` | ``hutchinson`` | ``hutch++`` (or a strategy a
    later engine adds in front of them). ``seed`` drew the random vectors (unused when
    exact).
    """

    values: torch.Tensor
    standard_error: torch.Tensor | None
    exact: bool
    products: int
    method: str
    seed: int
    output: torch.Tensor


@dataclass(frozen=True)
class EigenResult:
    """``k`` eigenpairs of each sample's input Hessian, from Lanczos on products.

    ``values [B, k]`` in the order asked for (largest first for ``largest`` and
    ``magnitude``, smallest first for ``smallest``); ``vectors [B, k, *in]`` unit norm;
    ``residuals [B, k]`` the measured ``||H v - lambda v||`` of each returned pair (one
    extra batched product); ``converged`` is true when every residual of every sample
    is within ``tol`` times that sample's largest Ritz magnitude. ``steps`` is the
    Krylov dimension reached.
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    products: int
    converged: bool
    steps: int
    output: torch.Tensor


class OperatorTooLarge(ValueError):
    """The asked-for work does not fit its limits (memory budget, ``max_products``,
    ``max_work``): the serving layer answers 413 with ``str(error)``, which names the
    estimate and what would fit. ``estimated_bytes`` / ``estimated_products`` carry the
    figures; ``fitting`` names the operations that would fit."""

    def __init__(
        self,
        message: str,
        *,
        estimated_bytes: int | None = None,
        estimated_products: int | None = None,
        fitting: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.estimated_bytes = estimated_bytes
        self.estimated_products = estimated_products
        self.fitting = fitting
