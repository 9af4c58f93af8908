"""The benchmark's torch models as JAX functions with the same weights (the JAX peers).

A JAX user would write each family's forward by hand with ``jax.numpy`` and ``lax``; doing
that per model would give as many chances to get one wrong. Here each torch module is
traced once with ``torch.fx`` (``symbolic_trace``; torch's layer modules stay whole) and
its graph is replayed with JAX operations, one small rule per layer type, function and
method, so every family's JAX forward is exactly the same sequence of operations as its
torch forward, with the torch module's parameters and buffers as ``jnp`` arrays. The
result is a plain function ``forward(params, x)`` that ``jax.jit``, ``jax.hessian`` and
``jax.vmap`` take as they take any hand-written one (the weights are an argument, as
JAX code passes them, not constants folded into the compiled program).

``port(module)`` builds it; ``forward_error(port, module, x)`` is the check the benchmark
runs before timing any JAX peer: max abs difference of the two forwards relative to the
output's scale, required below 1e-5 in float32. An unknown node raises
``UnsupportedNode`` naming it.

Imports JAX: only for ``make bench`` (the ``bench`` extra), never the service.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from jax import lax
from torch import fx, nn

Params = dict[str, jax.Array]


class UnsupportedNode(NotImplementedError):
    """A graph node (module type, function or method) that no rule here ports."""


# --- small helpers ------------------------------------------------------------------------


def _pair(value: int | tuple[int, ...], dims: int) -> tuple[int, ...]:
    return (value,) * dims if isinstance(value, int) else tuple(value)


def _reduce_dims(dim: Any) -> Any:
    """torch's ``dim`` (int, list, tuple or None) as a JAX ``axis``."""
    return tuple(dim) if isinstance(dim, list | tuple) else dim


def _flatten(x: jax.Array, start_dim: int = 0, end_dim: int = -1) -> jax.Array:
    start = start_dim % x.ndim
    end = end_dim % x.ndim
    shape = (*x.shape[:start], math.prod(x.shape[start : end + 1]), *x.shape[end + 1 :])
    return x.reshape(shape)


def _shape_args(args: tuple[Any, ...]) -> tuple[int, ...]:
    """``view(2, 3)`` / ``view((2, 3))`` / ``view([2, 3])`` as one tuple of ints."""
    if len(args) == 1 and isinstance(args[0], list | tuple):
        return tuple(int(a) for a in args[0])
    return tuple(int(a) for a in args)


def _softplus(x: jax.Array, beta: float = 1.0, threshold: float = 20.0) -> jax.Array:
    """torch's softplus: linear above ``threshold`` (in ``beta * x``), as torch computes it."""
    scaled = beta * x
    return jnp.where(scaled > threshold, x, jnp.logaddexp(scaled, 0.0) / beta)


def _gelu(x: jax.Array, approximate: str = "none") -> jax.Array:
    return jax.nn.gelu(x, approximate=approximate == "tanh")


