"""The generic and row-loop paths on models that used to fail there, against references.

Each model runs forward; before ``engine.differentiable.derivative_mode`` the generic
path failed on the recurrent ones (``vmap`` over an in-place gate update), both paths
failed on attention (no derivative of the flash-attention backward), and SiLU / Mish
Hessians took reverse-over-reverse (no forward-mode rule under ``torch.no_grad()``).

References, float64: ``torch.autograd.functional.hessian`` / ``.jacobian`` (plain double
backward, no torch.func; under the math attention kernel, since torch's default kernel
cannot be differentiated twice), to 1e-10 relative to the largest entry; and central
finite differences of ``torch.autograd`` gradients (step 1e-5, default kernels; six
columns of each Hessian), to 1e-6 relative. Float32 results are held to 1e-4 relative
of the float64 reference.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from hessian_service import engine
from hessian_service.engine import Algorithm, generic, rowloop
from hessian_service.engine.planner import plan_hessian
from tests.cases import reference_hessian, scalar_of
from tests.fresh_script import FreshSiLU

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script/trace

EXACT = 1e-10
FINITE_DIFFERENCES = 1e-6
FLOAT32 = 1e-4


class RecurrentHead(nn.Module):
    """A recurrent layer over a [5, 4] sequence, a linear read-out of its last state."""

    def __init__(self, layer: type[nn.RNNBase]) -> None:
        super().__init__()
        self.recurrent = layer(4, 6, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.recurrent(x)
        return torch.as_tensor(self.head(out[:, -1]))


class CellLoop(nn.Module):
    """A recurrent cell stepped over a [3, 4] sequence from its default zero state."""

    def __init__(self, cell: type[nn.RNNCellBase], bias: bool = True) -> None:
        super().__init__()
        self.cell = cell(4, 6, bias=bias)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = None
        for step in range(x.shape[1]):
            state = self.cell(x[:, step], state)
        hidden = state[0] if isinstance(state, tuple) else state
        return torch.as_tensor(self.head(hidden))


class StackedHead(nn.Module):
    """Two bidirectional layers of a recurrent layer, the last step read out."""

    def __init__(self, layer: type[nn.RNNBase]) -> None:
        super().__init__()
        self.recurrent = layer(4, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.recurrent(x)
        return torch.as_tensor(self.head(out[:, -1]))


class EncoderHead(nn.Module):
    """``nn.TransformerEncoderLayer`` on [seq 6, d 16] (eval mode: its fast path applies
    to a plain forward), mean-pooled, then linear."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(
            16, 2, dim_feedforward=16, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.head(self.encoder(x).mean(1)))


class AttentionHead(nn.Module):
    """``nn.MultiheadAttention`` self-attention on [seq 4, d 8]; ``need_weights=False``
    goes through ``F.scaled_dot_product_attention``, True through its own matmuls."""

    def __init__(self, need_weights: bool) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)
        self.need_weights = need_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attention(x, x, x, need_weights=self.need_weights)
        return torch.as_tensor(self.head(attended.mean(1)))


def _mlp(activation: nn.Module) -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 12), activation, nn.Linear(12, 12), activation, nn.Linear(12, 2)
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "gru": (lambda: RecurrentHead(nn.GRU), (5, 4)),
    "lstm": (lambda: RecurrentHead(nn.LSTM), (5, 4)),
    "rnn_tanh": (lambda: RecurrentHead(nn.RNN), (5, 4)),
    "lstm_2_layers_bidirectional": (lambda: StackedHead(nn.LSTM), (3, 4)),
    "gru_cell": (lambda: CellLoop(nn.GRUCell), (3, 4)),
    "lstm_cell_without_bias": (lambda: CellLoop(nn.LSTMCell, bias=False), (3, 4)),
    "rnn_cell": (lambda: CellLoop(nn.RNNCell), (3, 4)),
    "transformer_encoder_layer": (EncoderHead, (6, 16)),
    "multihead_attention": (lambda: AttentionHead(need_weights=False), (4, 8)),
    "multihead_attention_weights": (lambda: AttentionHead(need_weights=True), (4, 8)),
    "silu_mlp": (lambda: _mlp(nn.SiLU()), (5,)),
    "mish_mlp": (lambda: _mlp(nn.Mish()), (5,)),
}
NAMES = list(MODELS)
ATTENTION = {"transformer_encoder_layer", "multihead_attention", "multihead_attention_weights"}


