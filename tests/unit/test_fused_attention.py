"""engine.fused_attention: the plain-op forms of torch's fused attention kernels.

Each form is compared with the fused kernel itself on the eval-mode inference path
(``torch.no_grad()``, where ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``
call ``aten::_native_multi_head_attention`` / ``aten::_transformer_encoder_layer_fwd``,
checked with the profiler), with and without key-padding and causal masks, to 1e-12 in
float64. Fully masked rows are where the two could differ (zeros, not NaN): sample 0 of
the padding mask masks two of five keys, and the causal mask's first row sees one key.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch._dispatch.python import enable_python_dispatcher

from hessian_service.engine import fused_attention

B, L, E, H = 3, 5, 8, 2
TOLERANCE = 1e-12


def _inputs() -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    torch.manual_seed(0)
    x = torch.randn(B, L, E, dtype=torch.float64)
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[0, -2:] = True
    padding[1, -1] = True
    causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    return x, {"none": None, "padding": padding, "causal": causal}


def _fused_and_plain(run: Callable[[], object], fused_op: str) -> tuple[list[torch.Tensor], ...]:
    with torch.no_grad(), torch.autograd.profiler.profile() as profile:
        fused = run()
    assert fused_op in {event.name for event in profile.function_events}
    with torch.no_grad(), enable_python_dispatcher():
        plain = run()

    def tensors(out: object) -> list[torch.Tensor]:
        return [t for t in (out if isinstance(out, tuple) else (out,)) if t is not None]

    return tensors(fused), tensors(plain)


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("mask", ["none", "padding", "causal", "both"])
def test_multi_head_attention_equals_the_fused_kernel(
    mask: str, need_weights: bool, average: bool
) -> None:
    x, masks = _inputs()
    attention = nn.MultiheadAttention(E, H, batch_first=True).double().eval()
    padding = masks["padding"] if mask in ("padding", "both") else None
    causal = masks["causal"] if mask in ("causal", "both") else None
    fused, plain = _fused_and_plain(
        lambda: attention(
            x, x, x, key_padding_mask=padding, attn_mask=causal,
            need_weights=need_weights, average_attn_weights=average,
        ),
        "aten::_native_multi_head_attention",
    )  # fmt: skip
    assert len(fused) == len(plain) == (2 if need_weights else 1)
    for a, b in zip(fused, plain, strict=True):
        assert a.shape == b.shape and float((a - b).abs().max()) <= TOLERANCE


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("mask", ["none", "padding", "causal"])
def test_encoder_layer_equals_the_fused_kernel(
    mask: str, norm_first: bool, activation: str
) -> None:
    x, masks = _inputs()
    layer = nn.TransformerEncoderLayer(
        E, H, 16, dropout=0.0, activation=activation, batch_first=True, norm_first=norm_first
    )
    layer = layer.double().eval()
    padding = masks["padding"] if mask == "padding" else None
    causal = masks["causal"] if mask == "causal" else None
    fused, plain = _fused_and_plain(
        lambda: layer(x, src_mask=causal, src_key_padding_mask=padding),
        "aten::_transformer_encoder_layer_fwd",
    )
    (a,), (b,) = fused, plain
    if a.is_nested:  # a padding mask makes the fused path return a nested tensor
        a = a.to_padded_tensor(0.0)
    assert a.shape == b.shape and float((a - b).abs().max()) <= TOLERANCE


def test_the_forms_are_registered_for_the_python_dispatcher_only() -> None:
    for op, form in fused_attention.FORMS.items():
        assert op.py_kernels[torch._C.DispatchKey.Autograd] is form