def _conv(
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None,
    stride: Any,
    padding: Any,
    dilation: Any,
    groups: int,
) -> jax.Array:
    """``F.conv1d`` / ``F.conv2d`` (zero padding) with ``lax.conv_general_dilated``."""
    dims = weight.ndim - 2
    kernel = weight.shape[2:]
    dilation = _pair(dilation, dims)
    if isinstance(padding, str):
        if padding == "valid":
            pads = [(0, 0)] * dims
        elif padding == "same":  # torch puts the odd pixel on the right
            totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
            pads = [(t // 2, t - t // 2) for t in totals]
        else:
            raise UnsupportedNode(f"conv padding {padding!r}")
    else:
        pads = [(p, p) for p in _pair(padding, dims)]
    spec = {1: ("NCH", "OIH", "NCH"), 2: ("NCHW", "OIHW", "NCHW")}[dims]
    out = lax.conv_general_dilated(
        x,
        weight,
        window_strides=_pair(stride, dims),
        padding=pads,
        rhs_dilation=dilation,
        dimension_numbers=spec,
        feature_group_count=groups,
    )
    if bias is not None:
        out = out + bias.reshape((1, -1) + (1,) * dims)
    return out


def _conv_transpose(
    x: jax.Array, weight: jax.Array, bias: jax.Array | None, module: nn.ConvTranspose2d
) -> jax.Array:
    """``nn.ConvTranspose2d`` (groups 1) as a convolution of the dilated input with the
    flipped kernel."""
    if module.groups != 1:
        raise UnsupportedNode("ConvTranspose2d with groups")
    kernel = weight.shape[2:]
    stride = _pair(module.stride, 2)
    padding = _pair(module.padding, 2)  # type: ignore[arg-type]
    dilation = _pair(module.dilation, 2)
    extra = _pair(module.output_padding, 2)
    pads = [
        (d * (k - 1) - p, d * (k - 1) - p + e)
        for d, k, p, e in zip(dilation, kernel, padding, extra, strict=True)
    ]
    flipped = jnp.flip(weight, axis=(2, 3)).transpose(1, 0, 2, 3)  # [in, out] -> [out, in]
    out = lax.conv_general_dilated(
        x,
        flipped,
        window_strides=(1, 1),
        padding=pads,
        lhs_dilation=stride,
        rhs_dilation=dilation,
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1)
    return out


def _max_pool(
    x: jax.Array,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    dilation: Any = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> jax.Array:
    """``F.max_pool1d/2d`` with ``lax.reduce_window`` (as flax's ``max_pool`` does)."""
    if ceil_mode or return_indices:
        raise UnsupportedNode("max_pool with ceil_mode or return_indices")
    dims = x.ndim - 2
    kernel = _pair(kernel_size, dims)
    strides = kernel if stride is None or stride == [] else _pair(stride, dims)
    pads = [(p, p) for p in _pair(padding, dims)]
    pooled: jax.Array = lax.reduce_window(
        x,
        -jnp.inf,
        lax.max,
        (1, 1, *kernel),
        (1, 1, *strides),
        [(0, 0), (0, 0), *pads],
        window_dilation=(1, 1, *_pair(dilation, dims)),
    )
    return pooled


def _avg_pool(
    x: jax.Array,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> jax.Array:
    """``F.avg_pool1d/2d``: a window sum over the window size (pads counted, torch's
    default)."""
    if ceil_mode or divisor_override is not None:
        raise UnsupportedNode("avg_pool with ceil_mode or divisor_override")
    dims = x.ndim - 2
    kernel = _pair(kernel_size, dims)
    strides = kernel if stride is None or stride == [] else _pair(stride, dims)
    pads = [(p, p) for p in _pair(padding, dims)]
    if any(p != (0, 0) for p in pads) and not count_include_pad:
        raise UnsupportedNode("avg_pool with padding and count_include_pad=False")
    summed: jax.Array = lax.reduce_window(
        x, 0.0, lax.add, (1, 1, *kernel), (1, 1, *strides), [(0, 0), (0, 0), *pads]
    )
    return summed / math.prod(kernel)


def _adaptive_avg_pool(x: jax.Array, output_size: Any) -> jax.Array:
    """``F.adaptive_avg_pool1d/2d``: torch's windows ``[floor(i*in/out), ceil((i+1)*in/out))``
    per output position (uneven, overlapping where ``in`` is not a multiple of ``out``)."""
    dims = x.ndim - 2
    sizes = _pair(output_size, dims)
    out = x
    for axis_offset, size in enumerate(sizes):
        axis = 2 + axis_offset
        length = out.shape[axis]
        size = length if size is None else size
        slices = []
        for i in range(size):
            start, stop = (i * length) // size, -(-((i + 1) * length) // size)
            window = lax.slice_in_dim(out, start, stop, axis=axis)
            slices.append(window.mean(axis=axis, keepdims=True))
        out = jnp.concatenate(slices, axis=axis)
    return out


def _layer_norm(
    x: jax.Array,
    normalized_shape: Any,
    weight: jax.Array | None = None,
    bias: jax.Array | None = None,
    eps: float = 1e-5,
) -> jax.Array:
    axes = tuple(range(x.ndim - len(_pair(normalized_shape, 1)), x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    out = (x - mean) / jnp.sqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``F.scaled_dot_product_attention`` without mask or dropout: softmax(q k^T / sqrt(d)) v."""
    scores = q @ jnp.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    return jax.nn.softmax(scores, axis=-1) @ v


def _sdpa(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    **_: Any,
) -> jax.Array:
    if attn_mask is not None or dropout_p or is_causal or scale is not None:
        raise UnsupportedNode("scaled_dot_product_attention with mask, dropout or scale")
    return _attention(q, k, v)


def _split(x: jax.Array, chunks: int, dim: int = 0) -> tuple[jax.Array, ...]:
    """``torch.chunk``: pieces of ``ceil(size / chunks)``, the last one shorter."""
    size = x.shape[dim]
    step = -(-size // chunks)
    return tuple(
        lax.slice_in_dim(x, start, min(start + step, size), axis=dim)
        for start in range(0, size, step)
    )


# --- rules --------------------------------------------------------------------------------

# A module rule gets the module (its hyper-parameters), a reader of its parameters in the
# traced ``params`` (by their name inside the module) and the node's arguments.
ParamReader = Callable[[str], "jax.Array | None"]
ModuleRule = Callable[..., Any]  # (module, read params, *node args, **node kwargs)


def _linear(module: nn.Linear, p: ParamReader, x: jax.Array) -> jax.Array:
    weight = p("weight")
    assert weight is not None
    out = x @ weight.T
    bias = p("bias")
    return out if bias is None else out + bias


def _conv_module(module: nn.Conv1d | nn.Conv2d, p: ParamReader, x: jax.Array) -> jax.Array:
    if module.padding_mode != "zeros":
        raise UnsupportedNode(f"{type(module).__name__} padding_mode={module.padding_mode}")
    weight = p("weight")
    assert weight is not None
    return _conv(
        x, weight, p("bias"), module.stride, module.padding, module.dilation, module.groups
    )


def _conv_transpose_module(module: nn.ConvTranspose2d, p: ParamReader, x: jax.Array) -> jax.Array:
    weight = p("weight")
    assert weight is not None
    return _conv_transpose(x, weight, p("bias"), module)


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, p: ParamReader, x: jax.Array) -> jax.Array:
    """Eval-mode batch norm: the running statistics, over channel axis 1."""
    if module.training or not module.track_running_stats:
        raise UnsupportedNode("batch norm in training mode or without running statistics")
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean, var = p("running_mean"), p("running_var")
    assert mean is not None and var is not None
    out = (x - mean.reshape(shape)) / jnp.sqrt(var.reshape(shape) + module.eps)
    weight, bias = p("weight"), p("bias")
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


def _layer_norm_module(module: nn.LayerNorm, p: ParamReader, x: jax.Array) -> jax.Array:
    return _layer_norm(x, module.normalized_shape, p("weight"), p("bias"), module.eps)


def _rms_norm_module(module: nn.RMSNorm, p: ParamReader, x: jax.Array) -> jax.Array:
    axes = tuple(range(x.ndim - len(module.normalized_shape), x.ndim))
    eps = module.eps if module.eps is not None else float(np.finfo(np.float32).eps)
    out = x * lax.rsqrt((x * x).mean(axis=axes, keepdims=True) + eps)
    weight = p("weight")
    return out if weight is None else out * weight


def _group_norm_module(module: nn.GroupNorm, p: ParamReader, x: jax.Array) -> jax.Array:
    grouped = x.reshape(x.shape[0], module.num_groups, -1)
    mean = grouped.mean(axis=-1, keepdims=True)
    var = ((grouped - mean) ** 2).mean(axis=-1, keepdims=True)
    out = ((grouped - mean) / jnp.sqrt(var + module.eps)).reshape(x.shape)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    weight, bias = p("weight"), p("bias")
    if weight is not None and bias is not None:
        out = out * weight.reshape(shape) + bias.reshape(shape)
    return out


def _multihead_attention(
    module: nn.MultiheadAttention,
    p: ParamReader,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    prefix: str = "",
) -> jax.Array:
    """Eval-mode ``nn.MultiheadAttention`` with packed in-projections, no masks, no
    bias_k/v: returns the attended output only (``batch_first`` layout ``[B, T, E]``)."""
    if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
        raise UnsupportedNode("MultiheadAttention with separate kdim/vdim, bias_k or zero attn")
    heads, embed = module.num_heads, module.embed_dim
    w, b = p(prefix + "in_proj_weight"), p(prefix + "in_proj_bias")
    w_out, b_out = p(prefix + "out_proj.weight"), p(prefix + "out_proj.bias")
    assert w is not None and w_out is not None
    wq, wk, wv = jnp.split(w, 3, axis=0)
    bq, bk, bv = jnp.split(b, 3) if b is not None else (None, None, None)

    def project(x: jax.Array, weight: jax.Array, bias: jax.Array | None) -> jax.Array:
        out = x @ weight.T
        out = out if bias is None else out + bias
        batch, tokens = out.shape[:2]
        return out.reshape(batch, tokens, heads, embed // heads).transpose(0, 2, 1, 3)

    attended = _attention(project(query, wq, bq), project(key, wk, bk), project(value, wv, bv))
    batch, _, tokens, _ = attended.shape
    merged = attended.transpose(0, 2, 1, 3).reshape(batch, tokens, embed)
    out = merged @ w_out.T
    return out if b_out is None else out + b_out


def _mha_module(
    module: nn.MultiheadAttention,
    p: ParamReader,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    **kwargs: Any,
) -> tuple[jax.Array, None]:
    if kwargs.get("attn_mask") is not None or kwargs.get("key_padding_mask") is not None:
        raise UnsupportedNode("MultiheadAttention with masks")
    if not module.batch_first:
        query, key, value = (jnp.swapaxes(t, 0, 1) for t in (query, key, value))
    out = _multihead_attention(module, p, query, key, value)
    return (out if module.batch_first else jnp.swapaxes(out, 0, 1)), None


def _encoder_layer(
    module: nn.TransformerEncoderLayer, p: ParamReader, x: jax.Array, **kwargs: Any
) -> jax.Array:
    """Eval-mode ``nn.TransformerEncoderLayer`` (no masks): self-attention and the
    feed-forward block, each with its residual and LayerNorm, before (``norm_first``) or
    after."""
    if kwargs.get("src_mask") is not None or kwargs.get("src_key_padding_mask") is not None:
        raise UnsupportedNode("TransformerEncoderLayer with masks")
    activation = module.activation
    if activation is F.relu or isinstance(activation, nn.ReLU):
        act: Callable[[jax.Array], jax.Array] = jax.nn.relu
    elif activation is F.gelu or isinstance(activation, nn.GELU):
        act = _gelu
    else:
        raise UnsupportedNode(f"TransformerEncoderLayer activation {activation!r}")
    batch_first = module.self_attn.batch_first
    if not batch_first:
        x = jnp.swapaxes(x, 0, 1)

    def norm(name: str, h: jax.Array) -> jax.Array:
        layer = getattr(module, name)
        return _layer_norm(
            h, layer.normalized_shape, p(f"{name}.weight"), p(f"{name}.bias"), layer.eps
        )

    def attention(h: jax.Array) -> jax.Array:
        return _multihead_attention(module.self_attn, p, h, h, h, prefix="self_attn.")

    def feed_forward(h: jax.Array) -> jax.Array:
        w1, b1, w2, b2 = (p(f"linear{i}.{k}") for i in (1, 2) for k in ("weight", "bias"))
        assert w1 is not None and w2 is not None
        inner = act(h @ w1.T + (0 if b1 is None else b1))
        return inner @ w2.T + (0 if b2 is None else b2)

    if module.norm_first:
        x = x + attention(norm("norm1", x))
        x = x + feed_forward(norm("norm2", x))
    else:
        x = norm("norm1", x + attention(x))
        x = norm("norm2", x + feed_forward(x))
    return x if batch_first else jnp.swapaxes(x, 0, 1)


def _elementwise(fn: Callable[..., jax.Array]) -> ModuleRule:
    return lambda _module, _p, x: fn(x)


MODULE_RULES: dict[type[nn.Module], ModuleRule] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv_module,
    nn.Conv2d: _conv_module,
    nn.ConvTranspose2d: _conv_transpose_module,
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.LayerNorm: _layer_norm_module,
    nn.RMSNorm: _rms_norm_module,
    nn.GroupNorm: _group_norm_module,
    nn.MultiheadAttention: _mha_module,
    nn.TransformerEncoderLayer: _encoder_layer,
    nn.Tanh: _elementwise(jnp.tanh),
    nn.Sigmoid: _elementwise(jax.nn.sigmoid),
    nn.ReLU: _elementwise(jax.nn.relu),
    nn.SiLU: _elementwise(jax.nn.silu),
    nn.Mish: _elementwise(lambda x: x * jnp.tanh(_softplus(x))),
    nn.Identity: _elementwise(lambda x: x),
    nn.Dropout: _elementwise(lambda x: x),  # eval mode
    nn.GELU: lambda m, _p, x: _gelu(x, m.approximate),
    nn.Softplus: lambda m, _p, x: _softplus(x, m.beta, m.threshold),
    nn.ELU: lambda m, _p, x: jax.nn.elu(x, m.alpha),
    nn.LeakyReLU: lambda m, _p, x: jax.nn.leaky_relu(x, m.negative_slope),
    nn.Softmax: lambda m, _p, x: jax.nn.softmax(x, axis=m.dim),
    nn.LogSoftmax: lambda m, _p, x: jax.nn.log_softmax(x, axis=m.dim),
    nn.Flatten: lambda m, _p, x: _flatten(x, m.start_dim, m.end_dim),
    nn.Unflatten: lambda m, _p, x: x.reshape(
        (*x.shape[: m.dim], *m.unflattened_size, *x.shape[m.dim + 1 :])
    ),
    nn.MaxPool1d: lambda m, _p, x: _max_pool(
        x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices
    ),
    nn.MaxPool2d: lambda m, _p, x: _max_pool(
        x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices
    ),
    nn.AvgPool1d: lambda m, _p, x: _avg_pool(
        x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad
    ),
    nn.AvgPool2d: lambda m, _p, x: _avg_pool(
        x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override
    ),
    nn.AdaptiveAvgPool1d: lambda m, _p, x: _adaptive_avg_pool(x, m.output_size),
    nn.AdaptiveAvgPool2d: lambda m, _p, x: _adaptive_avg_pool(x, m.output_size),
}


def _dim_kw(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """A reduction called torch's way (``dim``, ``keepdim``) on a JAX function."""

    def call(x: jax.Array, dim: Any = None, keepdim: bool = False, **_: Any) -> jax.Array:
        return fn(x, axis=_reduce_dims(dim), keepdims=keepdim)

    return call


def _softmax_fn(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    def call(x: jax.Array, dim: int | None = None, *_: Any, **__: Any) -> jax.Array:
        return fn(x, axis=-1 if dim is None else dim)

    return call


def _cat(tensors: list[jax.Array], dim: int = 0) -> jax.Array:
    return jnp.concatenate(tensors, axis=dim)


FUNCTION_RULES: dict[Any, Callable[..., Any]] = {
    operator.add: operator.add,
    operator.sub: operator.sub,
    operator.mul: operator.mul,
    operator.truediv: operator.truediv,
    operator.floordiv: operator.floordiv,
    operator.neg: operator.neg,
    operator.pow: operator.pow,
    operator.getitem: operator.getitem,
    getattr: getattr,  # x.shape
    torch.add: lambda a, b, alpha=1: a + alpha * b,
    torch.sub: lambda a, b, alpha=1: a - alpha * b,
    torch.mul: operator.mul,
    torch.div: operator.truediv,
    torch.matmul: operator.matmul,
    torch.tanh: jnp.tanh,
    torch.sin: jnp.sin,
    torch.cos: jnp.cos,
    torch.exp: jnp.exp,
    torch.log: jnp.log,
    torch.sigmoid: jax.nn.sigmoid,
    torch.relu: jax.nn.relu,
    torch.flatten: _flatten,
    torch.cat: _cat,
    torch.sum: _dim_kw(jnp.sum),
    torch.mean: _dim_kw(jnp.mean),
    torch.softmax: _softmax_fn(jax.nn.softmax),
    torch.log_softmax: _softmax_fn(jax.nn.log_softmax),
    F.linear: lambda x, w, b=None: x @ w.T + (0 if b is None else b),
    F.relu: lambda x, inplace=False: jax.nn.relu(x),
    F.gelu: _gelu,
    F.silu: lambda x, inplace=False: jax.nn.silu(x),
    F.softplus: _softplus,
    F.elu: lambda x, alpha=1.0, inplace=False: jax.nn.elu(x, alpha),
    F.mish: lambda x, inplace=False: x * jnp.tanh(_softplus(x)),
    F.softmax: _softmax_fn(jax.nn.softmax),
    F.log_softmax: _softmax_fn(jax.nn.log_softmax),
    F.max_pool1d: _max_pool,
    F.max_pool2d: _max_pool,
    F.avg_pool1d: _avg_pool,
    F.avg_pool2d: _avg_pool,
    F.scaled_dot_product_attention: _sdpa,
}

METHOD_RULES: dict[str, Callable[..., Any]] = {
    "size": lambda x, dim=None: x.shape if dim is None else x.shape[dim],
    "view": lambda x, *shape: x.reshape(_shape_args(shape)),
    "reshape": lambda x, *shape: x.reshape(_shape_args(shape)),
    "flatten": _flatten,
    "permute": lambda x, *dims: x.transpose(_shape_args(dims)),
    "transpose": lambda x, a, b: jnp.swapaxes(x, a, b),
    "unsqueeze": lambda x, dim: jnp.expand_dims(x, dim),
    "squeeze": lambda x, dim=None: jnp.squeeze(x, axis=dim),
    "contiguous": lambda x: x,
    "chunk": _split,
    "mean": _dim_kw(jnp.mean),
    "sum": _dim_kw(jnp.sum),
    "tanh": jnp.tanh,
    "sin": jnp.sin,
    "exp": jnp.exp,
    "sigmoid": jax.nn.sigmoid,
    "relu": jax.nn.relu,
    "pow": operator.pow,
    "softmax": _softmax_fn(jax.nn.softmax),
    "log_softmax": _softmax_fn(jax.nn.log_softmax),
}


# --- tracing and replay -------------------------------------------------------------------


class _Tracer(fx.Tracer):
    """Keeps exactly the module types that have a rule whole; traces through the rest
    (``nn.Sequential``, custom modules such as a residual block or a ``Swish``)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in MODULE_RULES


@dataclass(frozen=True)
class JaxPort:
    """A torch module as ``forward(params, x)`` in JAX, with its weights as ``params``."""

    forward: Callable[[Params, jax.Array], jax.Array]
    params: Params


def port(module: nn.Module) -> JaxPort:
    """Trace ``module`` (eval mode) with torch.fx and replay its graph with JAX rules.

    Raises ``UnsupportedNode`` for a node no rule covers (when the graph is built, not at
    the first call: every node is resolved here).
    """
    graph = fx.GraphModule(module, _Tracer().trace(module))
    modules = dict(graph.named_modules())
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    params: Params = {name: jnp.asarray(t.detach().cpu().numpy()) for name, t in tensors.items()}
    steps: list[tuple[fx.Node, Callable[..., Any]]] = []
    for node in graph.graph.nodes:
        if node.op == "call_module":
            submodule = modules[node.target]
            rule = MODULE_RULES.get(type(submodule))
            if rule is None:
                raise UnsupportedNode(f"module {type(submodule).__name__} ({node.target})")
            steps.append((node, _module_step(rule, submodule, str(node.target))))
        elif node.op == "call_function":
            function = FUNCTION_RULES.get(node.target)
            if function is None:
                raise UnsupportedNode(f"function {node.target}")
            steps.append((node, function))
        elif node.op == "call_method":
            method = METHOD_RULES.get(str(node.target))
            if method is None:
                raise UnsupportedNode(f"method .{node.target}()")
            steps.append((node, method))
        elif node.op == "get_attr" and str(node.target) not in params:
            raise UnsupportedNode(f"attribute {node.target} (not a parameter or buffer)")

    def forward(weights: Params, x: jax.Array) -> jax.Array:
        env: dict[fx.Node, Any] = {}

        def value(arg: Any) -> Any:
            return fx.node.map_arg(arg, lambda n: env[n])

        rules = dict(steps)
        for node in graph.graph.nodes:
            if node.op == "placeholder":
                env[node] = x
            elif node.op == "get_attr":
                env[node] = weights[str(node.target)]
            elif node.op == "output":
                result: jax.Array = value(node.args[0])
                return result
            elif node.op == "call_module":
                env[node] = rules[node](weights, *value(node.args), **value(node.kwargs))
            else:
                env[node] = rules[node](*value(node.args), **value(node.kwargs))
        raise UnsupportedNode("graph without output")

    return JaxPort(forward=forward, params=params)


def _module_step(rule: ModuleRule, module: nn.Module, target: str) -> Callable[..., Any]:
    """A module rule bound to its module, reading its parameters as ``<target>.<name>``."""

    def step(weights: Params, *args: Any, **kwargs: Any) -> Any:
        def read(name: str) -> jax.Array | None:
            return weights.get(f"{target}.{name}")

        return rule(module, read, *args, **kwargs)

    return step


def forward_error(jax_port: JaxPort, module: nn.Module, x: torch.Tensor) -> float:
    """Max abs difference of the JAX and torch forwards on ``x``, over the output's scale
    (``max(1, max|out|)``): the benchmark times a JAX peer only below 1e-5."""
    with torch.no_grad():
        expected = module(x).double()
    forward = jax.jit(jax_port.forward)  # one compile, not one per operation
    got = torch.from_numpy(np.array(forward(jax_port.params, jnp.asarray(x.numpy()))))
    scale = max(1.0, float(expected.abs().max()))
    return float((got.double() - expected).abs().max()) / scale