def _build(
    name: str, dtype: torch.dtype = torch.float64, batch: int = 2
) -> tuple[nn.Module, torch.Tensor]:
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().to(dtype).eval().requires_grad_(False)
    return model, torch.randn(batch, *shape, dtype=dtype)


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = float(expected.abs().max())
    assert scale > 0
    return float((actual - expected).abs().max()) / scale


def _reference_hessians(model: nn.Module, x: torch.Tensor, index: int) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.MATH):
        return torch.stack([reference_hessian(scalar_of(model, index), s) for s in x])


@pytest.mark.parametrize("method", ["generic", "autograd"])
@pytest.mark.parametrize("name", NAMES)
def test_hessian_equals_double_backward(name: str, method: str) -> None:
    # Batches of 2 and two outputs where that is cheap; the row loop and attention
    # (n = 96) take one sample and one output, to keep the file within seconds.
    small = method == "generic" and name not in ATTENTION
    model, x = _build(name, batch=2 if small else 1)
    indices = [0, 1] if small else [1]
    result = engine.compute_hessian(model, x, output_index=indices, method=method)
    for position, k in enumerate(indices):
        reference = _reference_hessians(model, x, k)
        assert _relative(result.matrix[:, position], reference) <= EXACT
    expected = Algorithm.ROW_LOOP if method == "autograd" else Algorithm.FORWARD_OVER_REVERSE
    assert result.method is expected  # SiLU and Mish included: grad mode on inside


def _finite_difference_columns(
    function: Callable[[torch.Tensor], torch.Tensor], sample: torch.Tensor, columns: list[int]
) -> torch.Tensor:
    """Columns of the Hessian by central differences (step 1e-5) of the autograd
    gradient: ``[n, len(columns)]``, two gradient evaluations per column."""
    step = 1e-5

    def gradient(flat: torch.Tensor) -> torch.Tensor:
        flat = flat.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(function(flat.reshape(sample.shape)), flat)
        return grad

    flat = sample.reshape(-1)
    differences = []
    for j in columns:
        offset = torch.zeros_like(flat)
        offset[j] = step
        differences.append((gradient(flat + offset) - gradient(flat - offset)) / (2 * step))
    return torch.stack(differences, dim=1)


