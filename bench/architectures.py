"""A seeded table of architectures that are not in the zoo: the networks people have.

Issue 19 asks for the engine's fast path on real networks (residual, normalised,
convolutional, recurrent, attention, custom activations, ``torch.nn.functional``
forwards), shown correct against ``torch.func.hessian`` and measured against the peers.
This table is that set, shared by the correctness tests (tests/unit/test_graph_table.py),
the benchmark and the engine's own tests, so that all of them speak about the same
models with the same weights.

Each entry builds its module with its own seed (drawn from its name, inside a forked RNG so
that building one never moves the caller's random stream), in eval mode, float32, with
frozen weights. Sizes are small (n = 2 to 784 inputs, mostly 16 to 200) so that a float64
``torch.func.hessian`` of two samples takes a fraction of a second; the 28x28 inputs are
kept for the image families, with few channels.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Architecture:
    """One seeded architecture and the scalar whose input Hessian the tests take.

    ``output_index`` selects a raw output (of the flattened per-sample output); with
    ``objective`` set (``"cross_entropy"`` towards class ``target``) it is None. ``batch``
    is how many samples the tests use.
    """

    name: str
    family: str
    sample_shape: tuple[int, ...]
    build: Callable[[], nn.Module]
    output_index: int | None = 0
    objective: str | None = None
    target: int = 0
    batch: int = 2

    @property
    def n(self) -> int:
        """Inputs per sample: the side of each Hessian."""
        return math.prod(self.sample_shape)


# --- modules the table's forwards need --------------------------------------------------


class Swish(nn.Module):
    """``x * sigmoid(x)`` written out in its own forward: a custom activation module that
    no table of torch classes knows (the engine must read its graph, not its type)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class Sine(nn.Module):
    """``sin(w0 * x)``: the SIREN-style activation of physics-informed networks."""

    def __init__(self, w0: float = 1.0) -> None:
        super().__init__()
        self.w0 = w0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.w0 * x)


class ResidualMLP(nn.Module):
    """A stem, residual blocks ``h + block(h)`` (one of them ``h - block(h)``, for the
    subtraction node) and a linear head."""

    def __init__(self, n: int, width: int, outputs: int, depth: int = 2) -> None:
        super().__init__()
        self.stem = nn.Linear(n, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
            for _ in range(depth)
        )
        self.head = nn.Linear(width, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.stem(x))
        for position, block in enumerate(self.blocks):
            h = h - block(h) if position % 2 else h + block(h)
        out: torch.Tensor = self.head(h)
        return out


