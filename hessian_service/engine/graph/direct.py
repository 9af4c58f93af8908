"""The direct executor: a graph plan run on all samples at once, without torch.func.

``hessian.py`` computes the same sum of curvature terms with ``vmap``/``jvp``/``vjp``,
whose per-operator overhead dominates on small layers (a 128-wide suffix: 4.7 ms of
dispatch for 0.2 ms of arithmetic). Here every node runs once per pass on batched
tensors (``batched.apply``):

1. values ``[B, ...]`` with autograd on, a zero ``eps`` added to each curvature node's
   output; one backward pass per selected scalar gives the adjoints ``g``;
2. tangents ``[B, m, ...]`` of every node after the cut, seeded with the identity: the
   linear part of each affine node, ``f'(u) * T`` for elementwise ones, the product rule
   for contractions;
3. the curvature terms, then ``J_c^T H_c J_c`` (``J_c`` cached when everything before
   the cut is affine: it is then a constant).

``unsupported_reason`` says why a plan must use the vmap executor instead (a node
without a batching or tangent rule, or the dense rule).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx

from hessian_service.engine.graph import batched
from hessian_service.engine.graph.plan import GraphPlan
from hessian_service.engine.graph.pointwise import first_derivatives, second_derivatives
from hessian_service.engine.graph.rules import RuleKind, arg, kwarg, op_name, tensor_args
from hessian_service.engine.symmetric import symmetric_matmul

# Affine operators whose tangent is the operator applied to the tangents, with these
# argument positions (additive constants) left out; all others of AFFINE_OPS keep theirs.
ADDITIVE = {"addmm": (0,), "convolution": (2,)}
SUMS = frozenset({"add", "sub"})
NO_TANGENT_RULE = frozenset({"index_add", "scatter", "scatter_add", "gather", "as_strided"})
MASKED = frozenset({"amax", "amin", "max", "min"})
# Up to this many tangent columns, curvature terms are summed products: batched matmuls
# of 2 x N by N x 2 run far below the arithmetic's speed.
SMALL_CUT = 4


def unsupported_reason(graph_plan: GraphPlan) -> str | None:
    """None when the direct executor can run this plan, else why not."""
    if any(graph_plan.rules[n].kind is RuleKind.DENSE for n in graph_plan.curvature):
        return "a node takes the dense rule"
    for node in graph_plan.rules:
        if not batched.supports(node):
            return f"no batching rule for {op_name(node)}"
        name = op_name(node)
        if name in NO_TANGENT_RULE or (
            name in MASKED
            and node.target is not torch.ops.aten.amax.default
            and node.target is not torch.ops.aten.amin.default
        ):
            return f"no tangent rule for {name}"
    return None


class _Runner:
    """One call's state: values and per-sample flags for every node."""

    def __init__(self, graph_plan: GraphPlan, tangent_axis: int = 1) -> None:
        self.plan = graph_plan
        # Where tangents keep their columns: [B, m, ...] (1, the Hessian's terms) or
        # [m, B, ...] (0, the forward-Laplacian pass: contiguous columns, cheap broadcasts).
        self.tangent_axis = tangent_axis
        self.graph = graph_plan.graph
        self.values: dict[fx.Node, object] = {}
        self.per_sample: set[fx.Node] = set()

    def run_values(
        self, x: torch.Tensor, targets: torch.Tensor, eps: dict[fx.Node, torch.Tensor]
    ) -> None:
        self.dtype, self.device = x.dtype, x.device
        placeholders = [n for n in self.graph.graph.nodes if n.op == "placeholder"]
        self.values[placeholders[0]] = x.unsqueeze(1)
        self.values[placeholders[1]] = targets
        self.per_sample = {placeholders[0], placeholders[1]}
        for node in self.graph.graph.nodes:
            if node.op == "get_attr":
                self.values[node] = getattr(self.graph, str(node.target))
            elif node.op == "call_function":
                args = tensor_args(node)
                flags = [arg in self.per_sample for arg in args]
                value = batched.apply(node, [self.values[a] for a in args], flags, 1)  # type: ignore[misc]
                if any(flags):
                    self.per_sample.add(node)
                if node in eps:
                    assert isinstance(value, torch.Tensor)
                    value = value + eps[node]
                self.values[node] = value

    def plan_zeros(self, shape: torch.Size) -> torch.Tensor:
        """Zeros of one sample's ``shape``, in the graph's dtype and device."""
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def lifted(self, node: fx.Node) -> torch.Tensor:
        """A node's value with the tangent axis added (``[B, 1, ...]``) if per-sample."""
        value = self.values[node]
        assert isinstance(value, torch.Tensor)
        return value.unsqueeze(self.tangent_axis) if node in self.per_sample else value


