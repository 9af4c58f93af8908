"""Functional forms of torch's fused recurrent ops, for ``differentiable.derivative_mode``.

``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` call one fused op for the whole sequence
(``torch.gru`` ...) and the cells (``nn.GRUCell`` ...) one per step
(``torch.gru_cell`` ...). Their composite kernels update gates in place; under ``vmap``
over samples a gate computed from the zero initial state (unbatched: the module makes it
with ``torch.zeros``) is written with a batched value and the op fails ("output with
shape [1, 16] doesn't match the broadcast shape [3, 1, 16]"); on the CPU in float32 an
LSTM also goes to oneDNN, whose backward needs a workspace no transform keeps.

The forms here compute the same equations without in-place updates: for the sequence
ops torch's own decompositions (``torch._decomp``, which inductor uses), with the LSTM
always on the plain layer; for the cells the gate equations of ``torch.nn.GRUCell``,
``LSTMCell`` and ``RNNCell``'s documentation, written out. ``REPLACEMENTS`` maps each op
to its form and the positional arity ``nn.RNNBase`` and the cells call it with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch._decomp import decompositions as torch_decompositions

# torch's own (untyped) helpers of its recurrent decompositions.
_gather_params: Callable[..., Any] = torch_decompositions.gather_params
_rnn_helper: Callable[..., Any] = torch_decompositions._rnn_helper


def _lstm_input(
    input: torch.Tensor,
    hx: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    has_biases: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
    batch_first: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.lstm`` (the ``.input`` overload) as torch's decomposition computes it,
    always with the plain functional layer (never oneDNN's ``mkldnn_rnn_layer``)."""
    has_projections = hx[0].size(2) != hx[1].size(2)
    gathered = _gather_params(params, has_biases, has_projections)
    hidden = list(zip(hx[0], hx[1], strict=True))
    out, final = _rnn_helper(
        input,
        hidden,
        gathered,
        has_biases,
        num_layers,
        dropout,
        train,
        bidirectional,
        batch_first,
        torch_decompositions.one_layer_lstm,
    )
    states, cells = zip(*final, strict=True)
    return out, torch.stack(states, 0), torch.stack(cells, 0)


def _overload(
    on_input: Callable[..., Any],
    on_data: Callable[..., Any],
    data: Callable[[tuple[Any, ...]], bool],
) -> Callable[..., Any]:
    """One form for an op with an ``.input`` (padded) and a ``.data`` (packed sequence)
    overload, telling them apart by their positional arguments."""

    def form(*args: Any) -> Any:
        return on_data(*args) if data(args) else on_input(*args)

    return form


def _gru_like_is_data(args: tuple[Any, ...]) -> bool:
    # gru / rnn_*: .input(input, hx, params, ...) vs .data(data, batch_sizes, hx, params, ...)
    return isinstance(args[2], torch.Tensor)


def _lstm_is_data(args: tuple[Any, ...]) -> bool:
    # lstm: .input(input, hx: [h, c], params, ...) vs .data(data, batch_sizes, hx, ...)
    return isinstance(args[1], torch.Tensor)


def gru_cell(
    input: torch.Tensor,
    hx: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None = None,
    b_hh: torch.Tensor | None = None,
) -> torch.Tensor:
    """``r, z = sigmoid(...)``, ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``,
    ``h' = (1 - z) * n + z * h``."""
    i_r, i_z, i_n = F.linear(input, w_ih, b_ih).chunk(3, -1)
    h_r, h_z, h_n = F.linear(hx, w_hh, b_hh).chunk(3, -1)
    reset = torch.sigmoid(i_r + h_r)
    update = torch.sigmoid(i_z + h_z)
    new = torch.tanh(i_n + reset * h_n)
    return (1 - update) * new + update * hx


def lstm_cell(
    input: torch.Tensor,
    hx: Sequence[torch.Tensor],
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None = None,
    b_hh: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gates ``i, f, g, o`` of ``W_i x + b_i + W_h h + b_h``; ``c' = f c + i g``,
    ``h' = o tanh(c')``."""
    h, c = hx
    gates = F.linear(input, w_ih, b_ih) + F.linear(h, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, -1)
    cell = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(cell), cell


def _rnn_cell(nonlinearity: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    def cell(
        input: torch.Tensor,
        hx: torch.Tensor,
        w_ih: torch.Tensor,
        w_hh: torch.Tensor,
        b_ih: torch.Tensor | None = None,
        b_hh: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return nonlinearity(F.linear(input, w_ih, b_ih) + F.linear(hx, w_hh, b_hh))

    return cell


# op -> (its functional form, the positional arities it is replaced at)
REPLACEMENTS: dict[Callable[..., Any], tuple[Callable[..., Any], frozenset[int]]] = {
    torch.gru: (
        _overload(
            torch_decompositions.gru_impl, torch_decompositions.gru_impl_data, _gru_like_is_data
        ),
        frozenset({9}),
    ),
    torch.rnn_tanh: (
        _overload(
            torch_decompositions.rnn_tanh_input,
            torch_decompositions.rnn_tanh_data,
            _gru_like_is_data,
        ),
        frozenset({9}),
    ),
    torch.rnn_relu: (
        _overload(
            torch_decompositions.rnn_relu_input,
            torch_decompositions.rnn_relu_data,
            _gru_like_is_data,
        ),
        frozenset({9}),
    ),
    torch.lstm: (
        _overload(_lstm_input, torch_decompositions.lstm_data_impl, _lstm_is_data),
        frozenset({9}),
    ),
    torch.gru_cell: (gru_cell, frozenset({4, 5, 6})),
    torch.lstm_cell: (lstm_cell, frozenset({4, 5, 6})),
    torch.rnn_tanh_cell: (_rnn_cell(torch.tanh), frozenset({4, 5, 6})),
    torch.rnn_relu_cell: (_rnn_cell(torch.relu), frozenset({4, 5, 6})),
}
