"""Second derivatives of elementwise operators, per element.

A pointwise node ``y = f(u_1, ..., u_r)`` enters the Hessian through ``d2 y / du_p du_q``
evaluated element by element. The common activations have closed forms here (one or two
elementwise ops, no autodiff); any other elementwise operator -- a custom activation's
ATen op, ``mish``, ``softplus``, ``atan2`` -- is differentiated twice by autodiff of the
operator itself: reverse-over-reverse first (every operator with a double backward has
it; under ``no_grad`` SiLU and Mish have no forward-over-reverse rule), forward-over-forward
if that fails.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx
from torch.func import grad, jvp

from hessian_service.engine.graph.rules import NodeRule, call_with, op_name

Second = dict[tuple[int, int], torch.Tensor]


# Unary operators whose f'' follows from their output y alone: y -> f''(u).
SECOND_FROM_OUTPUT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": lambda y: -2 * y * (1 - y * y),
    "sigmoid": lambda y: y * (1 - y) * (1 - 2 * y),
}

# Unary operators (one tensor argument): u -> f''(u).
CLOSED_FORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": lambda u: SECOND_FROM_OUTPUT["tanh"](torch.tanh(u)),
    "sigmoid": lambda u: SECOND_FROM_OUTPUT["sigmoid"](torch.sigmoid(u)),
    "sin": lambda u: -torch.sin(u),
    "cos": lambda u: -torch.cos(u),
    "exp": torch.exp,
    "log": lambda u: -torch.reciprocal(u * u),
    "reciprocal": lambda u: 2 * torch.reciprocal(u * u * u),
    "rsqrt": lambda u: 0.75 * torch.rsqrt(u) ** 5,
    "sqrt": lambda u: -0.25 * torch.rsqrt(u) ** 3,
}


def second_derivatives(node: fx.Node, rule: NodeRule, args: list[torch.Tensor]) -> Second:
    """``{(p, q): d2 y / du_p du_q}`` for the node's dependent arguments ``p <= q``."""
    dependent = rule.dependent_args
    name = op_name(node)
    only_tensor = len(args) == 1 and len(dependent) == 1
    if only_tensor and name in CLOSED_FORMS:
        return {(dependent[0], dependent[0]): CLOSED_FORMS[name](args[0])}
    if name == "mul" and len(dependent) == 2:  # a * b: only the cross term
        return {(dependent[0], dependent[1]): torch.ones_like(args[dependent[0]])}
    if name == "pow" and only_tensor and isinstance(node.args[1], (int, float)):
        exponent = float(node.args[1])
        return {(0, 0): exponent * (exponent - 1) * args[0] ** (exponent - 2)}
    try:
        return _pairs(node, dependent, args, _reverse_pair)
    except (RuntimeError, NotImplementedError):
        return _pairs(node, dependent, args, _forward_pair)


def _caller(
    node: fx.Node, dependent: tuple[int, ...], args: list[torch.Tensor]
) -> Callable[..., torch.Tensor]:
    def call(*values: torch.Tensor) -> torch.Tensor:
        full = list(args)
        for i, value in zip(dependent, values, strict=True):
            full[i] = value
        result = call_with(node, full, {})
        assert isinstance(result, torch.Tensor)
        return result

    return call


# (call, primals, a, b) -> d2 y / du_a du_b per element, by one autodiff strategy.
PairDerivative = Callable[
    [Callable[..., torch.Tensor], tuple[torch.Tensor, ...], int, int], torch.Tensor
]


def _reverse_pair(
    call: Callable[..., torch.Tensor], primals: tuple[torch.Tensor, ...], a: int, b: int
) -> torch.Tensor:
    """Elementwise, so ``d/du_b sum(d/du_a sum(y))`` is ``d2 y_e / du_a,e du_b,e``."""

    def first(*values: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor = grad(lambda *v: call(*v).sum(), argnums=a)(*values).sum()
        return total

    second: torch.Tensor = grad(first, argnums=b)(*primals)
    return second


def _unit(values: tuple[torch.Tensor, ...], chosen: int) -> tuple[torch.Tensor, ...]:
    """Dense tangents: ones for argument ``chosen``, zeros for the others (broadcast
    arguments are views with zero strides, which forward AD refuses to write into)."""
    return tuple(
        (torch.ones if i == chosen else torch.zeros)(v.shape, dtype=v.dtype, device=v.device)
        for i, v in enumerate(values)
    )


def _forward_pair(
    call: Callable[..., torch.Tensor], primals: tuple[torch.Tensor, ...], a: int, b: int
) -> torch.Tensor:
    def first(*values: torch.Tensor) -> torch.Tensor:
        derivative: torch.Tensor = jvp(call, values, _unit(values, a))[1]
        return derivative

    second: torch.Tensor = jvp(first, primals, _unit(primals, b))[1]
    return second


def _pairs(
    node: fx.Node, dependent: tuple[int, ...], args: list[torch.Tensor], pair: PairDerivative
) -> Second:
    call = _caller(node, dependent, args)
    primals = tuple(args[i].contiguous() for i in dependent)
    return {
        (p, dependent[b]): pair(call, primals, a, b)
        for a, p in enumerate(dependent)
        for b in range(a, len(dependent))
    }


# Unary operators: (u, y) -> f'(u), y being the operator's output.
FIRST_CLOSED_FORMS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "tanh": lambda u, y: 1 - y * y,
    "sigmoid": lambda u, y: y * (1 - y),
    "relu": lambda u, y: (u > 0).to(u.dtype),
    "sin": lambda u, y: torch.cos(u),
    "cos": lambda u, y: -torch.sin(u),
    "exp": lambda u, y: y,
    "log": lambda u, y: torch.reciprocal(u),
    "reciprocal": lambda u, y: -(y * y),
    "rsqrt": lambda u, y: -0.5 * y * y * y,
    "sqrt": lambda u, y: 0.5 * torch.reciprocal(y),
}


def first_derivatives(
    node: fx.Node, dependent: tuple[int, ...], args: list[torch.Tensor], output: torch.Tensor
) -> dict[int, torch.Tensor]:
    """``{p: d y / du_p}`` per element of an elementwise node (arguments broadcast to the
    output's shape), from a closed form or by one reverse pass of the operator."""
    name = op_name(node)
    if len(args) == 1 and len(dependent) == 1 and name in FIRST_CLOSED_FORMS:
        return {dependent[0]: FIRST_CLOSED_FORMS[name](args[0], output)}
    if name == "mul":
        return {p: args[1 - p] if len(args) == 2 else args[p] for p in dependent}
    if name == "pow" and len(args) == 1 and isinstance(node.args[1], (int, float)):
        exponent = float(node.args[1])
        return {0: exponent * args[0] ** (exponent - 1)}
    call = _caller(node, dependent, args)
    primals = tuple(args[i].contiguous() for i in dependent)
    with torch.enable_grad():
        leaves = tuple(p.detach().requires_grad_(True) for p in primals)
        result = call(*leaves)
        grads = torch.autograd.grad(result.sum(), leaves, allow_unused=True)
    return {
        p: (g if g is not None else torch.zeros_like(v))
        for p, g, v in zip(dependent, grads, primals, strict=True)
    }
