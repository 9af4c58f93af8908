"""Plan a graph-engine Hessian: which nodes carry curvature, and where to cut the graph.

The Hessian of a scalar ``s(x)`` that reaches ``s`` only through an intermediate tensor
``c`` (every path from ``x`` to ``s`` passes through ``c``), where nothing before ``c``
has curvature, is ``J_c^T H_c J_c``: ``H_c`` is the Hessian of the suffix with respect
to ``c``, and the tangents propagated through the suffix are ``c``'s ``m`` elements, not
``x``'s ``n``. The planner picks the smallest such ``c``: the output of an MLP's first
``Linear`` (``m`` = its width), the logits of a ReLU network under a cross-entropy
objective (``m`` = the classes), or ``x`` itself. When no node has curvature at all the
Hessian is known to be zero and nothing is computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import fx

from hessian_service.engine.graph.rules import (
    AFFINE_OPS,
    PRODUCT_OPS,
    NodeRule,
    RuleKind,
    classify,
    numel,
    op_name,
    tensor_args,
)


class GraphUnsupported(RuntimeError):
    """The graph has a node no rule covers; ``node`` names it for the capability report."""

    def __init__(self, node: str, reason: str) -> None:
        super().__init__(f"node {node}: {reason}")
        self.node = node


@dataclass
class GraphPlan:
    """A captured per-sample graph ``(x1, target) -> (scalars, flat_output)`` and its
    analysis. ``prefix`` maps ``(x1, target)`` to the cut ``c`` (None when the cut is
    ``x1``); ``suffix`` maps ``(c, target, *eps)`` to ``(scalars, *curvature_args)``,
    where ``eps[i]`` is added to curvature node ``i``'s output (its gradient is that
    node's adjoint) and ``curvature_args`` are each curvature node's tensor arguments,
    dependent ones broadcast to the node's output shape."""

    graph: fx.GraphModule
    rules: dict[fx.Node, NodeRule]
    curvature: list[fx.Node]
    cut: fx.Node
    cut_is_input: bool
    prefix: fx.GraphModule | None
    suffix: fx.GraphModule
    arg_counts: list[int] = field(default_factory=list)  # tensor args per curvature node
    eps_shapes: list[torch.Size] = field(default_factory=list)
    downstream: set[fx.Node] = field(default_factory=set)  # nodes the cut reaches
    affine_prefix: bool = False  # everything before the cut is affine: J_c is constant
    constant_cut_jacobian: torch.Tensor | None = None  # [m, n], filled on first use
    direct_reason: str | None = None  # why the direct executor cannot run it (None: it can)
    # Forward-Laplacian passes by input shape, dtype, device and kind: calls seen, and the
    # compiled graph once compiled (graph/compiled.py); dies with the plan.
    compiled_passes: dict[object, object] = field(default_factory=dict)

    @property
    def is_zero(self) -> bool:
        return not self.curvature

    @property
    def tangent_numel(self) -> int:
        """Elements of one tangent of every curvature node's arguments, per sample."""
        return sum(numel(arg) for node in self.curvature for arg in tensor_args(node))

    @property
    def cut_size(self) -> int:
        return numel(self.cut)


