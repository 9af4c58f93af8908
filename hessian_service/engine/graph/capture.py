"""Capture a model's computation as an ATen-level ``torch.fx`` graph of one sample.

Every model the engine sees -- a Python ``nn.Module``, a TorchScript module, the module of
a ``torch.export`` archive -- runs its operators through the dispatcher, so
``make_fx`` records them all the same way: a flat graph of ATen operators with the weights
as constants, for one sample's shape. Composite operators that the node rules do not know
(layer/group/RMS norm, softmax, variance, attention, fused multiply-adds) are decomposed
into ones they do, and the graph is functionalized (no in-place ops, no aliasing views), so
that each node is a pure function of its inputs. Attention is traced with the math SDPA
backend and without the fused "fast path" kernels, which have no derivatives.

What cannot be traced (data-dependent control flow, unsupported operators) raises
``CaptureError``; the caller falls back to the generic path and reports why.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch._decomp import get_decompositions
from torch.func import functionalize
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.attention import SDPBackend, sdpa_kernel

from hessian_service.engine.graph.rules import names

aten = torch.ops.aten

# Composite operators rewritten into pointwise ops, reductions and products before the
# rules see them (each of these has a decomposition in torch._decomp).
DECOMPOSED = (
    aten.native_layer_norm,
    aten.native_group_norm,
    aten._fused_rms_norm,
    aten._softmax,
    aten._safe_softmax,
    aten._log_softmax,
    aten.std,
    aten.logsumexp,
    aten.linalg_vector_norm,
    aten.addcmul,
    aten.addcdiv,
    aten.glu,
    aten.hardswish,
    aten.mv,
    aten.dot,
    aten.addmv,
    aten.baddbmm,
    aten._scaled_dot_product_flash_attention_for_cpu,
    aten.native_batch_norm,
    aten._native_batch_norm_legit_no_training,
)


def _var(
    x: torch.Tensor,
    dim: list[int] | None = None,
    *,
    correction: float | None = None,
    keepdim: bool = False,
) -> torch.Tensor:
    """Variance as ATen means and products (torch's own decomposition emits prims ops)."""
    dims = list(range(x.dim())) if dim is None else list(dim)
    count = 1
    for d in dims:
        count *= x.shape[d]
    centred = x - x.mean(dims, keepdim=True)
    squares = (centred * centred).sum(dims, keepdim=keepdim)
    return squares / max(count - (1.0 if correction is None else correction), 0.0)


def _var_mean(
    x: torch.Tensor,
    dim: list[int] | None = None,
    *,
    correction: float | None = None,
    keepdim: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    dims = list(range(x.dim())) if dim is None else list(dim)
    return _var(x, dims, correction=correction, keepdim=keepdim), x.mean(dims, keepdim=keepdim)


def _convolution(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    transposed: bool,
    output_padding: list[int],
    groups: int,
    *_backend_flags: bool,
) -> torch.Tensor:
    """``torch.jit.trace`` records convolutions as ``_convolution`` (with cuDNN flags):
    the same convolution."""
    result: torch.Tensor = aten.convolution.default(
        x, weight, bias, stride, padding, dilation, transposed, output_padding, groups
    )
    return result


_DECOMPOSITIONS: dict[Any, Callable[..., Any]] = {
    aten._convolution.default: _convolution,
    **get_decompositions(list(DECOMPOSED)),
    aten.var.correction: _var,
    aten.var_mean.correction: _var_mean,
}


class CaptureError(RuntimeError):
    """The model could not be traced into a graph the rules can read."""


def capture(function: Callable[..., object], *example_args: torch.Tensor) -> fx.GraphModule:
    """``function`` traced on ``example_args`` as a pure ATen graph.

    The graph is valid for inputs of exactly these shapes, dtypes and devices (the caller
    caches one per shape).
    """
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
    try:
        with (
            sdpa_kernel(SDPBackend.MATH),
            warnings.catch_warnings(),  # mkldnn.flags warns about Intel GPUs' TF32
            torch.backends.mkldnn.flags(enabled=False),  # LSTM: ATen cells, not one mkldnn op
            torch.enable_grad(),
        ):
            # Functionalize first (RNN cells mutate in place), then decompose the pure graph.
            pure = make_fx(functionalize(function, remove="mutations_and_views"))(*example_args)
            graph = make_fx(pure, decomposition_table=_DECOMPOSITIONS)(*example_args)
    except Exception as error:  # any tracing failure means "not this path", never a crash
        raise CaptureError(f"{type(error).__name__}: {error}") from error
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    _without_mutations(graph.graph)
    _views_for_copies(graph.graph)
    _reshapes_for_strides(graph.graph)
    graph.graph.eliminate_dead_code()
    graph.recompile()
    _check_same(graph, function, example_args)
    return graph


def _check_same(
    graph: fx.GraphModule, function: Callable[..., object], args: tuple[torch.Tensor, ...]
) -> None:
    """The graph must compute what the model does on the example (up to the rounding of
    decomposed operators); a model with randomness or hidden state fails here."""
    with torch.no_grad():
        expected = function(*args)
        got = graph(*args)
    pairs = zip(_tensors(expected), _tensors(got), strict=False)
    for want, have in pairs:
        scale = float(want.abs().max()) if want.numel() else 0.0
        tolerance = (1e-9 if want.dtype == torch.float64 else 1e-4) * max(1.0, scale)
        if want.shape != have.shape or float((want - have).abs().max()) > tolerance:
            raise CaptureError("the captured graph does not reproduce the model's output")


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _out_of_place(op: torch._ops.OpOverload) -> torch._ops.OpOverload:
    """The out-of-place overload taking the same arguments as in-place ``op``."""
    packet = getattr(aten, op._opname[:-1], None)
    if packet is None:
        raise CaptureError(f"in-place operator {op} has no out-of-place form")
    arity = len(op._schema.arguments)
    for overload in [op._overloadname, *packet.overloads()]:
        candidate = getattr(packet, overload, None)
        if candidate is not None and len(candidate._schema.arguments) == arity:
            return candidate  # type: ignore[no-any-return]
    raise CaptureError(f"in-place operator {op} has no out-of-place form")


# Functionalization turns views into copies (``select_copy``); vmap has batching rules
# for the views only, so the pure graph reads views again (nothing in it mutates).
VIEW_COPIES = names(
    """
    permute_copy transpose_copy select_copy squeeze_copy unsqueeze_copy
    expand_copy slice_copy alias_copy t_copy unbind_copy split_copy split_with_sizes_copy
    diagonal_copy as_strided_copy unfold_copy
    """
)


def _views_for_copies(graph: fx.Graph) -> None:
    for node in graph.nodes:
        target = node.target
        if target is aten.view_copy.default:  # a copy works on any strides; a view may not
            node.target = aten.reshape.default
        elif isinstance(target, torch._ops.OpOverload) and target._opname in VIEW_COPIES:
            packet = getattr(aten, target._opname[: -len("_copy")])
            node.target = getattr(packet, target._overloadname)


def _contiguous_strides(shape: list[int]) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return list(reversed(strides))


def _reshapes_for_strides(graph: fx.Graph) -> None:
    """``as_strided`` of a contiguous tensor with contiguous strides is a reshape (group
    norm's decomposition emits them); reshapes have batching and tangent rules."""
    for node in graph.nodes:
        if node.target is not aten.as_strided.default or len(node.args) > 3:
            continue
        source, size, stride = node.args[0], list(node.args[1]), list(node.args[2])
        value = source.meta.get("val") if isinstance(source, fx.Node) else None
        if not isinstance(value, torch.Tensor) or not value.is_contiguous():
            continue
        if value.numel() == node.meta["val"].numel() and stride == _contiguous_strides(size):
            node.target = aten.reshape.default
            node.args = (source, size)


def _without_mutations(graph: fx.Graph) -> None:
    """Rewrite in-place ops (``sigmoid_``, ``add_``; some decompositions emit them after
    functionalization) into their out-of-place forms, later readers of the mutated tensor
    reading the new node. Exact in a straight-line graph whose mutated tensors have no
    other live views; ``capture``'s caller checks the graph against the model anyway."""
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        if not schema.arguments or not schema.arguments[0].is_write:
            continue
        name = node.target._opname
        if not name.endswith("_"):
            raise CaptureError(f"in-place operator {node.target} has no out-of-place form")
        functional = _out_of_place(node.target)
        mutated = node.args[0]
        with graph.inserting_after(node):
            replacement = graph.call_function(functional, node.args, node.kwargs)
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        later = False
        for other in list(graph.nodes):
            if other is replacement:
                later = True
                continue
            if later and other is not replacement:
                other.replace_input_with(mutated, replacement)
        graph.erase_node(node)