class ResidualCNN(nn.Module):
    """A ResNet-style basic block on images: ``x + conv(tanh(conv(x)))`` between a stem
    conv and an average-pooled linear head, on ``side x side`` one-channel images."""

    def __init__(self, side: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(4 * (side // 2) ** 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.stem(x))
        h = torch.tanh(h + self.conv2(torch.tanh(self.conv1(h))))
        out: torch.Tensor = self.head(torch.flatten(self.pool(h), 1))
        return out


class FunctionalMLP(nn.Module):
    """A forward written with ``torch.nn.functional`` on raw parameters: no layer modules
    at all, so only the traced graph says what it computes."""

    def __init__(self, n: int, width: int, outputs: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(width, n) / math.sqrt(n))
        self.b1 = nn.Parameter(torch.randn(width) * 0.1)
        self.w2 = nn.Parameter(torch.randn(width, width) / math.sqrt(width))
        self.b2 = nn.Parameter(torch.randn(width) * 0.1)
        self.w3 = nn.Parameter(torch.randn(outputs, width) / math.sqrt(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.softplus(F.linear(x, self.w1, self.b1))
        h = F.elu(F.linear(h, self.w2, self.b2)) + 0.5 * torch.tanh(h)
        return F.linear(h, self.w3)


class SequentialMLP(nn.Sequential):
    """A ``nn.Sequential`` subclass that builds its own layers: the common way to name a
    model; it computes what ``nn.Sequential`` does."""

    def __init__(self, n: int, widths: tuple[int, ...], outputs: int) -> None:
        layers: list[nn.Module] = []
        previous = n
        for width in widths:
            layers += [nn.Linear(previous, width), nn.Tanh()]
            previous = width
        layers.append(nn.Linear(previous, outputs))
        super().__init__(*layers)


class RecurrentHead(nn.Module):
    """A ``batch_first`` GRU or LSTM over a short sequence, then a linear head on its last
    hidden state."""

    def __init__(self, cell: type[nn.GRU] | type[nn.LSTM], features: int, hidden: int) -> None:
        super().__init__()
        self.rnn = cell(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sequence, _ = self.rnn(x)
        out: torch.Tensor = self.head(sequence[:, -1])
        return out


class AttentionBlock(nn.Module):
    """Self-attention with ``nn.MultiheadAttention`` (``batch_first``), a residual and a
    LayerNorm, then a linear head over the flattened tokens."""

    def __init__(self, tokens: int, embed: int, heads: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(embed, heads, batch_first=True)
        self.norm = nn.LayerNorm(embed)
        self.head = nn.Linear(tokens * embed, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attention(x, x, x, need_weights=False)
        h = self.norm(x + attended)
        out: torch.Tensor = self.head(h.flatten(1))
        return out


class SDPAttention(nn.Module):
    """One head of ``F.scaled_dot_product_attention`` on linear projections, as
    hand-written transformer code calls it; mean-pooled over the tokens."""

    def __init__(self, embed: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(embed, 3 * embed)
        self.head = nn.Linear(embed, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attended = F.scaled_dot_product_attention(q, k, v)
        out: torch.Tensor = self.head(attended.mean(dim=1))
        return out


class TransformerEncoder(nn.Module):
    """``nn.TransformerEncoderLayer`` (dropout 0, ``batch_first``), mean-pooled over the
    tokens into a linear head."""

    def __init__(self, embed: int, heads: int) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            embed, heads, dim_feedforward=2 * embed, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(embed, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.layer(x).mean(dim=1))
        return out


class GatingMLP(nn.Module):
    """A GLU-like gate: ``tanh(W1 x) * sigmoid(W2 x)``, then a SwiGLU-style
    ``silu(W3 h) * (W4 h)``: products of two activations (curvature cross terms)."""

    def __init__(self, n: int, width: int, outputs: int) -> None:
        super().__init__()
        self.value = nn.Linear(n, width)
        self.gate = nn.Linear(n, width)
        self.up = nn.Linear(width, width)
        self.up_gate = nn.Linear(width, width)
        self.head = nn.Linear(width, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.value(x)) * torch.sigmoid(self.gate(x))
        h = F.silu(self.up_gate(h)) * self.up(h)
        out: torch.Tensor = self.head(h)
        return out


class QuotientMLP(nn.Module):
    """A quotient of two activations, ``tanh(W1 x) / (1.5 + tanh(W2 x))``: the divisor
    stays within [0.5, 2.5], away from zero."""

    def __init__(self, n: int, width: int, outputs: int) -> None:
        super().__init__()
        self.numerator = nn.Linear(n, width)
        self.denominator = nn.Linear(n, width)
        self.head = nn.Linear(width, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ratio = torch.tanh(self.numerator(x)) / (1.5 + torch.tanh(self.denominator(x)))
        out: torch.Tensor = self.head(ratio)
        return out


class NormMLP(nn.Module):
    """Linear layers each followed by a norm (``nn.LayerNorm`` or ``nn.RMSNorm``) and an
    activation: the pre-transformer MLP block."""

    def __init__(
        self,
        n: int,
        width: int,
        outputs: int,
        norm: Callable[[int], nn.Module],
        activation: Callable[[], nn.Module],
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(n, width),
            norm(width),
            activation(),
            nn.Linear(width, width),
            norm(width),
            activation(),
        )
        self.head = nn.Linear(width, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.body(x))
        return out


class ConcatSliceIndex(nn.Module):
    """Concatenation, slicing and integer-list indexing of features: ``cat([tanh(W x),
    sin(x)])``, a slice of it, a gathered subset, joined again."""

    picked: torch.Tensor  # the gathered feature positions (a buffer, so it moves with .to)

    def __init__(self, n: int, width: int) -> None:
        super().__init__()
        self.first = nn.Linear(n, width)
        self.second = nn.Linear(width + n, width)
        self.head = nn.Linear(width // 2 + 3, 4)
        self.register_buffer("picked", torch.tensor([0, 3, 5]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.tanh(self.first(x)), torch.sin(x)], dim=1)
        h = torch.sigmoid(self.second(h))
        half = h[:, : h.shape[1] // 2]
        picked = h[:, self.picked] * torch.tanh(h[:, -3:])
        out: torch.Tensor = self.head(torch.cat([half, picked], dim=1))
        return out


class MeanPermute(nn.Module):
    """A ``[tokens, features]`` sample mixed along features, permuted, mixed along tokens,
    then averaged and summed: the ``permute``, ``mean`` and ``sum`` nodes."""

    def __init__(self, tokens: int, features: int) -> None:
        super().__init__()
        self.features = nn.Linear(features, 8)
        self.tokens = nn.Linear(tokens, 5)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.features(x))  # [B, T, 8]
        h = torch.tanh(self.tokens(h.permute(0, 2, 1)))  # [B, 8, 5]
        pooled = h.mean(dim=2) + 0.1 * h.sum(dim=2) ** 2
        out: torch.Tensor = self.head(pooled)
        return out


class SoftmaxHead(nn.Module):
    """An MLP whose forward ends in ``softmax`` or ``log_softmax`` over its classes, as
    classifiers exported with their probabilities do."""

    def __init__(self, n: int, width: int, classes: int, log: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n, width), nn.Tanh(), nn.Linear(width, classes))
        self.log = log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.body(x)
        return F.log_softmax(logits, dim=-1) if self.log else F.softmax(logits, dim=-1)


class TutorialCNN(nn.Module):
    """The PyTorch tutorial's CNN (smaller): conv, ReLU, max-pool twice, flattened with
    ``x.view(x.size(0), -1)`` (the ``sym_size`` of an exported graph), then MLP layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 5)
        self.conv2 = nn.Conv2d(3, 6, 5)
        self.fc1 = nn.Linear(6 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(x.size(0), -1)
        out: torch.Tensor = self.fc2(F.relu(self.fc1(x)))
        return out


class GroupNormCNN(nn.Module):
    """Convolutions each followed by ``nn.GroupNorm`` (two groups) and SiLU, then a
    linear head, on ``side x side`` one-channel images."""

    def __init__(self, side: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.GroupNorm(2, 4),
            nn.SiLU(),
            nn.Conv2d(4, 4, 3, stride=2),
            nn.GroupNorm(2, 4),
            nn.Tanh(),
            nn.Flatten(),
        )
        self.head = nn.Linear(_flat_size(self.body, (1, side, side)), 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.body(x))
        return out


# --- builders ---------------------------------------------------------------------------


def _flat_size(body: nn.Module, sample_shape: tuple[int, ...]) -> int:
    """How many features ``body`` gives one sample of ``sample_shape`` (a dry forward)."""
    with torch.no_grad():
        return int(body(torch.zeros(1, *sample_shape)).numel())


def _headed(layers: list[nn.Module], sample_shape: tuple[int, ...], outputs: int) -> nn.Module:
    """``layers``, a Flatten and a Linear head sized for ``sample_shape``, as one
    ``nn.Sequential``."""
    body = nn.Sequential(*layers, nn.Flatten())
    return nn.Sequential(*body, nn.Linear(_flat_size(body, sample_shape), outputs))


def _randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Running statistics and affine weights away from their identity defaults, so that
    eval-mode batch norm is a real affine map."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model


def _mlp(n: int, widths: tuple[int, ...], outputs: int, activation: type[nn.Module]) -> nn.Module:
    layers: list[nn.Module] = []
    previous = n
    for width in widths:
        layers += [nn.Linear(previous, width), activation()]
        previous = width
    layers.append(nn.Linear(previous, outputs))
    return nn.Sequential(*layers)


def _pinn(activation: Callable[[], nn.Module]) -> nn.Module:
    """2-64-64-64-1: a PINN's usual shape (the input is a point (x, t))."""
    return nn.Sequential(
        nn.Linear(2, 64),
        activation(),
        nn.Linear(64, 64),
        activation(),
        nn.Linear(64, 64),
        activation(),
        nn.Linear(64, 1),
    )


def _seeded(name: str, factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """``factory`` run under a seed drawn from ``name`` (in a forked RNG), then frozen:
    eval mode, float32, no parameter requiring grad."""
    seed = zlib.crc32(name.encode())

    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = factory()
        return model.float().eval().requires_grad_(False)

    return build


def _arch(
    name: str,
    family: str,
    sample_shape: tuple[int, ...],
    factory: Callable[[], nn.Module],
    *,
    output_index: int | None = 0,
    objective: str | None = None,
    target: int = 0,
    batch: int = 2,
) -> Architecture:
    return Architecture(
        name=name,
        family=family,
        sample_shape=sample_shape,
        build=_seeded(name, factory),
        output_index=None if objective is not None else output_index,
        objective=objective,
        target=target,
        batch=batch,
    )


def _cnn_relu_maxpool(shape: tuple[int, ...]) -> nn.Module:
    layers = [nn.Conv2d(shape[0], 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    layers += [nn.Conv2d(4, 8, 3), nn.ReLU(), nn.MaxPool2d(2)]
    return _headed(layers, shape, 10)


def _cnn_bn_silu(shape: tuple[int, ...]) -> nn.Module:
    layers = [nn.Conv2d(shape[0], 4, 3, padding=1), nn.BatchNorm2d(4), nn.SiLU()]
    layers += [nn.Conv2d(4, 8, 3, stride=2), nn.BatchNorm2d(8), nn.SiLU()]
    return _randomize_batchnorm(_headed([*layers, nn.AdaptiveAvgPool2d(2)], shape, 10))


def _depthwise_cnn(shape: tuple[int, ...]) -> nn.Module:
    layers = [nn.Conv2d(shape[0], 6, 1), nn.Tanh()]
    layers += [nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Softplus()]  # depthwise
    layers += [nn.Conv2d(6, 4, 1), nn.Tanh()]  # pointwise
    return _headed(layers, shape, 5)


def _dilated_cnn(shape: tuple[int, ...]) -> nn.Module:
    layers = [nn.Conv2d(shape[0], 4, 3, dilation=2, padding=2), nn.Tanh()]
    layers += [nn.Conv2d(4, 4, 3, dilation=2, stride=2, padding=(1, 2), groups=2), nn.GELU()]
    return _headed(layers, shape, 5)


def _decoder() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 2 * 4 * 4),
        nn.Tanh(),
        nn.Unflatten(1, (2, 4, 4)),
        nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1),
        nn.Sigmoid(),
        nn.ConvTranspose2d(3, 1, 3, padding=1),
    )


def _lenet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 5, padding=2),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Conv2d(2, 4, 5),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 16),
        nn.Tanh(),
        nn.Linear(16, 10),
    )


def _conv1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 4, 5, stride=2, padding=2),
        nn.Tanh(),
        nn.Conv1d(4, 4, 3, padding=1),
        nn.Softplus(),
        nn.AdaptiveAvgPool1d(4),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


def _mish_elu_mlp() -> nn.Module:
    """Mish and ELU: activations whose forward-over-reverse rules torch lacks under
    ``no_grad`` (Mish), or that the closed-form table knows (ELU)."""
    return nn.Sequential(
        nn.Linear(16, 32), nn.Mish(), nn.Linear(32, 32), nn.ELU(), nn.Linear(32, 3)
    )


def _image_cnns(
    maxpool: tuple[int, ...],
    bn_silu: tuple[int, ...],
    depthwise: tuple[int, ...],
    dilated: tuple[int, ...],
    suffix: str = "",
) -> tuple[Architecture, ...]:
    """The four convolutional families of issue 19, at the given input shapes."""
    return (
        _arch(
            f"cnn_relu_maxpool{suffix}",
            "cnn_relu_maxpool",
            maxpool,
            lambda: _cnn_relu_maxpool(maxpool),
            objective="cross_entropy",
            target=3,
        ),
        _arch(
            f"cnn_bn_silu{suffix}",
            "cnn_bn_silu",
            bn_silu,
            lambda: _cnn_bn_silu(bn_silu),
            output_index=2,
        ),
        _arch(
            f"depthwise_cnn{suffix}",
            "depthwise_dilated",
            depthwise,
            lambda: _depthwise_cnn(depthwise),
            output_index=1,
        ),
        _arch(
            f"dilated_cnn{suffix}",
            "depthwise_dilated",
            dilated,
            lambda: _dilated_cnn(dilated),
            output_index=3,
        ),
    )


# The table the tests run (small inputs, so that its float64 references stay cheap).
ARCHITECTURES: tuple[Architecture, ...] = (
    _arch("mlp_tanh", "mlp", (16,), lambda: _mlp(16, (32, 32), 3, nn.Tanh)),
    _arch("residual_mlp", "residual", (16,), lambda: ResidualMLP(16, 32, 3, depth=2)),
    _arch("residual_cnn", "residual", (1, 8, 8), lambda: ResidualCNN(8), output_index=4),
    _arch(
        "layernorm_gelu_mlp",
        "layernorm",
        (16,),
        lambda: NormMLP(16, 32, 3, nn.LayerNorm, nn.GELU),
    ),
    _arch("rmsnorm_mlp", "norm", (16,), lambda: NormMLP(16, 32, 3, nn.RMSNorm, nn.Tanh)),
    _arch("groupnorm_cnn", "norm", (1, 8, 8), lambda: GroupNormCNN(8), output_index=1),
    *_image_cnns((1, 12, 12), (1, 10, 10), (2, 6, 6), (1, 8, 8)),
    _arch("conv1d_sequence", "cnn1d", (2, 16), _conv1d),
    _arch("convtranspose_decoder", "decoder", (8,), _decoder, output_index=27),
    _arch("functional_mlp", "functional", (16,), lambda: FunctionalMLP(16, 32, 3)),
    _arch("swish_mlp", "custom_activation", (16,), lambda: _mlp(16, (32, 32), 3, Swish)),
    _arch("mish_elu_mlp", "elementwise", (16,), _mish_elu_mlp),
    _arch("pinn_tanh", "pinn", (2,), lambda: _pinn(nn.Tanh)),
    _arch("pinn_sin", "pinn", (2,), lambda: _pinn(Sine)),
    _arch("softplus_energy_mlp", "energy", (16,), lambda: _mlp(16, (32, 32), 1, nn.Softplus)),
    _arch(
        "sequential_subclass",
        "sequential_subclass",
        (16,),
        lambda: SequentialMLP(16, (24, 24), 3),
    ),
    _arch("lenet", "lenet", (1, 28, 28), _lenet, output_index=7),
    _arch(
        "tutorial_cnn",
        "cnn_tutorial",
        (1, 28, 28),
        TutorialCNN,
        objective="cross_entropy",
        target=5,
        batch=1,  # 784 inputs: one sample keeps its float64 reference under a second
    ),
    _arch("gru_head", "recurrent", (6, 4), lambda: RecurrentHead(nn.GRU, 4, 16)),
    _arch("lstm_head", "recurrent", (6, 4), lambda: RecurrentHead(nn.LSTM, 4, 16)),
    _arch("multihead_attention", "attention", (6, 8), lambda: AttentionBlock(6, 8, 2)),
    _arch("sdpa_attention", "attention", (6, 8), lambda: SDPAttention(8)),
    # One sample: its 512x512 float64 reference costs seconds.
    _arch(
        "transformer_encoder",
        "transformer",
        (16, 32),
        lambda: TransformerEncoder(32, 4),
        batch=1,
    ),
    _arch("gating_mlp", "gating", (16,), lambda: GatingMLP(16, 24, 3)),
    _arch("quotient_mlp", "quotient", (16,), lambda: QuotientMLP(16, 24, 3)),
    _arch("softmax_head", "softmax_head", (16,), lambda: SoftmaxHead(16, 24, 5, log=False)),
    _arch(
        "log_softmax_head",
        "softmax_head",
        (16,),
        lambda: SoftmaxHead(16, 24, 5, log=True),
        output_index=2,
    ),
    _arch("concat_slice_index", "indexing", (12,), lambda: ConcatSliceIndex(12, 16)),
    _arch("mean_permute", "reshape", (6, 4), lambda: MeanPermute(6, 4)),
)


# The image families at MNIST size (one channel, 28x28): the same builders (each seeded from
# its own name), for the benchmark's "CNN families at 28x28" rows; not in ARCHITECTURES, whose
# tests would spend seconds on each of their 784x784 references.
IMAGES_28X28: tuple[Architecture, ...] = (
    *_image_cnns((1, 28, 28), (1, 28, 28), (1, 28, 28), (1, 28, 28), suffix="_28x28"),
    _arch("residual_cnn_28x28", "residual", (1, 28, 28), lambda: ResidualCNN(28), output_index=4),
    _arch("groupnorm_cnn_28x28", "norm", (1, 28, 28), lambda: GroupNormCNN(28), output_index=1),
)

_BY_NAME: dict[str, Architecture] = {arch.name: arch for arch in ARCHITECTURES + IMAGES_28X28}
assert len(_BY_NAME) == len(ARCHITECTURES) + len(IMAGES_28X28), "names must be unique"


def by_name(name: str) -> Architecture:
    """The architecture called ``name`` (in ARCHITECTURES or IMAGES_28X28); a KeyError
    naming the known ones otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(_BY_NAME)}") from None
