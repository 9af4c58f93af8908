"""Hessian-vector, Jacobian-vector and vector-Jacobian products, never forming a matrix.

A Hessian-vector product ``H v`` of one selected scalar ``f`` is forward-over-reverse:
``torch.func.jvp`` of ``torch.func.grad(f)`` along ``v``, one pass costing a few forward
passes, ``vmap``-ed over a sample's vectors and over the samples. A Jacobian-vector
product is ``torch.func.jvp`` (forward mode), a vector-Jacobian product
``torch.func.vjp`` (reverse mode, one forward pass per chunk shared by its vectors).

Work runs in chunks of (sample, vector) pairs sized by ``plan.product_chunks`` within
``memory_budget_bytes``; each chunk runs under ``AUTODIFF_LOCK`` (forward-AD levels are
process-wide), which is released between chunks, and then calls
``progress.advance(pairs)``: a job's counter, and the point where a cancelled job stops.

Every transform runs in ``differentiable.derivative_mode`` (``run_differentiable``), as
the dense paths do. Models the transforms cannot run fall back as ``compute_hessian``
does: an operator without forward-mode AD of its backward (``NotImplementedError``) to
reverse-over-reverse (``vjp`` of the gradient: ``H`` is symmetric), and a model ``vmap``
cannot run (data-dependent control flow, ``.item()``) to plain ``torch.autograd``: a
double backward per vector, slower and still exact. A mode that failed is not retried on
later chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum

import torch
from torch import nn
from torch.func import grad, jvp, vjp, vmap

from hessian_service.engine.api import AUTODIFF_LOCK, OutputIndex
from hessian_service.engine.differentiable import run_differentiable
from hessian_service.engine.objectives import Objective
from hessian_service.engine.operators import plan as plans
from hessian_service.engine.operators.results import ProductResult
from hessian_service.engine.operators.selection import (
    OutputsFn,
    Setup,
    outputs_fn,
    prepare,
    scalar_fn,
)
from hessian_service.engine.planner import DEFAULT_MEMORY_BUDGET_BYTES
from hessian_service.engine.progress import NO_PROGRESS, Progress
from hessian_service.engine.rowloop import gradient

# Flat samples [b, n], their targets, vectors [b, c, *] -> products [b, c, *].
ChunkFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Mode(str, Enum):
    """How a chunk of products was computed (``ProductResult.method``)."""

    FORWARD_OVER_REVERSE = "forward-over-reverse"  # HVP: jvp of grad
    REVERSE_OVER_REVERSE = "reverse-over-reverse"  # HVP: vjp of grad
    FORWARD = "forward"  # JVP: torch.func.jvp
    REVERSE = "reverse"  # VJP: torch.func.vjp
    AUTOGRAD = "autograd"  # any kind: torch.autograd, one vector at a time

    def __str__(self) -> str:
        return str(self.value)


# --- one chunk of products, per mode ------------------------------------------------------


PerSample = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _vmapped(per_sample: PerSample) -> ChunkFn:
    """A chunk that maps ``per_sample(flat, target, vectors)`` over its samples (vmap)."""

    def chunk(xs: torch.Tensor, ts: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
        return run_differentiable(lambda: vmap(per_sample)(xs, ts, vs))

    return chunk


def _hvp_forward_over_reverse(scalar: Callable[..., torch.Tensor]) -> ChunkFn:
    def per_sample(flat: torch.Tensor, target: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        gradient = grad(lambda z: scalar(z, target))

        def one(v: torch.Tensor) -> torch.Tensor:
            tangent: torch.Tensor = jvp(gradient, (flat,), (v,))[1]
            return tangent

        result: torch.Tensor = vmap(one)(vectors)
        return result

    return _vmapped(per_sample)


def _hvp_reverse_over_reverse(scalar: Callable[..., torch.Tensor]) -> ChunkFn:
    def per_sample(flat: torch.Tensor, target: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        def value(z: torch.Tensor) -> torch.Tensor:
            return scalar(z, target)

        pullback = vjp(grad(value), flat)[1]
        result: torch.Tensor = vmap(lambda v: pullback(v)[0])(vectors)
        return result

    return _vmapped(per_sample)


def _autograd_pullbacks(pulled: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> ChunkFn:
    """A chunk of vector-Jacobian products of ``pulled(flat, target)`` with respect to the
    input, by plain autograd, a sample and a vector at a time: ``[b, c, n]`` in the
    input's dtype (the fallback when vmap cannot run the model)."""

    def chunk(xs: torch.Tensor, ts: torch.Tensor, us: torch.Tensor) -> torch.Tensor:
        def compute() -> torch.Tensor:
            out = xs.new_zeros(us.shape[0], us.shape[1], xs.shape[1])
            for b in range(xs.shape[0]):
                flat = xs[b].detach().requires_grad_(True)
                value = pulled(flat, ts[b])
                for j in range(us.shape[1]):
                    out[b, j] = gradient(value, flat, us[b, j], create_graph=False)
            return out

        return run_differentiable(compute)

    return chunk


