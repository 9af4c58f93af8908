"""The seeded architecture table (bench/architectures.py) through the engine, in float64.

For every architecture: the engine's Hessian (of the table's output index, or of its
cross-entropy objective) equals ``torch.func.hessian`` of the same scalar of one sample,
computed here per sample, and its Jacobian of all outputs equals ``torch.func.jacrev``;
both to 1e-10 relative: ``max|a - b| <= 1e-10 * max(1, max|ref|)`` (exact paths agree up
to float64 rounding). A second set of tests pins which path each took, and a last one
that the fast paths ("graph" or "structured") take at least 80% of the table (issue 19).

The references run under the math SDPA backend: CPU flash attention has no forward-mode
derivative of its backward, and the references must exist for every architecture.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.architectures import ARCHITECTURES, Architecture, by_name
from hessian_service.engine import (
    DerivativeResult,
    Objective,
    ObjectiveKind,
    compute_hessian,
    compute_jacobian,
    graph_second_order,
)

RELATIVE = 1e-10
PATHS = frozenset({"graph", "structured", "generic", "autograd", "error"})
FAST_PATHS = frozenset({"graph", "structured"})
COVERAGE_FLOOR = 0.8

# The path each architecture's Hessian takes with method="auto": the part of
# `str(result.method)` before the colon, or "error" where the engine raises (then
# KNOWN_ERRORS holds the message and that architecture's correctness and path cases are
# strict xfails, so a fix shows up as a failure until the entry is flipped). Filled with
# what the engine gives now; update it with the engine. History: before the graph engine
# (commit 645cc02) 5 of these took "structured", 23 "generic", and gru_head, lstm_head,
# multihead_attention and transformer_encoder raised ("output with shape [1, 16] doesn't
# match the broadcast shape [2, 1, 16]"; "derivative for
# aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented").
EXPECTED_PATH: dict[str, str] = {
    "mlp_tanh": "structured",
    "residual_mlp": "graph",
    "residual_cnn": "graph",
    "layernorm_gelu_mlp": "graph",
    "rmsnorm_mlp": "graph",
    "groupnorm_cnn": "graph",
    "cnn_relu_maxpool": "structured",
    "cnn_bn_silu": "structured",
    "depthwise_cnn": "structured",
    "dilated_cnn": "structured",
    "conv1d_sequence": "structured",
    "convtranspose_decoder": "graph",
    "functional_mlp": "graph",
    "swish_mlp": "graph",
    "mish_elu_mlp": "graph",
    "pinn_tanh": "graph",  # forward tangents: n = 2 is far below the widths
    "pinn_sin": "graph",
    "softplus_energy_mlp": "structured",
    "sequential_subclass": "structured",
    "lenet": "structured",
    "tutorial_cnn": "graph",
    "gru_head": "graph",
    "lstm_head": "graph",
    "multihead_attention": "graph",
    "sdpa_attention": "graph",
    "transformer_encoder": "graph",
    "gating_mlp": "graph",
    "quotient_mlp": "graph",
    "softmax_head": "graph",
    "log_softmax_head": "graph",
    "concat_slice_index": "graph",
    "mean_permute": "graph",
}
# The same for the Jacobian of all outputs (the graph engine derives Hessians only, so
# far: its Jacobians go generic).
EXPECTED_JACOBIAN_PATH: dict[str, str] = {
    "mlp_tanh": "structured",
    "residual_mlp": "generic",
    "residual_cnn": "generic",
    "layernorm_gelu_mlp": "generic",
    "rmsnorm_mlp": "generic",
    "groupnorm_cnn": "generic",
    "cnn_relu_maxpool": "structured",
    "cnn_bn_silu": "structured",
    "depthwise_cnn": "structured",
    "dilated_cnn": "structured",
    "conv1d_sequence": "structured",
    "convtranspose_decoder": "generic",
    "functional_mlp": "generic",
    "swish_mlp": "generic",
    "mish_elu_mlp": "generic",
    "pinn_tanh": "structured",
    "pinn_sin": "generic",
    "softplus_energy_mlp": "structured",
    "sequential_subclass": "structured",
    "lenet": "structured",
    "tutorial_cnn": "generic",
    "gru_head": "generic",
    "lstm_head": "generic",
    "multihead_attention": "generic",
    "sdpa_attention": "generic",
    "transformer_encoder": "generic",
    "gating_mlp": "generic",
    "quotient_mlp": "generic",
    "softmax_head": "generic",
    "log_softmax_head": "generic",
    "concat_slice_index": "generic",
    "mean_permute": "generic",
}
# What the engine raises where a path above is "error", by architecture.
KNOWN_ERRORS: dict[str, str] = {}


def expected_path(name: str, kind: str) -> str:
    """The path the table expects for ``kind`` ("hessian" or "jacobian")."""
    return (EXPECTED_JACOBIAN_PATH if kind == "jacobian" else EXPECTED_PATH)[name]


def _case(kind: str, arch: Architecture) -> object:
    """One parametrized case, xfailed (strict, for the recorded error) where the engine
    fails today."""
    if expected_path(arch.name, kind) != "error":
        return pytest.param(arch.name, id=arch.name)
    mark = pytest.mark.xfail(strict=True, raises=RuntimeError, reason=KNOWN_ERRORS[arch.name])
    return pytest.param(arch.name, id=arch.name, marks=mark)


HESSIAN_CASES = [_case("hessian", arch) for arch in ARCHITECTURES]
JACOBIAN_CASES = [_case("jacobian", arch) for arch in ARCHITECTURES]


# --- inputs and independent references --------------------------------------------------


@functools.cache
def _model(name: str) -> nn.Module:
    return by_name(name).build().double()


@functools.cache
def _inputs(name: str) -> torch.Tensor:
    """A seeded batch ``[batch, *sample_shape]`` in float64, its seed from the name."""
    arch = by_name(name)
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1)
    return torch.randn(arch.batch, *arch.sample_shape, generator=generator, dtype=torch.float64)


def _scalar_of_one_sample(arch: Architecture, model: nn.Module) -> Callable[..., torch.Tensor]:
    """The table's scalar as a function of one sample, written here (not the engine's)."""

    def scalar(sample: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = model(sample.unsqueeze(0)).reshape(-1)
        if arch.objective == "cross_entropy":
            return F.cross_entropy(out.unsqueeze(0), torch.tensor([arch.target]))
        assert arch.objective is None and arch.output_index is not None
        return out[arch.output_index]

    return scalar


@functools.cache  # shared by the Hessian and the diagonal/trace tests
def reference_hessian(name: str) -> torch.Tensor:
    """``[batch, n, n]``: ``torch.func.hessian`` of the scalar, one sample at a time."""
    arch, model, x = by_name(name), _model(name), _inputs(name)
    scalar = _scalar_of_one_sample(arch, model)
    with sdpa_kernel(SDPBackend.MATH):
        return torch.stack([torch.func.hessian(scalar)(s).reshape(arch.n, arch.n) for s in x])


def reference_jacobian(name: str) -> torch.Tensor:
    """``[batch, m, n]``: ``torch.func.jacrev`` of all outputs, one sample at a time."""
    arch, model, x = by_name(name), _model(name), _inputs(name)

    def outputs(sample: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = model(sample.unsqueeze(0)).reshape(-1)
        return out

    with sdpa_kernel(SDPBackend.MATH):
        return torch.stack([torch.func.jacrev(outputs)(s).reshape(-1, arch.n) for s in x])


# --- the engine, once per architecture (the path tests reuse the correctness tests' runs) --


def _objective(arch: Architecture) -> Objective | None:
    if arch.objective is None:
        return None
    return Objective(kind=ObjectiveKind(arch.objective), target=torch.tensor(arch.target))


@functools.cache
def engine_hessian(name: str) -> DerivativeResult:
    arch = by_name(name)
    return compute_hessian(
        _model(name), _inputs(name), output_index=arch.output_index, objective=_objective(arch)
    )


@functools.cache
def engine_jacobian(name: str) -> DerivativeResult:
    return compute_jacobian(_model(name), _inputs(name))


def assert_relative_close(actual: torch.Tensor, reference: torch.Tensor) -> None:
    assert actual.shape == reference.shape, (actual.shape, reference.shape)
    assert actual.dtype == torch.float64
    scale = max(1.0, float(reference.abs().max()))
    worst = float((actual - reference).abs().max())
    assert worst <= RELATIVE * scale, f"max|a-b| {worst:.3e} > {RELATIVE:.0e} * {scale:.3e}"


# --- the tests ---------------------------------------------------------------------------


def test_expectations_cover_the_table_exactly() -> None:
    names = {arch.name for arch in ARCHITECTURES}
    assert set(EXPECTED_PATH) == names
    assert set(EXPECTED_PATH.values()) <= PATHS
    assert set(EXPECTED_JACOBIAN_PATH) == names
    assert set(EXPECTED_JACOBIAN_PATH.values()) <= PATHS
    kinds = ("hessian", "jacobian")
    failing = {name for name in names if "error" in {expected_path(name, k) for k in kinds}}
    assert set(KNOWN_ERRORS) == failing


def test_table_covers_the_issue_families() -> None:
    assert len(ARCHITECTURES) >= 24
    families = {arch.family for arch in ARCHITECTURES}
    required = {"residual", "layernorm", "cnn_bn_silu", "cnn_relu_maxpool", "depthwise_dilated"}
    required |= {"decoder", "functional", "custom_activation", "pinn", "recurrent", "attention"}
    required |= {"transformer", "gating", "quotient", "norm", "softmax_head", "lenet"}
    assert required <= families, sorted(required - families)


@pytest.mark.parametrize("name", HESSIAN_CASES)
def test_hessian_equals_torch_func(name: str) -> None:
    result = engine_hessian(name)  # first: where it raises, no reference is spent
    assert_relative_close(result.selected, reference_hessian(name))


@pytest.mark.parametrize("name", JACOBIAN_CASES)
def test_jacobian_equals_jacrev(name: str) -> None:
    result = engine_jacobian(name)
    assert_relative_close(result.selected, reference_jacobian(name))


@pytest.mark.parametrize("name", HESSIAN_CASES)
def test_hessian_path(name: str) -> None:
    assert str(engine_hessian(name).method).split(":")[0] == expected_path(name, "hessian")


@pytest.mark.parametrize("name", JACOBIAN_CASES)
def test_jacobian_path(name: str) -> None:
    assert str(engine_jacobian(name).method).split(":")[0] == expected_path(name, "jacobian")


def test_fast_paths_cover_the_table() -> None:
    # EXPECTED_PATH is what runs (test_hessian_path pins it), so its share is the coverage.
    share = sum(path in FAST_PATHS for path in EXPECTED_PATH.values()) / len(EXPECTED_PATH)
    assert share >= COVERAGE_FLOOR, f"fast paths take {share:.0%} of the table"


@pytest.mark.parametrize("name", [arch.name for arch in ARCHITECTURES])
def test_forward_laplacian_diagonal_and_trace_equal_the_dense_ones(name: str) -> None:
    """The exact diagonal and trace without the matrix (``engine/graph/laplacian.py``):
    every architecture of the table runs it, to the table's tolerance."""
    arch = by_name(name)
    model, x, objective = _model(name), _inputs(name), _objective(arch)
    index = arch.output_index if objective is None else None
    diagonal = graph_second_order(model, x, trace=False, output_index=index, objective=objective)
    trace = graph_second_order(model, x, trace=True, output_index=index, objective=objective)
    assert diagonal is not None and trace is not None, "the direct executor cannot run it"
    reference = reference_hessian(name).diagonal(dim1=-2, dim2=-1)
    assert_relative_close(diagonal.values.reshape(reference.shape), reference)
    assert_relative_close(trace.values, reference.sum(-1))
