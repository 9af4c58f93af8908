"""The torch ways to get a row's input Hessian or Jacobian, as a user would write them.

For each benchmark row (bench/families.py): the scalar of one sample (a raw output, or the
cross-entropy towards the row's target class), the classic loop of ``autograd.grad`` rows,
``torch.func.hessian`` / ``jacrev`` (vmapped over a batch), and the same under
``torch.compile``. Every call runs under the math SDPA backend: CPU flash attention has no
derivative of its backward (the transformer row), and on other rows the setting is unused.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import hessian, jacrev, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.families import BenchRow

Method = Callable[[], torch.Tensor]


def _math_sdpa(fn: Callable[[], torch.Tensor]) -> Method:
    def call() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.MATH):
            return fn()

    return call


def scalars(row: BenchRow, out: torch.Tensor) -> torch.Tensor:
    """The row's scalar of each sample, from the model's output ``[B, ...]``: ``[B]``."""
    flat = out.reshape(out.shape[0], -1)
    if row.objective == "cross_entropy":
        return -torch.log_softmax(flat, dim=1)[:, row.target]
    if row.objective is not None:
        raise ValueError(f"{row.name}: unknown objective {row.objective!r}")
    assert row.output_index is not None
    return flat[:, row.output_index]


def scalar_fn(model: nn.Module, row: BenchRow) -> Callable[[torch.Tensor], torch.Tensor]:
    """The row's scalar of ONE sample (what torch.func differentiates)."""
    return lambda sample: scalars(row, model(sample.unsqueeze(0)))[0]