def _tangent(runner: _Runner, node: fx.Node, tangents: dict[fx.Node, object]) -> object:
    """The tangent ``[B, m, ...]`` of ``node`` from its arguments' tangents."""
    rule = runner.plan.rules[node]
    name = op_name(node)
    args = tensor_args(node)
    dependent = [i for i, a in enumerate(args) if a in tangents]
    if name == "getitem":
        container = tangents[args[0]]
        return container[arg(node, 1)]  # type: ignore[index]
    if name in SUMS:
        total: torch.Tensor | None = None
        rank = batched._rank(node)
        alpha = kwarg(node, "alpha", 1)
        for i in dependent:
            piece = batched._lift(tangents[args[i]], 2, rank)  # type: ignore[arg-type]
            if i == 1 and (name == "sub" or alpha != 1):
                piece = piece * (-alpha if name == "sub" else alpha)
            total = piece if total is None else total + piece
        assert total is not None
        if list(total.shape[2:]) != list(node.meta["val"].shape):
            total = total.expand(*total.shape[:2], *node.meta["val"].shape)
        return total
    pointwise = isinstance(node.target, torch._ops.OpOverload) and (
        torch.Tag.pointwise in node.target.tags
    )
    linear_product = name in ("mul", "div") and rule.kind is RuleKind.ZERO
    if name == "where":
        pointwise = False
    if name in ("mm", "bmm", "addmm", "matmul") and rule.kind is RuleKind.CONTRACTION:
        first, second = (1, 2) if name == "addmm" else (0, 1)
        left = torch.matmul(tangents[args[first]], runner.lifted(args[second]))  # type: ignore[arg-type]
        right = torch.matmul(runner.lifted(args[first]), tangents[args[second]])  # type: ignore[arg-type]
        out = left + right
        if name == "addmm" and args[0] in tangents:
            out = out + batched._lift(tangents[args[0]], 2, 2)  # type: ignore[arg-type]
        return out
    if pointwise and not linear_product and name != "where":
        rank = batched._rank(node)
        shape = list(node.meta["val"].shape)
        values = [_expanded(runner.values[a], a in runner.per_sample, rank, shape, 1) for a in args]
        output = runner.values[node]
        assert isinstance(output, torch.Tensor)
        derivative = first_derivatives(node, tuple(dependent), values, output)
        total = None
        for i in dependent:
            factor = derivative[i].unsqueeze(runner.tangent_axis)
            piece = batched._lift(tangents[args[i]], 2, rank) * factor  # type: ignore[arg-type]
            total = piece if total is None else total + piece
        return total
    if name in MASKED:  # amax/amin: the tangent of the selected element(s)
        x = runner.values[args[0]]
        chosen = runner.values[node]
        assert isinstance(x, torch.Tensor) and isinstance(chosen, torch.Tensor)
        dims = arg(node, 1, [])
        keep = bool(arg(node, 2, False))
        rank = batched._rank(args[0])
        axes = [batched._norm(d, rank) + 1 for d in (dims or range(rank))]
        broadcast = chosen if keep else _unsqueeze_all(chosen, axes)
        mask = (x == broadcast).to(x.dtype)
        mask = mask / mask.sum(dim=axes, keepdim=True)
        picked = (tangents[args[0]] * mask.unsqueeze(runner.tangent_axis)).sum(  # type: ignore[operator]
            dim=[a + 1 for a in axes], keepdim=keep
        )
        return picked
    if name.startswith("max_pool") and name.endswith("with_indices"):
        source = tangents[args[0]]
        assert isinstance(source, torch.Tensor)
        if runner.tangent_axis == 0:  # the gather below indexes [B, m, ...]
            picked, _ = _pooled_tangent(runner, node, source.transpose(0, 1))
            return picked.transpose(0, 1), None
        return _pooled_tangent(runner, node, source)
    if name == "where":
        condition = runner.lifted(args[0])
        rank = batched._rank(node)
        shape = list(node.meta["val"].shape)
        branches = [
            _expanded(tangents[a], True, rank, shape, 2) if a in tangents else 0.0 for a in args[1:]
        ]
        return torch.where(condition, *branches)
    # Affine: the operator on the tangents, additive constants dropped.
    inputs: list[torch.Tensor | None] = []
    flags: list[bool] = []
    for i, item in enumerate(args):
        if item in tangents:
            inputs.append(tangents[item])  # type: ignore[arg-type]
            flags.append(True)
        elif i in ADDITIVE.get(name, ()):
            inputs.append(None)
            flags.append(False)
        elif name in ("cat", "stack"):
            inputs.append(runner.plan_zeros(item.meta["val"].shape))
            flags.append(False)
        else:
            inputs.append(runner.lifted(item))
            flags.append(item in runner.per_sample)
    if name in ("cat", "stack"):
        leading = next(t for t, f in zip(inputs, flags, strict=True) if f).shape[:2]  # type: ignore[union-attr]
        inputs = [
            t if f else t.expand(*leading, *t.shape)  # type: ignore[union-attr]
            for t, f in zip(inputs, flags, strict=True)
        ]
        flags = [True] * len(inputs)
    if name in ("constant_pad_nd", "masked_fill"):
        return _with_zero_fill(node, inputs)
    if name == "convolution" and flags[1]:
        raise NotImplementedError("a convolution whose weights depend on the input")
    return batched.apply(node, inputs, flags, 2)


