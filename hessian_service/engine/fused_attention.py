"""Differentiable forms of torch's fused attention inference kernels.

In eval mode with no gradient wanted, ``nn.MultiheadAttention`` and
``nn.TransformerEncoderLayer`` call one fused op each
(``aten::_native_multi_head_attention``, ``aten::_transformer_encoder_layer_fwd``),
which have no derivatives. A Python module avoids them under
``differentiable.derivative_mode``, but a model traced to TorchScript under
``torch.no_grad()`` has them in its graph. This module writes both ops out in plain
differentiable ATen ops, the same math as their CPU kernels (projections, scaled
``Q K^T``, a masked softmax whose fully masked rows are zero, the output projection;
the encoder's residuals, layer norms and ReLU/GELU feed-forward), and registers them as
the ops' Autograd kernels for the Python dispatcher only: they run where
``torch._dispatch.python.enable_python_dispatcher`` is on (``derivative_mode``'s retry
in ``generic`` and ``rowloop``; tracers such as ``make_fx`` also enable it, and then
record the plain ops), never in ordinary calls, which keep the fused kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch._C import DispatchKey

_MASK_SRC = 0  # [L, S]: one mask for every sample and head
_MASK_KEY_PADDING = 1  # [B, S]: per sample, over the keys


def _masked_softmax(
    scores: torch.Tensor, mask: torch.Tensor | None, mask_type: int | None
) -> torch.Tensor:
    """Softmax over the keys of ``scores [B, H, L, S]``; where ``mask`` is nonzero (a
    float mask is read as ``mask != 0``, as the fused kernel does) the weight is zero,
    and a row with every key masked is all zeros (the fused kernel's rule, not NaN)."""
    if mask is None:
        return scores.softmax(-1)
    masked = mask if mask.dtype == torch.bool else mask != 0
    if mask_type == _MASK_KEY_PADDING:
        masked = masked.reshape(masked.shape[0], 1, 1, masked.shape[-1])
    elif mask_type == _MASK_SRC or masked.dim() == 2:
        masked = masked.reshape(1, 1, *masked.shape[-2:])
    masked = masked.expand_as(scores)
    weights = scores.masked_fill(masked, torch.finfo(scores.dtype).min).softmax(-1)
    return weights * (~masked.all(-1, keepdim=True))


def multi_head_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    embed_dim: int,
    num_head: int,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    mask: torch.Tensor | None = None,
    need_weights: bool = True,
    average_attn_weights: bool = True,
    mask_type: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``aten::_native_multi_head_attention`` on batch-first ``[B, L, E]`` inputs:
    the attended output ``[B, L, E]`` and the weights (``[B, L, S]`` averaged over
    heads, ``[B, H, L, S]`` per head, or None, the kernel's undefined tensor, without
    ``need_weights``)."""
    head_dim = embed_dim // num_head
    w_q, w_k, w_v = qkv_weight.chunk(3)
    b_q, b_k, b_v = qkv_bias.chunk(3)

    def heads(x: torch.Tensor) -> torch.Tensor:  # [B, T, E] -> [B, H, T, E / H]
        return x.reshape(x.shape[0], x.shape[1], num_head, head_dim).transpose(1, 2)

    q = heads(F.linear(query, w_q, b_q)) / math.sqrt(head_dim)
    k = heads(F.linear(key, w_k, b_k))
    v = heads(F.linear(value, w_v, b_v))
    weights = _masked_softmax(q @ k.transpose(-2, -1), mask, mask_type)
    attended = (weights @ v).transpose(1, 2).reshape(query.shape[0], query.shape[1], embed_dim)
    output = F.linear(attended, proj_weight, proj_bias)
    if not need_weights:
        return output, None
    return output, weights.mean(1) if average_attn_weights else weights


def transformer_encoder_layer(
    src: torch.Tensor,
    embed_dim: int,
    num_heads: int,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    use_gelu: bool,
    norm_first: bool,
    eps: float,
    norm_weight_1: torch.Tensor,
    norm_bias_1: torch.Tensor,
    norm_weight_2: torch.Tensor,
    norm_bias_2: torch.Tensor,
    ffn_weight_1: torch.Tensor,
    ffn_bias_1: torch.Tensor,
    ffn_weight_2: torch.Tensor,
    ffn_bias_2: torch.Tensor,
    mask: torch.Tensor | None = None,
    mask_type: int | None = None,
) -> torch.Tensor:
    """``aten::_transformer_encoder_layer_fwd``: self-attention and a feed-forward
    block, each with its residual, layer norms before (``norm_first``) or after."""

    def norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (embed_dim,), weight, bias, eps)

    x = norm(src, norm_weight_1, norm_bias_1) if norm_first else src
    attended, _ = multi_head_attention(
        x, x, x, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias,
        mask, need_weights=False, mask_type=mask_type,
    )  # fmt: skip
    x = attended + src
    if not norm_first:
        x = norm(x, norm_weight_1, norm_bias_1)
    residual = x
    if norm_first:
        x = norm(x, norm_weight_2, norm_bias_2)
    hidden = F.linear(x, ffn_weight_1, ffn_bias_1)
    hidden = F.gelu(hidden) if use_gelu else F.relu(hidden)
    x = F.linear(hidden, ffn_weight_2, ffn_bias_2) + residual
    return norm(x, norm_weight_2, norm_bias_2) if not norm_first else x


FORMS: dict[torch._ops.OpOverload, Callable[..., Any]] = {
    torch.ops.aten._native_multi_head_attention.default: multi_head_attention,
    torch.ops.aten._transformer_encoder_layer_fwd.default: transformer_encoder_layer,
}


def _register() -> None:
    """Each form as its op's Autograd kernel under the Python dispatcher (once)."""
    for op, form in FORMS.items():
        if DispatchKey.Autograd not in op.py_kernels:
            op.py_impl(DispatchKey.Autograd)(form)


_register()
