"""The diagonal and the trace (Laplacian) of the input Hessian in one forward pass.

A forward-Laplacian executor: every node carries, besides its value, tangent columns
``t_i = d y / d x_i`` for a chunk of inputs ``i`` and second-order columns ``s``: the
diagonal entries ``d^2 y / d x_i^2`` of those inputs, or (for the trace) their sum.
No matrix is formed and no backward pass runs. Through a node ``y = f(u)``:

- affine and piecewise-linear nodes are linear in ``u`` given the values, so ``s``
  goes through them like one more tangent column (``direct._tangent`` on all columns);
- a pointwise node adds ``sum_pq f_pq(u) t_p,i t_q,i`` to the first-order part
  ``sum_p f_p s_p`` (closed forms or autodiff of the op, ``pointwise.second_derivatives``);
- a product of two dependent operands (``mm``, ``bmm``, ``matmul``, ``addmm``) adds
  ``2 A_i B_i`` (the tangents' product) to ``A' B + A B'``.

The selected scalars' second-order columns are then the diagonal (``[B, k, n]``) or the
trace (``[B, k]``). Inputs are taken ``columns`` at a time so that memory stays
bounded: ``2 * columns`` (diagonal) or ``columns + 1`` (trace) tangents of every node.
Cost: ``n`` tangent columns through the network, about ``n / 2`` of the Hessian-vector
products that the same diagonal costs by basis vectors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx

from hessian_service.engine.graph import batched
from hessian_service.engine.graph.direct import _expanded, _Runner, _tangent
from hessian_service.engine.graph.plan import GraphPlan
from hessian_service.engine.graph.pointwise import (
    FIRST_CLOSED_FORMS,
    SECOND_FROM_OUTPUT,
    second_derivatives,
)
from hessian_service.engine.graph.rules import RuleKind, op_name, tensor_args

ContractionCall = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def bytes_per_column(graph_plan: GraphPlan, itemsize: int) -> int:
    """Working bytes of one tangent column of every node, per sample (an upper bound:
    every node's output is kept while the pass runs)."""
    total = 0
    for node in graph_plan.graph.graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            total += value.numel()
    return max(1, total) * itemsize


def second_order(
    graph_plan: GraphPlan,
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    trace: bool,
    columns: int,
    on_chunk: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Hessian diagonal ``[B, k, n]`` (or its trace ``[B, k]``) of the plan's selected
    scalars at ``x``, and the ``[B, m_out]`` flat outputs; ``columns`` inputs per pass.
    ``on_chunk(c)`` is called after each pass of ``c`` input columns."""
    batch, n = x.shape[0], int(x[0].numel())
    runner = _Runner(graph_plan, tangent_axis=0)  # columns first: [c, B, ...]
    output_node = next(node for node in graph_plan.graph.graph.nodes if node.op == "output")
    scalars_node, out_node = output_node.args[0]
    with torch.no_grad():
        runner.run_values(x, targets, {})
        flat_out = runner.values[out_node]
        scalars = runner.values[scalars_node]
        assert isinstance(flat_out, torch.Tensor) and isinstance(scalars, torch.Tensor)
        k = int(scalars.shape[1])
        pieces: list[torch.Tensor] = []
        for start in range(0, n, columns):
            stop = min(n, start + columns)
            pieces.append(_pass(runner, x, scalars_node, start, stop, trace))
            if on_chunk is not None:
                on_chunk(stop - start)
        if trace:
            result = torch.stack(pieces).sum(0) if pieces else x.new_zeros(batch, k)
        else:
            result = torch.cat(pieces, dim=-1)
    return result, flat_out


def _pass(
    runner: _Runner, x: torch.Tensor, scalars_node: fx.Node, start: int, stop: int, trace: bool
) -> torch.Tensor:
    """One pass for input columns ``start:stop``: ``[B, k]`` (trace) or ``[B, k, c]``."""
    graph_plan = runner.plan
    batch, c = x.shape[0], stop - start
    placeholder = next(node for node in graph_plan.graph.graph.nodes if node.op == "placeholder")
    value = runner.values[placeholder]
    assert isinstance(value, torch.Tensor)
    shape = value.shape[1:]  # [1, *sample_shape]: the traced batch of one
    rows = torch.arange(c, device=x.device)
    eye = x.new_zeros(c, value[0].numel())  # rows start:stop of the identity, not all n
    eye[rows, start + rows] = 1
    seed = eye.reshape(c, 1, *shape).expand(c, batch, *shape)
    second = x.new_zeros(1 if trace else c, batch, *shape)
    columns: dict[fx.Node, object] = {placeholder: torch.cat([seed, second])}
    curvature = set(graph_plan.curvature)
    for node in graph_plan.graph.graph.nodes:
        if node.op != "call_function" or node not in graph_plan.rules:
            continue
        if graph_plan.rules[node].kind is RuleKind.CONSTANT:
            continue
        if not any(a in columns for a in tensor_args(node)):
            continue
        if node in curvature and op_name(node) in FROM_OUTPUT:
            columns[node] = _unary_from_output(runner, node, columns, c, trace)
            continue
        carried = _tangent(runner, node, columns)
        if node in curvature:
            assert isinstance(carried, torch.Tensor)
            carried = _with_curvature(runner, node, columns, carried, c, trace)
        columns[node] = carried
    out = columns.get(scalars_node)
    scalars = runner.values[scalars_node]
    assert isinstance(scalars, torch.Tensor)
    k = int(scalars.shape[1])
    if out is None:  # the scalars do not depend on the input
        return x.new_zeros(batch, k) if trace else x.new_zeros(batch, k, c)
    assert isinstance(out, torch.Tensor)
    seconds = out[c:]  # [1 or c, B, k]
    return seconds[0] if trace else seconds.permute(1, 2, 0)


# Unary operators whose f' and f'' follow from their output alone (the pointwise tables):
# no second evaluation of the operator, one fused update of all columns.
FROM_OUTPUT = frozenset(SECOND_FROM_OUTPUT)


def _unary_from_output(
    runner: _Runner, node: fx.Node, columns: dict[fx.Node, object], c: int, trace: bool
) -> torch.Tensor:
    """``t' = f' t`` and ``s' = f' s + f'' t^2`` for a unary ``f`` known by its output."""
    source = columns[tensor_args(node)[0]]
    output = runner.values[node]
    assert isinstance(source, torch.Tensor) and isinstance(output, torch.Tensor)
    rank = batched._rank(node)
    source = batched._lift(source, 2, rank)
    name = op_name(node)
    first = FIRST_CLOSED_FORMS[name](output, output)  # tanh, sigmoid: f' from y alone
    second = SECOND_FROM_OUTPUT[name](output)
    carried = source * first
    tangents = source[:c]
    squares = tangents * tangents
    if trace:
        squares = squares.sum(0, keepdim=True)
    carried[c:].addcmul_(squares, second)
    return carried


def _with_curvature(
    runner: _Runner,
    node: fx.Node,
    columns: dict[fx.Node, object],
    carried: torch.Tensor,
    c: int,
    trace: bool,
) -> torch.Tensor:
    """``carried`` (the first-order part of every column) plus the node's second-order
    term in its second-order columns."""
    rule = runner.plan.rules[node]
    args = tensor_args(node)
    if rule.kind is RuleKind.CONTRACTION:
        name = op_name(node)
        first, second = (1, 2) if name == "addmm" else (0, 1)
        left, right = columns[args[first]], columns[args[second]]
        assert isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor)
        product = torch.matmul(left[:c], right[:c])  # [c, B, ...]
        extra = 2 * (product.sum(0, keepdim=True) if trace else product)
    else:
        rank = batched._rank(node)
        shape = list(node.meta["val"].shape)
        values = [_expanded(runner.values[a], a in runner.per_sample, rank, shape, 1) for a in args]
        extra_sum: torch.Tensor | None = None
        for (p, q), d2 in second_derivatives(node, rule, values).items():
            tp = _expanded(columns[args[p]], True, rank, shape, 2)[:c]
            tq = tp if p == q else _expanded(columns[args[q]], True, rank, shape, 2)[:c]
            product = tp * tq
            if trace:
                product = product.sum(0, keepdim=True)
            term = product * d2 * (1.0 if p == q else 2.0)
            extra_sum = term if extra_sum is None else extra_sum + term
        assert extra_sum is not None
        extra = extra_sum
    if carried._base is not None or carried.stride(0) == 0:  # a view: write to a copy
        carried = carried.clone()
    carried[c:] += extra
    return carried