def _with_zero_fill(node: fx.Node, inputs: list[torch.Tensor | None]) -> object:
    """``constant_pad_nd`` / ``masked_fill`` of a tangent pad or fill with zero."""
    x = inputs[0]
    assert x is not None
    if op_name(node) == "constant_pad_nd":
        pad = arg(node, 1)
        return torch.nn.functional.pad(x, list(pad), value=0.0)
    mask = inputs[1]
    assert mask is not None
    return x.masked_fill(mask, 0.0)


def _unsqueeze_all(tensor: torch.Tensor, axes: list[int]) -> torch.Tensor:
    for axis in sorted(axes):
        tensor = tensor.unsqueeze(axis)
    return tensor


def _expanded(
    value: object, per_sample: bool, rank: int, shape: list[int], lead: int
) -> torch.Tensor:
    """A value broadcast to a node's per-sample output ``shape`` (batched layout)."""
    assert isinstance(value, torch.Tensor)
    if not per_sample:
        return value.expand(*shape) if list(value.shape) != shape else value
    lifted = batched._lift(value, lead, rank)
    return lifted.expand(*lifted.shape[:lead], *shape)


def _pooled_tangent(
    runner: _Runner, node: fx.Node, tangent: torch.Tensor
) -> tuple[torch.Tensor, None]:
    """Max-pooling routes each output to one input element: gather the tangents there."""
    pooled = runner.values[node]
    assert isinstance(pooled, tuple)
    indices: torch.Tensor = pooled[1]
    batch, m = tangent.shape[:2]
    flat = tangent.reshape(batch, m, *tangent.shape[2:4], -1)
    index = indices.reshape(batch, 1, *indices.shape[1:3], -1).expand(
        batch, m, *indices.shape[1:3], -1
    )
    picked = flat.gather(-1, index).reshape(batch, m, *indices.shape[1:])
    return picked, None


