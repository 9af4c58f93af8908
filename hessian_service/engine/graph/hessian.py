"""Execute a graph plan: exact input Hessians as a sum of per-node curvature terms.

Per sample (vectorized over samples and selected scalars with ``torch.func.vmap``):

1. ``J_c``, the Jacobian of the cut ``c`` with respect to the input, by reverse or forward
   mode over the prefix (whichever needs fewer passes); none when the cut is the input.
2. Adjoints ``g``: one vector-Jacobian product of the suffix per selected scalar, taken
   with respect to a zero ``eps`` added to each curvature node's output.
3. Tangents ``J_u`` of every curvature node's inputs: one forward-mode pass of the suffix
   per element of ``c``, all at once.
4. ``H_c = sum_nodes curvature term`` (docs/engine.md, "The graph engine"), then
   ``H = J_c^T H_c J_c``.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.func import hessian as func_hessian
from torch.func import jacfwd, jacrev, jvp, vjp, vmap

from hessian_service.engine.graph.plan import GraphPlan
from hessian_service.engine.graph.pointwise import second_derivatives
from hessian_service.engine.graph.rules import NodeRule, RuleKind, call_with


def _pointwise_term(
    second: dict[tuple[int, int], torch.Tensor],
    adjoint: torch.Tensor,
    tangents: dict[int, torch.Tensor],
) -> torch.Tensor:
    """``sum_pq J_p^T diag(g d2y/du_p du_q) J_q`` for ``[k, ...]`` adjoints and
    ``[m, ...]`` tangents: ``[k, m, m]``."""
    k = adjoint.shape[0]
    flat_adjoint = adjoint.reshape(k, -1)
    total: torch.Tensor | None = None
    for (p, q), d2 in second.items():
        weights = flat_adjoint * d2.reshape(1, -1)
        left = tangents[p].reshape(tangents[p].shape[0], -1)
        right = tangents[q].reshape(tangents[q].shape[0], -1)
        term = (left.unsqueeze(0) * weights.unsqueeze(1)) @ right.T
        if p != q:
            term = term + term.transpose(1, 2)
        total = term if total is None else total + term
    assert total is not None
    return total


def _contraction_term(
    node: fx.Node, adjoint: torch.Tensor, left: torch.Tensor, right: torch.Tensor
) -> torch.Tensor:
    """Cross term of ``C = A @ B`` (``mm``/``bmm``/``addmm``): ``T + T^T`` with
    ``T[k, p, q] = sum g[k, ..., i, j] dA[p, ..., i, l] dB[q, ..., l, j]``."""
    k, m = adjoint.shape[0], left.shape[0]
    if left.dim() == 3:  # mm: one matrix, give it a batch axis of one
        left, right, adjoint = left.unsqueeze(1), right.unsqueeze(1), adjoint.unsqueeze(1)
    pulled = torch.einsum("kbij,qblj->kqbil", adjoint, right)
    term = left.reshape(1, m, -1) @ pulled.reshape(k, m, -1).transpose(1, 2)
    return term + term.transpose(1, 2)


def _dense_term(
    node: fx.Node,
    rule: NodeRule,
    args: list[torch.Tensor],
    adjoint: torch.Tensor,
    tangents: dict[int, torch.Tensor],
) -> torch.Tensor:
    """``J_u^T hess(g . y)(u) J_u`` with the dense Hessian of the node from torch.func."""
    dependent = rule.dependent_args
    sizes = [args[i].numel() for i in dependent]
    flat = torch.cat([args[i].reshape(-1) for i in dependent])

    def weighted(vector: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        full = list(args)
        for i, piece in zip(dependent, torch.split(vector, sizes), strict=True):
            full[i] = piece.reshape(args[i].shape)
        result = call_with(node, full, {})
        assert isinstance(result, torch.Tensor)
        return (result * weights).sum()

    block = vmap(lambda w: func_hessian(weighted)(flat, w))(adjoint)  # [k, N, N]
    m = tangents[dependent[0]].shape[0]
    stacked = torch.cat([tangents[i].reshape(m, -1) for i in dependent], dim=1)  # [m, N]
    term: torch.Tensor = stacked @ block @ stacked.T
    return term


def _cut_hessian(
    graph_plan: GraphPlan, cut: torch.Tensor, target: torch.Tensor, k: int
) -> torch.Tensor:
    """``H_c``, ``[k, m, m]``, for one sample's cut value."""
    suffix = graph_plan.suffix
    zeros = [cut.new_zeros(shape) for shape in graph_plan.eps_shapes]

    def scalars_of(*eps: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = suffix(cut, target, *eps)[0]
        return out

    pull = vjp(scalars_of, *zeros)[1]
    adjoints = vmap(pull)(torch.eye(k, dtype=cut.dtype, device=cut.device))

    def args_of(value: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(suffix(value, target, *zeros)[1:])

    m = cut.numel()
    basis = torch.eye(m, dtype=cut.dtype, device=cut.device).reshape(m, *cut.shape)
    primal_args = args_of(cut)
    tangent_args = vmap(lambda direction: jvp(args_of, (cut,), (direction,))[1])(basis)
    total = cut.new_zeros(k, m, m)
    start = 0
    for index, node in enumerate(graph_plan.curvature):
        count = graph_plan.arg_counts[index]
        args = list(primal_args[start : start + count])
        tangent = {i: tangent_args[start + i] for i in graph_plan.rules[node].dependent_args}
        start += count
        rule = graph_plan.rules[node]
        adjoint = adjoints[index]
        if rule.kind is RuleKind.POINTWISE:
            second = second_derivatives(node, rule, args)
            total = total + _pointwise_term(second, adjoint, tangent)
        elif rule.kind is RuleKind.CONTRACTION:
            first, second_factor = (1, 2) if len(args) == 3 else (0, 1)
            total = total + _contraction_term(node, adjoint, tangent[first], tangent[second_factor])
        else:
            total = total + _dense_term(node, rule, args, adjoint, tangent)
    return total


def bytes_per_sample(graph_plan: GraphPlan, n: int, k: int, itemsize: int) -> int:
    """Working memory of one sample: the tangents of every curvature input (``m`` each),
    the ``[k, m, m]`` cut Hessian, the cut's Jacobian and the ``[k, n, n]`` result."""
    m = graph_plan.cut_size
    tangents = m * graph_plan.tangent_numel * 3  # values, tangents, weighted copies
    return itemsize * (tangents + 2 * k * m * m + m * n + 2 * k * n * n)


def hessian(graph_plan: GraphPlan, x: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, k, n, n]`` Hessians of the plan's ``k`` scalars for samples ``x`` ``[B, ...]``."""
    batch, n = x.shape[0], x[0].numel()
    if graph_plan.is_zero:
        return x.new_zeros(batch, k, n, n)

    def one(sample: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x1 = sample.unsqueeze(0)
        if graph_plan.prefix is None:
            return _cut_hessian(graph_plan, x1, target, k)
        prefix = graph_plan.prefix
        cut = prefix(x1, target)
        m = cut.numel()
        transform = jacrev if m <= n else jacfwd
        j_cut = transform(lambda value: prefix(value, target))(x1).reshape(m, n)
        h_cut = _cut_hessian(graph_plan, cut, target, k)
        full: torch.Tensor = j_cut.T @ h_cut @ j_cut
        return full

    result: torch.Tensor = vmap(one)(x, targets)
    return result