def outputs_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Every output of ONE sample, flat (a Jacobian row's function)."""
    return lambda sample: model(sample.unsqueeze(0)).reshape(-1)


def row_loop_hessian(model: nn.Module, row: BenchRow, x: torch.Tensor) -> torch.Tensor:
    """The classic answer: one ``autograd.grad`` call per Hessian row, all samples of the
    batch at once (their scalars are independent, so the gradient of their sum holds each
    sample's own gradient): ``n + 1`` backward passes, ``[B, n, n]``."""
    at = x.detach().requires_grad_(True)
    with torch.enable_grad():
        total = scalars(row, model(at)).sum()
        (gradient,) = torch.autograd.grad(total, at, create_graph=True)
        flat = gradient.reshape(x.shape[0], -1)
        rows = [
            torch.autograd.grad(flat[:, i].sum(), at, retain_graph=True)[0].reshape(x.shape[0], -1)
            for i in range(flat.shape[1])
        ]
    return torch.stack(rows, dim=1)


def row_loop_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One ``autograd.grad`` call per output, all samples at once: ``[B, m, n]``."""
    at = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = model(at).reshape(x.shape[0], -1)
        rows = [
            torch.autograd.grad(out[:, i].sum(), at, retain_graph=True)[0].reshape(x.shape[0], -1)
            for i in range(out.shape[1])
        ]
    return torch.stack(rows, dim=1)


def func_name(row: BenchRow, name: str) -> str:
    """``torch.func.hessian``, or ``vmap(torch.func.hessian)`` for a batch."""
    return f"vmap({name})" if row.batch > 1 else name


def func_transform(
    model: nn.Module, row: BenchRow, *, reverse_over_reverse: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.func.hessian`` (or ``jacrev``) of the row's function, vmapped over a batch;
    it takes the whole batch ``x`` either way. ``reverse_over_reverse``: ``jacrev(jacrev)``
    in place of ``hessian`` (``jacfwd(jacrev)``)."""
    if row.kind == "jacobian":
        per_sample = jacrev(outputs_fn(model))
    elif row.kind == "trace":
        second = jacrev(jacrev(scalar_fn(model, row))) if reverse_over_reverse else None
        full = second if second is not None else hessian(scalar_fn(model, row))
        per_sample = lambda sample: torch.trace(full(sample).reshape(row.n, row.n))  # noqa: E731
    elif reverse_over_reverse:
        per_sample = jacrev(jacrev(scalar_fn(model, row)))
    else:
        per_sample = hessian(scalar_fn(model, row))
    if row.batch > 1:
        return vmap(per_sample)
    return lambda x: per_sample(x[0])


@dataclass
class Compiled:
    """One ``torch.compile`` of a torch.func transform, compiled by its first call."""

    name: str
    method: Method | None
    compile_s: float
    error: str | None


def inductor_cache() -> str:
    """Where torch.compile keeps its compiled graphs across runs, and whether it held any
    when this run started: a compile's time is a few times longer on a cold cache (on the
    2-core machine, 81 s against 16 s for the Conv/ReLU/MaxPool CNN's Hessian)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    path = Path(cache_dir())
    warm = path.is_dir() and any(path.iterdir())
    return f"{path} ({'warm' if warm else 'cold'} at the start)"


# Failed compiles' exceptions, kept for the life of the process. Collecting the frames of a
# failed dynamo trace corrupts torch's state (torch 2.13: after a failed compile of
# torch.func.hessian through LayerNorm, the next gc.collect() makes every later torch.func
# call through BatchNorm fail an "InferenceMode::is_enabled()" internal assert).
_FAILED_COMPILES: list[BaseException] = []


def _compile(
    name: str, transform: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> Compiled:
    torch._dynamo.reset()
    compiled = torch.compile(transform)
    start = time.perf_counter()
    try:
        with sdpa_kernel(SDPBackend.MATH):
            compiled(x)
    except Exception as error:
        _FAILED_COMPILES.append(error)
        message = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        return Compiled(name, None, time.perf_counter() - start, message)
    return Compiled(name, _math_sdpa(lambda: compiled(x)), time.perf_counter() - start, None)


def compiled_transforms(model: nn.Module, row: BenchRow, x: torch.Tensor) -> list[Compiled]:
    """``torch.compile(torch.func.hessian)`` (or ``jacrev``, vmapped for a batch), compiled
    by one call here so that its compile time is reported apart from its run time; where
    that fails to compile, ``torch.compile`` of ``jacrev(jacrev)`` as well, so that the row
    still has a compiled torch peer. Failures are returned, not raised: the row says so.

    Dynamo's caches are reset before each: every row compiles the same Python function
    objects (the lambdas above), and past its recompile limit dynamo would silently run
    them eagerly."""
    base = transform_name(row)
    first = _compile(f"torch.compile({func_name(row, base)})", func_transform(model, row), x)
    if first.method is not None or row.kind == "jacobian":
        return [first]
    nested = "torch.func.jacrev(jacrev)"
    fallback = _compile(
        f"torch.compile({func_name(row, f'trace({nested})' if row.kind == 'trace' else nested)})",
        func_transform(model, row, reverse_over_reverse=True),
        x,
    )
    return [first, fallback]


ROW_LOOP = "row loop"


def methods(
    model: nn.Module, row: BenchRow, x: torch.Tensor, *, row_loop: bool = True
) -> dict[str, Method]:
    """The eager torch peers of a row, by the names the JSON line uses (the row loop
    left out when ``row_loop`` is false)."""
    transform = func_transform(model, row)
    name = func_name(row, transform_name(row))
    if row.kind == "jacobian":
        loop: Method = _math_sdpa(lambda: row_loop_jacobian(model, x))
    elif row.kind == "trace":
        loop = _math_sdpa(
            lambda: row_loop_hessian(model, row, x).diagonal(dim1=-2, dim2=-1).sum(-1)
        )
    else:
        loop = _math_sdpa(lambda: row_loop_hessian(model, row, x))
    chosen = {name: _math_sdpa(lambda: transform(x))}
    if row_loop:
        chosen[ROW_LOOP] = loop
    return chosen


def reference(model: nn.Module, row: BenchRow, x: torch.Tensor, samples: int) -> torch.Tensor:
    """The float64 answer on the first ``samples`` samples: ``[S, n, n]`` (``[S, m, n]``),
    torch.func per sample on a float64 copy of the model."""
    double = copy.deepcopy(model).double()
    per_sample = (
        jacrev(outputs_fn(double)) if row.kind == "jacobian" else hessian(scalar_fn(double, row))
    )
    with sdpa_kernel(SDPBackend.MATH):
        matrices = [per_sample(sample).reshape(-1, row.n) for sample in x[:samples].double()]
    stacked = torch.stack(matrices)
    return stacked.diagonal(dim1=-2, dim2=-1).sum(-1) if row.kind == "trace" else stacked


def transform_name(row: BenchRow) -> str:
    """The torch.func transform a row's peers time, by the name the JSON line uses."""
    if row.kind == "jacobian":
        return "torch.func.jacrev"
    return "trace(torch.func.hessian)" if row.kind == "trace" else "torch.func.hessian"