def _hvp_autograd(scalar: Callable[..., torch.Tensor]) -> ChunkFn:
    """``H v`` as the vector-Jacobian product of the gradient (built with its graph)."""

    def first(flat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        value = scalar(flat, target)
        return gradient(value, flat, torch.ones_like(value), create_graph=True)

    return _autograd_pullbacks(first)


def _jvp_forward(outputs: OutputsFn) -> ChunkFn:
    def per_sample(flat: torch.Tensor, target: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        def one(v: torch.Tensor) -> torch.Tensor:
            tangent: torch.Tensor = jvp(lambda z: outputs(z, target), (flat,), (v,))[1]
            return tangent

        result: torch.Tensor = vmap(one)(vectors)
        return result

    return _vmapped(per_sample)


def _jvp_autograd(outputs: OutputsFn) -> ChunkFn:
    """``J v`` by the double-backward trick: ``J^T u`` is linear in a dummy ``u``, and
    its vector-Jacobian product with ``v`` (with respect to ``u``) is ``J v``."""

    def chunk(xs: torch.Tensor, ts: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
        def compute() -> torch.Tensor:
            rows = []
            for b in range(xs.shape[0]):
                flat = xs[b].detach().requires_grad_(True)
                value = outputs(flat, ts[b])
                dummy = torch.zeros_like(value, requires_grad=True)
                pulled = gradient(value, flat, dummy, create_graph=True)
                rows.append(
                    torch.stack([gradient(pulled, dummy, v, create_graph=False) for v in vs[b]])
                )
            return torch.stack(rows)

        return run_differentiable(compute)

    return chunk


def _vjp_reverse(outputs: OutputsFn) -> ChunkFn:
    def per_sample(
        flat: torch.Tensor, target: torch.Tensor, covectors: torch.Tensor
    ) -> torch.Tensor:
        pullback = vjp(lambda z: outputs(z, target), flat)[1]
        result: torch.Tensor = vmap(lambda u: pullback(u)[0])(covectors)
        return result

    return _vmapped(per_sample)


def _vjp_autograd(outputs: OutputsFn) -> ChunkFn:
    return _autograd_pullbacks(outputs)


# --- chunked, locked, counted ---------------------------------------------------------------


class ProductOperator:
    """Products of one kind for every sample of ``x``: ``apply(vectors [B, m, *])``.

    The diagonal, trace and eigen operators drive it too (``apply`` or, for their own
    chunk loops, ``apply_samples``). ``products`` counts what it computed; ``mode`` is
    the AD mode the last chunk used.
    """

    def __init__(
        self,
        kind: str,
        model: nn.Module,
        x: torch.Tensor,
        setup: Setup,
        *,
        memory_budget_bytes: int,
        progress: Progress,
    ) -> None:
        self.kind = kind
        self.setup = setup
        self.budget = memory_budget_bytes
        self.progress = progress
        self.products = 0
        self._x = x.detach().reshape(setup.batch, setup.n)
        self.per_product = plans.bytes_per_product(
            kind, n=setup.n, activation_numel=setup.activation_numel, itemsize=setup.itemsize
        )
        self._chain: list[tuple[Mode, ChunkFn]]
        if kind == "hvp":
            scalar = scalar_fn(model, setup)
            self._chain = [
                (Mode.FORWARD_OVER_REVERSE, _hvp_forward_over_reverse(scalar)),
                (Mode.REVERSE_OVER_REVERSE, _hvp_reverse_over_reverse(scalar)),
                (Mode.AUTOGRAD, _hvp_autograd(scalar)),
            ]
        elif kind == "jvp":
            selected = outputs_fn(model, setup)
            self._chain = [
                (Mode.FORWARD, _jvp_forward(selected)),
                (Mode.AUTOGRAD, _jvp_autograd(selected)),
            ]
        elif kind == "vjp":
            selected = outputs_fn(model, setup)
            self._chain = [
                (Mode.REVERSE, _vjp_reverse(selected)),
                (Mode.AUTOGRAD, _vjp_autograd(selected)),
            ]
        else:
            raise ValueError(f"ProductOperator: kind must be hvp, jvp or vjp, got {kind!r}")

    @property
    def mode(self) -> Mode:
        return self._chain[0][0]

    def chunks(self, vectors: int) -> tuple[int, int]:
        """(samples, vectors) per chunk for ``vectors`` vectors per sample."""
        return plans.product_chunks(self.setup.batch, vectors, self.per_product, self.budget)

    def _run(self, xs: torch.Tensor, ts: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
        while True:
            mode, compute = self._chain[0]
            try:
                return compute(xs, ts, vs).detach()
            except torch.OutOfMemoryError:
                raise  # the caller's to handle (a smaller chunk), never a mode change
            except NotImplementedError:  # no forward-mode AD of some backward: next mode
                if len(self._chain) == 1:
                    raise
                self._chain.pop(0)
            except RuntimeError:  # vmap cannot run the model: plain autograd
                if mode is Mode.AUTOGRAD:
                    raise
                self._chain = self._chain[-1:]

    def apply_samples(self, start: int, stop: int, vectors: torch.Tensor) -> torch.Tensor:
        """Products of samples ``start:stop`` with ``vectors [stop-start, c, *]``: one
        chunk, under the lock, counted (``progress.advance``) once it is done."""
        self.progress.check()
        with AUTODIFF_LOCK:
            values = self._run(self._x[start:stop], self.setup.targets[start:stop], vectors)
        pairs = int(vectors.shape[0] * vectors.shape[1])
        self.products += pairs
        self.progress.advance(pairs)
        return values

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        """Products of every sample with its vectors ``[B, m, *]``, chunk by chunk into
        one preallocated result (the peak is the result and one chunk)."""
        batch, m = vectors.shape[0], vectors.shape[1]
        samples, chunk = self.chunks(m)
        out: torch.Tensor | None = None
        for start in range(0, batch, samples):
            stop = min(batch, start + samples)
            for first in range(0, m, chunk):
                last = min(m, first + chunk)
                values = self.apply_samples(start, stop, vectors[start:stop, first:last])
                if out is None:
                    out = values.new_empty(batch, m, *values.shape[2:])
                out[start:stop, first:last] = values
        assert out is not None
        return out


def model_output(
    model: nn.Module, x: torch.Tensor, setup: Setup, memory_budget_bytes: int
) -> torch.Tensor:
    """The model's output ``[B, *out]`` at ``x``, in chunks of samples whose forward
    activations fit the budget."""
    per_sample = max(1, setup.activation_numel * setup.itemsize)
    samples = max(1, min(setup.batch, memory_budget_bytes // per_sample))
    pieces = []
    for start in range(0, setup.batch, samples):
        with AUTODIFF_LOCK, torch.no_grad():
            pieces.append(model(x[start : start + samples]).detach())
    return torch.cat(pieces).reshape(setup.batch, *setup.output_shape)


def _vectors(
    api_name: str, vectors: torch.Tensor, x: torch.Tensor, per_vector: tuple[int, ...], what: str
) -> torch.Tensor:
    """``vectors`` checked as ``[B, m, *per_vector]`` (m >= 1) in ``x``'s dtype."""
    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point():
        raise ValueError(f"{api_name}: vectors must be a floating-point tensor [B, m, {what}]")
    batch = x.shape[0]
    if (
        vectors.dim() != 2 + len(per_vector)
        or vectors.shape[0] != batch
        or tuple(vectors.shape[2:]) != per_vector
        or vectors.shape[1] < 1
    ):
        raise ValueError(
            f"{api_name}: vectors must be shaped [B={batch}, m>=1, {what}={list(per_vector)}], "
            f"got {list(vectors.shape)}"
        )
    if vectors.device != x.device:
        raise ValueError(f"{api_name}: vectors are on {vectors.device}, x on {x.device}")
    return vectors.to(x.dtype)


def _products(
    kind: str,
    model: nn.Module,
    x: torch.Tensor,
    setup: Setup,
    vectors: torch.Tensor,
    flat: int,
    value_shape: tuple[int, ...],
    memory_budget_bytes: int,
    progress: Progress,
) -> ProductResult:
    """The products of ``kind`` with ``vectors [B, m, *]`` (checked; ``flat`` numbers
    each): planned in ``progress``, chunk by chunk (``ProductOperator.apply``), values
    ``[B, m, *value_shape]``, with the model's output."""
    m = vectors.shape[1]
    progress.plan(setup.batch * m)
    operator = ProductOperator(
        kind, model, x, setup, memory_budget_bytes=memory_budget_bytes, progress=progress
    )
    values = operator.apply(vectors.reshape(setup.batch, m, flat))
    return ProductResult(
        values=values.reshape(setup.batch, m, *value_shape),
        output=model_output(model, x, setup, memory_budget_bytes),
        products=operator.products,
        method=str(operator.mode),
    )


def hessian_vector_products(
    model: nn.Module,
    x: torch.Tensor,
    vectors: torch.Tensor,
    *,
    output_index: int | None = None,
    objective: Objective | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    progress: Progress = NO_PROGRESS,
) -> ProductResult:
    """``H v`` of one selected scalar for each sample and each of its vectors.

    ``x [B, *in]``, ``vectors [B, m, *in]`` -> ``values [B, m, *in]``. One int
    ``output_index``, an ``objective``, or nothing for a single-output model. Costs
    ``B * m`` products (each about three forward passes); ``H`` is never formed.
    """
    name = "hessian_vector_products"
    setup = prepare(name, model, x, output_index=output_index, objective=objective, one_scalar=True)
    vs = _vectors(name, vectors, x, setup.sample_shape, "*in")
    return _products(
        "hvp", model, x, setup, vs, setup.n, setup.sample_shape, memory_budget_bytes, progress
    )


def _selected_shape(setup: Setup) -> tuple[int, ...]:
    """One vector's shape on the output side: the output's own shape for every output,
    ``[k]`` for a list of indices, ``[]`` for one index or an objective."""
    if setup.all_outputs:
        return setup.output_shape
    return () if setup.squeeze else (setup.count,)


def jacobian_vector_products(
    model: nn.Module,
    x: torch.Tensor,
    vectors: torch.Tensor,
    *,
    output_index: OutputIndex = None,
    objective: Objective | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    progress: Progress = NO_PROGRESS,
) -> ProductResult:
    """``J v`` of the selected outputs (all of them by default) along each vector.

    ``vectors [B, m, *in]`` -> ``values [B, m, *out]`` (every output), ``[B, m, k]`` (a
    list of k indices) or ``[B, m]`` (one index or an objective). ``B * m`` products,
    forward mode.
    """
    name = "jacobian_vector_products"
    setup = prepare(
        name, model, x, output_index=output_index, objective=objective, one_scalar=False
    )
    vs = _vectors(name, vectors, x, setup.sample_shape, "*in")
    shape = _selected_shape(setup)
    return _products("jvp", model, x, setup, vs, setup.n, shape, memory_budget_bytes, progress)


def vector_jacobian_products(
    model: nn.Module,
    x: torch.Tensor,
    vectors: torch.Tensor,
    *,
    output_index: OutputIndex = None,
    objective: Objective | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    progress: Progress = NO_PROGRESS,
) -> ProductResult:
    """``u^T J`` of the selected outputs (all of them by default) for each covector.

    ``vectors [B, m, *out]`` (every output), ``[B, m, k]`` (a list of k indices) or
    ``[B, m]`` (one index or an objective) -> ``values [B, m, *in]``. ``B * m``
    products, reverse mode (one forward pass per chunk, shared by its covectors).
    """
    name = "vector_jacobian_products"
    setup = prepare(
        name, model, x, output_index=output_index, objective=objective, one_scalar=False
    )
    shape = _selected_shape(setup)
    us = _vectors(name, vectors, x, shape, "*out" if setup.all_outputs else "k")
    flat = max(1, math.prod(shape))
    return _products(
        "vjp", model, x, setup, us, flat, setup.sample_shape, memory_budget_bytes, progress
    )