def _reachable(node: fx.Node, step: Callable[[fx.Node], Iterable[fx.Node]]) -> set[fx.Node]:
    """Every node reached from ``node`` by repeated ``step`` (``node`` itself excluded)."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        for neighbour in step(stack.pop()):
            if neighbour not in seen:
                seen.add(neighbour)
                stack.append(neighbour)
    return seen


def _ancestors(node: fx.Node) -> set[fx.Node]:
    return _reachable(node, lambda current: current.all_input_nodes)


def _descendants(node: fx.Node) -> set[fx.Node]:
    return _reachable(node, lambda current: current.users)


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _reaches_without(
    start: fx.Node, goal: fx.Node, blocked: fx.Node, allowed: set[fx.Node]
) -> bool:
    """Whether ``goal`` is reachable from ``start`` through ``allowed`` nodes avoiding
    ``blocked``."""
    stack, seen = [start], {start}
    while stack:
        current = stack.pop()
        if current is goal:
            return True
        for user in current.users:
            if user is not blocked and user in allowed and user not in seen:
                seen.add(user)
                stack.append(user)
    return False


def plan(graph: fx.GraphModule) -> GraphPlan:
    """Analyse a captured graph; ``GraphUnsupported`` when a relevant node has no rule."""
    nodes = list(graph.graph.nodes)
    placeholders = [node for node in nodes if node.op == "placeholder"]
    output = next(node for node in nodes if node.op == "output")
    scalars = output.args[0][0]
    assert isinstance(scalars, fx.Node)
    relevant = _ancestors(scalars) | {scalars}
    dependent: set[fx.Node] = {placeholders[0]}
    rules: dict[fx.Node, NodeRule] = {}
    for node in nodes:
        if node.op != "call_function" or node not in relevant:
            continue
        rule = classify(node, dependent)
        if rule.kind is RuleKind.UNSUPPORTED:
            raise GraphUnsupported(
                f"{node.name} ({op_name(node)})", "no rule for this operator on this size"
            )
        rules[node] = rule
        if rule.kind is not RuleKind.CONSTANT:
            dependent.add(node)
    if scalars not in dependent:
        raise GraphUnsupported(scalars.name, "the selected output does not depend on the input")
    curvature = [node for node in nodes if node in rules and rules[node].has_curvature]
    cut = _choose_cut(placeholders[0], scalars, dependent & relevant, curvature)
    return _build(graph, rules, curvature, cut, placeholders)


def _choose_cut(
    source: fx.Node, scalars: fx.Node, dependent: set[fx.Node], curvature: list[fx.Node]
) -> fx.Node:
    """The smallest dependent node that every path from ``source`` to ``scalars`` passes
    through and that has no curvature node at or before it (``source`` if none is
    smaller)."""
    if not curvature:
        return scalars
    before_curvature: set[fx.Node] = set()
    for node in curvature:
        before_curvature |= _ancestors(node)
    best, best_size = source, numel(source)
    for node in dependent:
        if node is source or node in curvature or not _is_tensor(node):
            continue
        if numel(node) >= best_size:
            continue
        if _ancestors(node) & set(curvature):
            continue
        if node not in before_curvature:
            continue  # not upstream of any curvature: cannot separate them from the input
        if _reaches_without(source, scalars, node, dependent | {scalars}):
            continue
        best, best_size = node, numel(node)
    return best


def _build(
    graph: fx.GraphModule,
    rules: dict[fx.Node, NodeRule],
    curvature: list[fx.Node],
    cut: fx.Node,
    placeholders: list[fx.Node],
) -> GraphPlan:
    source, target = placeholders[0], placeholders[1]
    output = next(node for node in graph.graph.nodes if node.op == "output")
    scalars = output.args[0][0]
    cut_is_input = cut is source
    prefix = None if cut_is_input else _prefix(graph, cut, source, target)
    upstream = set() if cut_is_input else _ancestors(cut) | {cut}
    relevant = _ancestors(scalars) | {scalars}
    suffix_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    env[cut] = suffix_graph.placeholder("cut")
    env[target] = suffix_graph.placeholder("target")
    eps_nodes = [suffix_graph.placeholder(f"eps{i}") for i in range(len(curvature))]
    position = {node: i for i, node in enumerate(curvature)}
    arg_outputs: list[fx.Node] = []
    arg_counts: list[int] = []
    for node in graph.graph.nodes:
        if node.op in ("placeholder", "output") or node in env or node not in relevant:
            continue
        if node in upstream and node in rules and rules[node].kind is not RuleKind.CONSTANT:
            continue  # depends on the input before the cut: the suffix reads the cut instead
        copied = suffix_graph.node_copy(node, lambda arg: env[arg])
        if node in position:
            shape = list(node.meta["val"].shape)
            args = tensor_args(node)
            rule = rules[node]
            for i, arg in enumerate(args):
                value = env[arg]
                if (
                    rule.kind is RuleKind.POINTWISE
                    and i in rule.dependent_args
                    and list(arg.meta["val"].shape) != shape
                ):
                    value = suffix_graph.call_function(
                        torch.ops.aten.expand.default, (value, shape)
                    )
                arg_outputs.append(value)
            arg_counts.append(len(args))
            copied = suffix_graph.call_function(
                torch.ops.aten.add.Tensor, (copied, eps_nodes[position[node]])
            )
        env[node] = copied
    suffix_graph.output((env[scalars], *arg_outputs))
    suffix = fx.GraphModule(graph, suffix_graph)
    suffix.graph.eliminate_dead_code()
    suffix.recompile()
    affine_prefix = not cut_is_input and all(
        op_name(node) in AFFINE_OPS | PRODUCT_OPS | {"mul", "div", "getitem"}
        for node in _ancestors(cut) | {cut}
        if node in rules and rules[node].kind is RuleKind.ZERO
    )
    return GraphPlan(
        downstream=_descendants(cut),
        affine_prefix=affine_prefix,
        graph=graph,
        rules=rules,
        curvature=curvature,
        cut=cut,
        cut_is_input=cut_is_input,
        prefix=prefix,
        suffix=suffix,
        arg_counts=arg_counts,
        eps_shapes=[node.meta["val"].shape for node in curvature],
    )


def _prefix(
    graph: fx.GraphModule, cut: fx.Node, source: fx.Node, target: fx.Node
) -> fx.GraphModule:
    needed = _ancestors(cut) | {cut}
    prefix_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {
        source: prefix_graph.placeholder("x"),
        target: prefix_graph.placeholder("target"),
    }
    for node in graph.graph.nodes:
        if node in needed and node not in env:
            env[node] = prefix_graph.node_copy(node, lambda arg: env[arg])
    prefix_graph.output(env[cut])
    module = fx.GraphModule(graph, prefix_graph)
    module.recompile()
    return module
