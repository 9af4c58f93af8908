"""The benchmark's JAX ports (bench/jax_models.py) compute what the torch models compute.

``make bench`` times JAX peers only on a port whose forward matches torch's below 1e-5
(relative to the output's scale); these tests hold the ports to that on every architecture
of the seeded table and every benchmark row, in float32, and show the check catches a
port that is off by one weight. Skipped where JAX is not installed: it is the benchmark's
extra (``pip install -e '.[bench]'``), not a test dependency.
"""

from __future__ import annotations

import pytest
import torch

jax = pytest.importorskip("jax")

from bench.architectures import ARCHITECTURES  # noqa: E402
from bench.families import ROWS  # noqa: E402
from bench.jax_models import UnsupportedNode, forward_error, port  # noqa: E402

TOLERANCE = 1e-5  # the benchmark's own threshold (bench/jax_peers.py)
# torch.fx cannot trace an RNN's forward (Python control flow on its inputs); the
# benchmark has no recurrent row.
NOT_PORTED = frozenset({"gru_head", "lstm_head"})


def _input(shape: tuple[int, ...], batch: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.rand(batch, *shape, generator=generator) * 2 - 1


@pytest.mark.parametrize(
    "arch", [a for a in ARCHITECTURES if a.name not in NOT_PORTED], ids=lambda a: a.name
)
def test_table_port_matches_torch(arch):
    model = arch.build()
    assert forward_error(port(model), model, _input(arch.sample_shape)) <= TOLERANCE


# The benchmark's own sizes (bench/families.py), where they are not the table's models.
BENCH_SIZED = {row.name: row for row in ROWS if row.name not in {a.name for a in ARCHITECTURES}}


@pytest.mark.parametrize("row", BENCH_SIZED.values(), ids=lambda row: row.name)
def test_benchmark_row_port_matches_torch(row):
    model = row.build()
    assert forward_error(port(model), model, _input(row.sample_shape)) <= TOLERANCE


def test_check_catches_a_port_off_by_one_weight():
    """The same port with one weight moved by 1e-3 fails the check: it compares values."""
    arch = next(a for a in ARCHITECTURES if a.name == "residual_mlp")
    model = arch.build()
    ported = port(model)
    x = _input(arch.sample_shape)
    assert forward_error(ported, model, x) <= TOLERANCE
    ported.params["head.weight"] = ported.params["head.weight"].at[0, 0].add(1e-3)
    assert forward_error(ported, model, x) > TOLERANCE


def test_jax_hessian_of_a_port_matches_torch_func():
    """The ported function differentiates like the torch one: a float32 jax.hessian of
    the gating MLP's output 0 (products of activations: cross terms) against float64
    torch.func.hessian, to 1e-5 relative."""
    arch = next(a for a in ARCHITECTURES if a.name == "gating_mlp")
    model = arch.build()
    ported = port(model)
    x = _input(arch.sample_shape, batch=1)[0]

    def scalar(params, sample):
        return ported.forward(params, sample[None]).reshape(-1)[0]

    got = torch.from_numpy(
        jax.device_get(jax.jit(jax.hessian(scalar, argnums=1))(ported.params, x.numpy())).copy()
    )
    double = model.double()
    expected = torch.func.hessian(lambda s: double(s[None]).reshape(-1)[0])(x.double())
    scale = max(1.0, float(expected.abs().max()))
    assert float((got.double() - expected).abs().max()) <= 1e-5 * scale


def test_unported_module_is_named():
    """A leaf module no rule covers is refused when the port is built, by its name."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Hardtanh())
    with pytest.raises(UnsupportedNode, match=r"(?i)hardtanh"):
        port(model)
