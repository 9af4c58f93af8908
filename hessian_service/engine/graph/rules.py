"""The node rules: what each ATen operator contributes to an input Hessian.

A captured graph's nodes are classified once, at plan time. With ``J_u`` the Jacobian of
a node's input ``u`` with respect to the propagated variable and ``g`` the gradient of the
selected scalar with respect to the node's output ``y``, the Hessian is the sum over nodes
of their curvature terms (docs/engine.md, "The graph engine"):

- ``ZERO``: affine maps (views, slices, concatenation, sums, means, convolutions and
  products with a constant, pooling by averages, batch norm in eval mode) and piecewise
  linear ones (ReLU, clamps, max-pooling, ``where``, max/min): no curvature term; their
  tangents are propagated by forward-mode AD and cost one pass.
- ``POINTWISE``: elementwise functions of one or more inputs that depend on the input
  (tanh, GELU, SiLU, sin, a custom activation's ATen ops, products and quotients of two
  activations): ``sum_pq J_p^T diag(g * d2y/du_p du_q) J_q``, the second derivatives per
  element taken by nested forward-mode AD of the operator itself -- so any elementwise
  operator is covered, including ones no table lists.
- ``CONTRACTION``: a matrix product of two dependent operands (attention's ``Q K^T`` and
  ``P V``, gated recurrent cells): the bilinear cross term ``T + T^T`` with
  ``T = sum_ijk g_ij dA_ik (x) dB_kj``.
- ``DENSE``: any other differentiable operator on a small input (up to ``DENSE_LIMIT``
  elements): the dense Hessian of ``g . y(u)`` by ``torch.func``, pulled back by ``J_u``.
- ``CONSTANT``: outputs with no derivative (comparisons, integer results, ``*_like``
  constructors): the node does not depend on the input.

Anything else that depends on the input is ``UNSUPPORTED`` and sends the model to the
generic path, naming the node in the capability report. Adding an operator is adding its
name to one of the tables below (or nothing, for an elementwise one).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import fx


def names(text: str) -> frozenset[str]:
    """Operator names written as whitespace-separated words."""
    return frozenset(text.split())


# Operators whose output is affine in the inputs that depend on the input (with the other
# operands constant), or that only move, copy or select elements.
AFFINE_OPS = names(
    """
    view _unsafe_view reshape view_copy permute permute_copy transpose transpose_copy t
    t_copy expand expand_copy clone alias alias_copy detach squeeze squeeze_copy unsqueeze
    unsqueeze_copy slice slice_copy select select_copy index index_select gather cat stack
    split split_with_sizes unsafe_split unbind unbind_copy split_copy split_with_sizes_copy
    flip roll repeat as_strided as_strided_copy constant_pad_nd _to_copy contiguous flatten
    unflatten narrow diagonal diagonal_copy tril triu masked_fill lift_fresh_copy
    add sub neg sum mean cumsum convolution _adaptive_avg_pool1d _adaptive_avg_pool2d
    _adaptive_avg_pool3d adaptive_avg_pool1d avg_pool1d avg_pool2d avg_pool3d linear
    trace upsample_nearest1d upsample_nearest2d upsample_bilinear2d pixel_shuffle
    pixel_unshuffle im2col col2im scatter scatter_add index_add reflection_pad1d
    reflection_pad2d replication_pad1d replication_pad2d
    """
)
# Piecewise linear: their second derivatives vanish almost everywhere.
PIECEWISE_LINEAR_OPS = names(
    """
    relu leaky_relu hardtanh clamp clamp_min clamp_max abs maximum minimum threshold
    max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices
    max_pool3d_with_indices adaptive_max_pool1d adaptive_max_pool2d amax amin max min
    where relu6 hardsigmoid _prelu_kernel prelu sort topk
    """
)
# Outputs that never depend on their inputs' values: only on shapes.
SHAPE_ONLY_OPS = names(
    """
    zeros_like ones_like full_like empty_like rand_like randn_like new_zeros new_ones
    new_full new_empty
    """
)
# Products: affine when at most one operand depends on the input, a contraction when two do.
PRODUCT_OPS = frozenset({"mm", "bmm", "addmm", "matmul"})
# Elementwise products/quotients are affine in a dependent numerator over a constant.
LINEAR_IN_FIRST_OPS = frozenset({"div"})
LINEAR_IN_EACH_OPS = frozenset({"mul"})
# Nodes at most this large (elements of their dependent inputs, per sample) may take the
# dense rule: its Hessian block is DENSE_LIMIT^2 numbers.
DENSE_LIMIT = 1024


class RuleKind(Enum):
    """How a node enters the Hessian; see the module docstring."""

    CONSTANT = "constant"
    ZERO = "zero"
    POINTWISE = "pointwise"
    CONTRACTION = "contraction"
    DENSE = "dense"
    UNSUPPORTED = "unsupported"

    @property
    def has_curvature(self) -> bool:
        return self in (RuleKind.POINTWISE, RuleKind.CONTRACTION, RuleKind.DENSE)


@dataclass(frozen=True)
class NodeRule:
    """A node's rule and which of its tensor arguments depend on the input."""

    kind: RuleKind
    dependent_args: tuple[int, ...] = ()  # positions in the node's flat tensor args

    @property
    def has_curvature(self) -> bool:
        return self.kind.has_curvature


