"""The rows of the peer benchmark (issue 19): which model, input, scalar and batch each is.

The seeded architecture table (bench/architectures.py) keeps its models small, so that the
float64 correctness tests are quick; the benchmark wants the sizes people run. Where the
table's model already has the size issue 19 names (the transformer layer on [16, 32], the
2-64-64-64-1 PINNs), the row uses it as is; otherwise this module builds a bench-size
variant the same way (the table's module classes, a seed drawn from the name in a forked
RNG, eval mode, float32, frozen weights): MLPs at n = 784 with width 128, CNNs on 1x28x28.
``mlp_tanh`` and ``digits_cnn`` are the bundled models with their shipped weights.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from bench.architectures import NormMLP, ResidualMLP, by_name
from bench.models import bundled

Kind = Literal["hessian", "jacobian", "trace"]


@dataclass(frozen=True)
class BenchRow:
    """One benchmark row: a model, its per-sample input shape, the batch, and the scalar.

    ``output_index`` selects a raw output of the flattened per-sample output; with
    ``objective`` (``"cross_entropy"`` towards class ``target``) it is None. A
    ``"jacobian"`` row takes the Jacobian of every output instead, a ``"trace"`` row the
    trace of the scalar's input Hessian (the Laplacian, issue 17). ``headline`` rows are
    the ones the quick mode runs.
    """

    name: str
    family: str
    build: Callable[[], nn.Module]
    sample_shape: tuple[int, ...]
    batch: int = 1
    output_index: int | None = 0
    objective: str | None = None
    target: int = 0
    kind: Kind = "hessian"
    headline: bool = False

    @property
    def n(self) -> int:
        """Inputs per sample: the side of each Hessian."""
        return math.prod(self.sample_shape)

    @property
    def key(self) -> str:
        """The row's name in the JSON line: ``kind/name/B<batch>``."""
        return f"{self.kind}/{self.name}/B{self.batch}"


def seeded(name: str, factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """``factory`` under a seed drawn from ``name`` in a forked RNG (building a row never
    moves the caller's random stream), then eval mode, float32, frozen weights."""
    seed = zlib.crc32(name.encode())

    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = factory()
        return model.float().eval().requires_grad_(False)

    return build


def _randomized_batchnorm(model: nn.Module) -> nn.Module:
    """Running statistics and affine weights away from their identity defaults (as the
    table does), so that eval-mode batch norm is a real affine map."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model


def cnn_bn_silu_28() -> nn.Module:
    """The table's BatchNorm2d + SiLU + AdaptiveAvgPool CNN, at 1x28x28 with 8/16 channels."""
    return _randomized_batchnorm(
        nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.SiLU(),
            nn.Conv2d(8, 16, 3, stride=2),
            nn.BatchNorm2d(16),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 10),
        )
    )


def cnn_relu_maxpool_28() -> nn.Module:
    """The table's Conv/ReLU/MaxPool CNN at 1x28x28 (28 -> 14 -> 12 -> 6)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 6 * 6, 10),
    )


def depthwise_dilated_cnn_28() -> nn.Module:
    """Depthwise (groups = channels) and dilated convolutions on 1x28x28: a stem, a
    depthwise dilated 3x3, a pointwise 1x1, a dilated stride-2 grouped 3x3."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8),  # depthwise, dilated
        nn.Softplus(),
        nn.Conv2d(8, 8, 1),  # pointwise
        nn.Tanh(),
        nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2),
        nn.GELU(),
        nn.Flatten(),
        nn.Linear(8 * 14 * 14, 10),
    )


def _table(name: str) -> Callable[[], nn.Module]:
    """The seeded table's own builder for ``name`` (its size is the benchmark's)."""
    return by_name(name).build


ROWS: tuple[BenchRow, ...] = (
    BenchRow("pinn_tanh", "pinn", _table("pinn_tanh"), (2,), batch=4096, headline=True),
    # The PINN's Laplacian (issue 17): what a physics-informed loss needs of the Hessian.
    BenchRow(
        "pinn_tanh", "pinn", _table("pinn_tanh"), (2,), batch=4096, kind="trace", headline=True
    ),
    BenchRow("pinn_sin", "pinn", _table("pinn_sin"), (2,), batch=4096),
    BenchRow(
        "residual_mlp_784",
        "residual",
        seeded("residual_mlp_784", lambda: ResidualMLP(784, 128, 10, depth=2)),
        (784,),
        output_index=3,
        headline=True,
    ),
    BenchRow(
        "layernorm_gelu_mlp_784",
        "layernorm",
        seeded("layernorm_gelu_mlp_784", lambda: NormMLP(784, 128, 10, nn.LayerNorm, nn.GELU)),
        (784,),
        output_index=3,
        headline=True,
    ),
    BenchRow(
        "cnn_bn_silu_28",
        "cnn_bn_silu",
        seeded("cnn_bn_silu_28", cnn_bn_silu_28),
        (1, 28, 28),
        output_index=2,
        headline=True,
    ),
    BenchRow(
        "cnn_relu_maxpool_28",
        "cnn_relu_maxpool",
        seeded("cnn_relu_maxpool_28", cnn_relu_maxpool_28),
        (1, 28, 28),
        output_index=None,
        objective="cross_entropy",
        target=3,
    ),
    BenchRow(
        "depthwise_dilated_cnn_28",
        "depthwise_dilated",
        seeded("depthwise_dilated_cnn_28", depthwise_dilated_cnn_28),
        (1, 28, 28),
        output_index=1,
    ),
    BenchRow("transformer_encoder", "transformer", _table("transformer_encoder"), (16, 32)),
    BenchRow(
        "mlp_tanh",
        "mlp",
        lambda: bundled("mlp_tanh"),
        (1, 28, 28),
        output_index=2,
        headline=True,
    ),
    BenchRow(
        "digits_cnn",
        "cnn",
        lambda: bundled("digits_cnn"),
        (1, 28, 28),
        output_index=2,
        headline=True,
    ),
    BenchRow(
        "mlp_tanh",
        "mlp",
        lambda: bundled("mlp_tanh"),
        (1, 28, 28),
        output_index=None,
        kind="jacobian",
        headline=True,
    ),
)


def rows(*, quick: bool, only: tuple[str, ...] = ()) -> tuple[BenchRow, ...]:
    """The rows to run: all, the headline ones (``quick``), or those whose name or key
    contains one of ``only``."""
    chosen = tuple(row for row in ROWS if row.headline or not quick)
    if only:
        chosen = tuple(row for row in chosen if any(s in row.key for s in only))
    return chosen