@pytest.mark.parametrize("name", NAMES)
def test_hessian_equals_finite_differences(name: str) -> None:
    model, x = _build(name, batch=1)
    result = engine.hessian(model, x, output_index=1, method="generic")[0]
    n = x[0].numel()
    columns = sorted({0, 1, n // 3, n // 2, n - 2, n - 1})  # every column costs 2 gradients
    reference = _finite_difference_columns(scalar_of(model, 1), x[0], columns)
    assert _relative(result[:, columns], reference) <= FINITE_DIFFERENCES


@pytest.mark.parametrize("method", ["generic", "autograd"])
@pytest.mark.parametrize("name", NAMES)
def test_jacobian_equals_autograd(name: str, method: str) -> None:
    model, x = _build(name, batch=1 if name in ATTENTION else 2)
    result = engine.compute_jacobian(model, x, method=method)
    n = x[0].numel()
    reference = torch.stack(
        [
            torch.autograd.functional.jacobian(lambda s: model(s.unsqueeze(0)).reshape(-1), s)
            for s in x
        ]
    ).reshape(x.shape[0], -1, n)
    assert _relative(result.matrix, reference) <= EXACT


@pytest.mark.parametrize("name", ["gru", "lstm", "multihead_attention"])
def test_float32_matches_the_float64_reference(name: str) -> None:
    # oneDNN runs a float32 LSTM on the CPU; its backward wants a workspace no transform keeps
    model, x = _build(name, batch=1)
    reference = _reference_hessians(model, x, 0)
    result = engine.hessian(model.float(), x.float(), output_index=0, method="generic")
    assert result.dtype == torch.float32
    assert _relative(result.double(), reference) <= FLOAT32


def test_forward_mode_jacobian_stays_off_the_encoder_fast_path() -> None:
    """More outputs than inputs picks forward mode; an eval-mode encoder layer under
    ``torch.no_grad()`` would take ``torch._transformer_encoder_layer_fwd``, which has no
    forward-mode rule."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.0, batch_first=True)
    model = nn.Sequential(encoder, nn.Linear(4, 30)).double().eval().requires_grad_(False)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    result = engine.compute_jacobian(model, x, method="generic")
    assert result.method is Algorithm.FORWARD
    reference = torch.stack(
        [
            torch.autograd.functional.jacobian(lambda s: model(s.unsqueeze(0)).reshape(-1), s)
            for s in x
        ]
    ).reshape(2, 90, 12)
    assert _relative(result.matrix, reference) <= EXACT


def _silu_script() -> tuple[torch.jit.ScriptModule, nn.Module, torch.Tensor]:
    model, x = _build("silu_mlp")
    return torch.jit.script(model), model, x


def test_torchscript_warmed_as_the_registry_does_gives_exact_hessians() -> None:
    """The registry's first forward passes run under ``torch.no_grad()``; the generic
    path then runs the graph unoptimized, whose ops every transform handles."""
    scripted, model, x = _silu_script()
    with torch.no_grad():
        scripted(x)
        scripted(x)
    reference = _reference_hessians(model, x, 0)
    for method in ("generic", "autograd", "generic"):  # repeated calls stay exact
        result = engine.hessian(scripted, x, output_index=0, method=method)
        assert _relative(result, reference) <= EXACT, method


def _fresh_script(tag: str) -> tuple[torch.jit.ScriptModule, nn.Module, torch.Tensor]:
    """A ScriptModule of a class no other test scripts, never run before."""
    torch.manual_seed(0)
    model = type(f"FreshSiLU{tag}", (FreshSiLU,), {})().double().eval().requires_grad_(False)
    return torch.jit.script(model), model, torch.randn(2, 5, dtype=torch.float64)


def test_generic_hessians_of_a_never_run_torchscript_module_are_exact() -> None:
    """Its first runs are under ``torch.func`` with grad: without unoptimized execution
    the JIT would profile them and cache differentiable subgraphs (wrong under vmap)."""
    scripted, model, x = _fresh_script("Generic")
    n = x[0].numel()
    plan = plan_hessian(n=n, batch=2, activation_numel=64, itemsize=8)
    targets = torch.zeros(2, dtype=torch.float64)

    def scalars(sample: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(scripted(sample.unsqueeze(0)).reshape(-1)[:1])

    reference = _reference_hessians(model, x, 0)
    for _ in range(3):  # the JIT profiles the first run and optimizes on the second
        assert _relative(generic.hessian(scalars, x, targets, plan)[:, 0], reference) <= EXACT
        assert _relative(rowloop.hessian(scalars, x, targets)[:, 0], reference) <= EXACT


def _torchscript_case(name: str) -> tuple[torch.jit.ScriptModule, nn.Module, torch.Tensor]:
    """A scripted recurrent model (its graph calls aten::gru / aten::lstm from C++, past
    the TorchFunctionMode), or an encoder layer traced under ``torch.no_grad()`` (its
    graph holds the fused ``aten::_transformer_encoder_layer_fwd``)."""
    if name != "encoder_traced":
        model, x = _build(name, batch=2)
        return torch.jit.script(model), model, x
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=8, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(24, 1)).double().eval()
    model.requires_grad_(False)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    with torch.no_grad():
        traced = torch.jit.trace(model, x[:1])
    assert "aten::_transformer_encoder_layer_fwd" in str(traced.inlined_graph)
    return traced, model, x


@pytest.mark.parametrize("name", ["gru", "lstm", "encoder_traced"])
def test_torchscript_graphs_the_function_mode_cannot_reach_are_retried_decomposed(
    name: str,
) -> None:
    scripted, model, x = _torchscript_case(name)
    n = x[0].numel()
    plan = plan_hessian(n=n, batch=2, activation_numel=256, itemsize=8)
    targets = torch.zeros(2, dtype=torch.float64)

    def scalars(sample: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(scripted(sample.unsqueeze(0)).reshape(-1)[:1])

    reference = _reference_hessians(model, x, 0)
    assert _relative(generic.hessian(scalars, x, targets, plan)[:, 0], reference) <= EXACT
    assert _relative(rowloop.hessian(scalars, x, targets)[:, 0], reference) <= EXACT


def test_a_fresh_torchscript_module_gives_exact_hessians() -> None:
    """engine.api profiles a ScriptModule with grad before the first Hessian; an
    optimized JIT plan cached there made later Hessians 4e-2 off under torch.func."""
    scripted, model, x = _fresh_script("Api")
    result = engine.hessian(scripted, x, output_index=0, method="generic")
    assert _relative(result, _reference_hessians(model, x, 0)) <= EXACT


def test_derivative_mode_leaves_torch_as_it_found_it() -> None:
    model, x = _build("transformer_encoder_layer")
    backends = (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
    )
    with torch.no_grad():
        engine.hessian(model, x, output_index=0, method="generic")
        assert not torch.is_grad_enabled()
    assert backends == (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
    )
    assert torch._C._get_graph_executor_optimize()
    assert not torch._C._is_torch_function_mode_enabled()