def hessian(
    graph_plan: GraphPlan, x: torch.Tensor, targets: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, k, n, n]`` Hessians and the ``[B, m_out]`` flat outputs for samples ``x``."""
    batch, n = x.shape[0], x[0].numel()
    runner = _Runner(graph_plan)
    eps = {
        node: x.new_zeros(batch, *shape).requires_grad_(True)
        for node, shape in zip(graph_plan.curvature, graph_plan.eps_shapes, strict=True)
    }
    output_node = next(node for node in graph_plan.graph.graph.nodes if node.op == "output")
    scalars_node, out_node = output_node.args[0]
    if graph_plan.affine_prefix and graph_plan.constant_cut_jacobian is None:
        graph_plan.constant_cut_jacobian = _constant_jacobian(graph_plan, x, targets)
    needs_input_grad = not graph_plan.cut_is_input and graph_plan.constant_cut_jacobian is None
    source = x.detach().requires_grad_(needs_input_grad)
    with torch.enable_grad():
        runner.run_values(source, targets, eps)
        scalars = runner.values[scalars_node]
        assert isinstance(scalars, torch.Tensor)
        flat_out = runner.values[out_node]
        leaves = list(eps.values())
        adjoints = (
            [
                torch.autograd.grad(
                    scalars[:, j].sum(), leaves, retain_graph=True, allow_unused=True
                )
                for j in range(k)
            ]
            if leaves
            else []
        )
        j_cut = _cut_jacobian(graph_plan, runner, source, n)
    assert isinstance(flat_out, torch.Tensor)
    h_cut = _cut_hessian(graph_plan, runner, adjoints, k, batch)
    if graph_plan.cut_is_input:
        return h_cut, flat_out.detach()
    assert j_cut is not None
    left = j_cut.transpose(-1, -2)  # [n, m] or [B, n, m]
    if left.dim() == 3:
        left = left.unsqueeze(1)  # one per sample, shared by the k scalars
    # J_c^T (H_c J_c) is symmetric: the upper block triangle and a mirror (5/8 the flops).
    full = symmetric_matmul(left, torch.matmul(h_cut, j_cut.unsqueeze(-3)))
    return full, flat_out.detach()


def _constant_jacobian(
    graph_plan: GraphPlan, x: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """``J_c`` of an affine prefix, ``[m, n]``: the same at every input, so once."""
    prefix = graph_plan.prefix
    assert prefix is not None
    sample, target = x[:1].detach(), targets[0]
    jacobian: torch.Tensor = torch.func.jacrev(lambda value: prefix(value, target))(sample)
    return jacobian.reshape(graph_plan.cut_size, -1).detach()


def _cut_jacobian(
    graph_plan: GraphPlan, runner: _Runner, source: torch.Tensor, n: int
) -> torch.Tensor | None:
    """``J_c``: the cached constant, or ``[B, m, n]`` by one backward pass per element."""
    if graph_plan.cut_is_input:
        return None
    if graph_plan.constant_cut_jacobian is not None:
        return graph_plan.constant_cut_jacobian.to(source.dtype)
    cut = runner.values[graph_plan.cut]
    assert isinstance(cut, torch.Tensor)
    flat = cut.reshape(cut.shape[0], -1)
    rows = [
        torch.autograd.grad(flat[:, i].sum(), source, retain_graph=True)[0].reshape(cut.shape[0], n)
        for i in range(flat.shape[1])
    ]
    return torch.stack(rows, dim=1).detach()


def _cut_hessian(
    graph_plan: GraphPlan,
    runner: _Runner,
    adjoints: Sequence[tuple[torch.Tensor | None, ...]],
    k: int,
    batch: int,
) -> torch.Tensor:
    cut = graph_plan.cut
    m = graph_plan.cut_size
    value = runner.values[cut]
    assert isinstance(value, torch.Tensor)
    shape = value.shape[1:]
    seed = torch.eye(m, dtype=value.dtype, device=value.device).reshape(1, m, *shape)
    tangents: dict[fx.Node, object] = {cut: seed.expand(batch, m, *shape)}
    downstream = graph_plan.downstream
    total = value.new_zeros(batch, k, m, m)
    with torch.no_grad():
        for node in graph_plan.graph.graph.nodes:
            if node not in downstream or node is cut or node not in graph_plan.rules:
                continue
            if graph_plan.rules[node].kind is RuleKind.CONSTANT:
                continue
            if not any(a in tangents for a in tensor_args(node)):
                continue
            tangents[node] = _tangent(runner, node, tangents)
        for index, node in enumerate(graph_plan.curvature):
            grads = [adjoints[j][index] for j in range(k)]
            if any(g is None for g in grads):
                continue
            adjoint = torch.stack(grads, dim=1)  # type: ignore[arg-type]  # [B, k, *S]
            total = total + _term(runner, node, adjoint, tangents)
    return total


def _term(
    runner: _Runner, node: fx.Node, adjoint: torch.Tensor, tangents: dict[fx.Node, object]
) -> torch.Tensor:
    rule = runner.plan.rules[node]
    args = tensor_args(node)
    batch, k = adjoint.shape[:2]
    if rule.kind is RuleKind.CONTRACTION:
        name = op_name(node)
        first, second = (1, 2) if name == "addmm" else (0, 1)
        left = tangents[args[first]]
        right = tangents[args[second]]
        assert isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor)
        m = left.shape[1]
        if left.dim() == 4:  # mm per sample: add a matrix-batch axis of one
            left, right, adjoint = left.unsqueeze(2), right.unsqueeze(2), adjoint.unsqueeze(2)
        pulled = torch.einsum("Bkbij,Bqblj->Bkqbil", adjoint, right)
        term = torch.matmul(
            left.reshape(batch, 1, m, -1), pulled.reshape(batch, k, m, -1).transpose(-1, -2)
        )
        return term + term.transpose(-1, -2)
    rank = batched._rank(node)
    shape = list(node.meta["val"].shape)
    values = [_expanded(runner.values[a], a in runner.per_sample, rank, shape, 1) for a in args]
    derivatives = second_derivatives(node, rule, values)
    flat_adjoint = adjoint.reshape(batch, k, -1)
    total: torch.Tensor | None = None
    for (p, q), d2 in derivatives.items():
        size = flat_adjoint.shape[-1]
        left = _expanded(tangents[args[p]], True, rank, shape, 2).reshape(batch, -1, size)
        right = _expanded(tangents[args[q]], True, rank, shape, 2).reshape(batch, -1, size)
        weights = flat_adjoint * d2.reshape(batch, 1, -1)  # [B, k, N]
        weighted = left.unsqueeze(1) * weights.unsqueeze(2)  # [B, k, m, N]
        if left.shape[1] <= SMALL_CUT:  # a few columns: products, not tiny matmuls
            term = torch.stack(
                [(weighted * right[:, None, j : j + 1]).sum(-1) for j in range(right.shape[1])],
                dim=-1,
            )
        else:
            term = torch.matmul(weighted, right.transpose(-1, -2).unsqueeze(1))
        if p != q:
            term = term + term.transpose(-1, -2)
        total = term if total is None else total + term
    assert total is not None
    return total
