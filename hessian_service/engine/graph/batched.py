"""Run one captured per-sample node on many samples (and tangents) at once, by hand.

A captured graph is traced for one sample (``[1, *shape]``). The direct executor runs it
on tensors with ``lead`` extra leading dimensions -- ``[B]`` samples for values,
``[B, m]`` samples and tangent directions for Jacobians -- without ``torch.func.vmap``,
whose per-operator dispatch costs more than the arithmetic on small layers. Each operator
family has one batching rule here: elementwise operators broadcast, products and
convolutions fold the leading dimensions into their batch dimension (or broadcast in
``matmul``), reductions and views shift their dimension arguments, and shape arguments
get the leading sizes prefixed. ``supports`` says whether a node has a rule; a graph with
any node without one runs on the vmap executor instead.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from hessian_service.engine.graph.rules import arg, call_with, kwarg, names, op_name

aten = torch.ops.aten

ELEMENTWISE_LIKE = names(
    """
    where _to_copy clone alias lift_fresh_copy contiguous zeros_like ones_like full_like
    detach masked_fill
    """
)
FOLDED = names(
    """
    convolution max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices
    _adaptive_avg_pool1d _adaptive_avg_pool2d _adaptive_avg_pool3d avg_pool1d avg_pool2d
    avg_pool3d adaptive_avg_pool1d constant_pad_nd
    """
)
PRODUCTS = names("mm bmm addmm matmul")
REDUCTIONS = names("sum mean amax amin all any")  # (x, dims?, keepdim)
ONE_DIM = {  # op -> (position of the dim argument, per-sample rank offset of the output)
    "select": 1,
    "slice": 1,
    "index_select": 1,
    "split": 2,
    "split_with_sizes": 2,
    "unsafe_split": 2,
    "unbind": 1,
    "squeeze": 1,
    "cumsum": 1,
    "argmax": 1,
}
SHAPES = names("view reshape _unsafe_view expand")
CONSTRUCTORS = names("zeros full ones empty scalar_tensor arange")


def supports(node: fx.Node) -> bool:
    """Whether ``apply`` has a batching rule for ``node``."""
    name = op_name(node)
    target = node.target
    if name == "getitem" or name in CONSTRUCTORS:
        return True
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        return True
    if name in FOLDED:
        first = node.all_input_nodes[0]
        value = first.meta.get("val")
        return isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == 1
    return name in (ELEMENTWISE_LIKE | PRODUCTS | REDUCTIONS | SHAPES | set(ONE_DIM)) or name in {
        "cat",
        "stack",
        "unsqueeze",
        "transpose",
        "permute",
        "t",
        "flip",
        "index",
    }


def _rank(node: fx.Node) -> int:
    value = node.meta["val"]
    return int(value.dim())


def _norm(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _lift(tensor: torch.Tensor, lead: int, rank: int) -> torch.Tensor:
    """A batched ``[*E, *S]`` with per-sample rank below ``rank``, as ``[*E, 1.., *S]``."""
    missing = rank - (tensor.dim() - lead)
    if missing <= 0:
        return tensor
    return tensor.reshape(*tensor.shape[:lead], *([1] * missing), *tensor.shape[lead:])


def apply(
    node: fx.Node,
    tensors: Sequence[torch.Tensor | None],
    batched: Sequence[bool],
    lead: int,
) -> object:
    """``node``'s operator on its flat tensor arguments (``tensor_args`` order), where
    ``batched[i]`` says whether argument ``i`` carries the ``lead`` leading dimensions."""
    name = op_name(node)
    target = node.target
    inputs = node.all_input_nodes
    if name == "getitem":
        container = tensors[0]
        return container[arg(node, 1)]  # type: ignore[index]
    if not any(batched):
        return _call(node, list(tensors))
    if name in FOLDED:
        x = tensors[0]
        assert x is not None
        leading = x.shape[:lead]
        folded = x.reshape(-1, *x.shape[lead + 1 :])
        out = _call(node, [folded, *tensors[1:]])
        if isinstance(out, (tuple, list)):
            return tuple(t.reshape(*leading, 1, *t.shape[1:]) for t in out)
        assert isinstance(out, torch.Tensor)
        return out.reshape(*leading, 1, *out.shape[1:])
    if name in PRODUCTS:
        return _product(node, name, tensors, batched, lead)
    pointwise = isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags
    if pointwise or name in ELEMENTWISE_LIKE:
        rank = _rank(node)
        lifted = [
            _lift(t, lead, rank) if (t is not None and b) else t
            for t, b in zip(tensors, batched, strict=True)
        ]
        return _call(node, lifted)
    x = tensors[0]
    assert x is not None
    in_rank = _rank(inputs[0])
    args: list[Any] = list(node.args)
    if name in REDUCTIONS:
        dims = args[1] if len(args) > 1 and args[1] not in (None, []) else range(in_rank)
        dims = [dims] if isinstance(dims, int) else dims
        keep = bool(args[2]) if len(args) > 2 else False
        shifted = [_norm(d, in_rank) + lead for d in dims]
        reduce = getattr(torch, "amax" if name == "amax" else "amin" if name == "amin" else name)
        if name in ("all", "any"):
            return reduce(x, dim=shifted[0], keepdim=keep)
        return reduce(x, dim=shifted, keepdim=keep)
    if name in ONE_DIM:
        position = ONE_DIM[name]
        if name == "squeeze" and node.target is aten.squeeze.dims:
            dims = [_norm(d, in_rank) + lead for d in args[1]]
            return torch.squeeze(x, dim=tuple(dims))
        dim = args[position] if len(args) > position else kwarg(node, "dim", 0)
        assert isinstance(dim, int)
        while len(args) <= position:
            args.append(None)
        args[position] = _norm(dim, in_rank) + lead
        args[0] = x
        if name == "index_select":
            args[2] = tensors[1]
        return target(*args)  # type: ignore[operator]
    if name in ("cat", "stack"):
        pieces = [
            t if b else t.expand(*x.shape[:lead], *t.shape)  # type: ignore[union-attr]
            for t, b in zip(tensors, batched, strict=True)
        ]
        first = arg(node, 0)[0]
        rank = _rank(first) + (1 if name == "stack" else 0)
        dim = arg(node, 1, 0)
        assert isinstance(dim, int)
        join = torch.cat if name == "cat" else torch.stack
        return join(pieces, dim=_norm(dim, rank) + lead)  # type: ignore[arg-type]
    if name == "unsqueeze":
        dim = arg(node, 1)
        assert isinstance(dim, int)
        return x.unsqueeze(_norm(dim, in_rank + 1) + lead)
    if name == "transpose":
        d0, d1 = arg(node, 1), arg(node, 2)
        assert isinstance(d0, int) and isinstance(d1, int)
        return x.transpose(_norm(d0, in_rank) + lead, _norm(d1, in_rank) + lead)
    if name == "t":
        return x if in_rank < 2 else x.transpose(lead, lead + 1)
    if name == "permute":
        dims = arg(node, 1)
        assert isinstance(dims, (list, tuple))
        return x.permute(*range(lead), *(_norm(d, in_rank) + lead for d in dims))
    if name == "flip":
        dims = arg(node, 1)
        assert isinstance(dims, (list, tuple))
        return x.flip([_norm(d, in_rank) + lead for d in dims])
    if name in SHAPES:
        sizes = list(arg(node, 1))
        prefix = list(x.shape[:lead])
        if name == "expand":
            x = _lift(x, lead, len(sizes))
            return x.expand(*prefix, *sizes)
        return x.reshape(*prefix, *sizes)
    if name == "index":
        indices = arg(node, 1)
        assert isinstance(indices, (list, tuple))
        supply = iter(tensors[1:])
        chosen = tuple(slice(None) if i is None else next(supply) for i in indices)
        return x[(slice(None),) * lead + chosen]
    raise NotImplementedError(f"no batching rule for {name}")


def _product(
    node: fx.Node,
    name: str,
    tensors: Sequence[torch.Tensor | None],
    batched: Sequence[bool],
    lead: int,
) -> torch.Tensor:
    if name == "addmm":
        bias, left, right = tensors
        assert left is not None and right is not None
        product = torch.matmul(left, right)
        if bias is None:
            return product
        if batched[0]:
            bias = _lift(bias, lead, 2)
        beta = kwarg(node, "beta", 1)
        alpha = kwarg(node, "alpha", 1)
        return beta * bias + alpha * product if (beta, alpha) != (1, 1) else bias + product
    left, right = tensors[0], tensors[1]
    assert left is not None and right is not None
    return torch.matmul(left, right)  # matmul broadcasts the leading (batched) dimensions


def _call(node: fx.Node, tensors: list[torch.Tensor | None]) -> object:
    if node.target is operator.getitem:
        container = tensors[0]
        return container[arg(node, 1)]  # type: ignore[index]
    return call_with(node, tensors, {})  # type: ignore[arg-type]