def op_name(node: fx.Node) -> str:
    """The operator's name without overload (``addmm``), or the node's target as text."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return str(target._opname)
    if target is operator.getitem:
        return "getitem"
    return str(target)


def arg(node: fx.Node, position: int, default: Any = None) -> Any:
    """A node's positional argument (``default`` when absent), untyped: fx types
    arguments as a wide union, and each rule knows what its operator's schema says."""
    return node.args[position] if len(node.args) > position else default


def kwarg(node: fx.Node, name: str, default: Any = None) -> Any:
    """A node's keyword argument, untyped (see ``arg``)."""
    return node.kwargs.get(name, default)


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The node's arguments that are graph nodes, flattened (``cat`` takes a list)."""
    found: list[fx.Node] = []
    for arg in (*node.args, *node.kwargs.values()):
        items = arg if isinstance(arg, (list, tuple)) else [arg]
        found.extend(item for item in items if isinstance(item, fx.Node))
    return found


def _floating(node: fx.Node) -> bool:
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return value.is_floating_point()
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in value)
    return False


def numel(node: fx.Node) -> int:
    value = node.meta.get("val")
    return int(value.numel()) if isinstance(value, torch.Tensor) else 0


def classify(node: fx.Node, dependent: set[fx.Node]) -> NodeRule:
    """The rule of ``node`` given the set of nodes already known to depend on the input."""
    args = tensor_args(node)
    positions = tuple(i for i, arg in enumerate(args) if arg in dependent)
    name = op_name(node)
    if not positions or not _floating(node) or name in SHAPE_ONLY_OPS:
        return NodeRule(RuleKind.CONSTANT)
    if name == "getitem" or name in AFFINE_OPS or name in PIECEWISE_LINEAR_OPS:
        return NodeRule(RuleKind.ZERO, positions)
    if name in PRODUCT_OPS:
        factors = (1, 2) if name == "addmm" else (0, 1)
        both = all(args[i] in dependent for i in factors if i < len(args))
        return NodeRule(RuleKind.CONTRACTION if both else RuleKind.ZERO, positions)
    if name in LINEAR_IN_EACH_OPS and len(positions) == 1:
        return NodeRule(RuleKind.ZERO, positions)
    if name in LINEAR_IN_FIRST_OPS and positions == (0,):
        return NodeRule(RuleKind.ZERO, positions)
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        return NodeRule(RuleKind.POINTWISE, positions)
    single_output = isinstance(node.meta.get("val"), torch.Tensor)
    if single_output and sum(numel(args[i]) for i in positions) <= DENSE_LIMIT:
        return NodeRule(RuleKind.DENSE, positions)
    return NodeRule(RuleKind.UNSUPPORTED, positions)


def call_with(node: fx.Node, tensors: list[torch.Tensor], env: dict[fx.Node, object]) -> object:
    """Run ``node``'s operator with its flat tensor arguments replaced by ``tensors``
    (in ``tensor_args`` order) and any other node argument looked up in ``env``."""
    supply = iter(tensors)
    args = tuple(_substituted(arg, supply) for arg in node.args)
    kwargs = {key: _substituted(arg, supply) for key, arg in node.kwargs.items()}
    assert callable(node.target)
    return node.target(*args, **kwargs)


def _substituted(arg: object, supply: Iterator[torch.Tensor]) -> object:
    """``arg`` with each node in it replaced by the next tensor of ``supply``. A module
    function, not a closure: a closure that calls itself is a reference cycle, and it kept
    every call's tensors alive until the garbage collector ran (48 MB a pass of the
    forward-Laplacian pass on a 3x64x64 CNN)."""
    if isinstance(arg, fx.Node):
        return next(supply)
    if isinstance(arg, (list, tuple)):
        return type(arg)(_substituted(item, supply) for item in arg)
    return arg
