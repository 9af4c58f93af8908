"""The matrix-free operators on the bundled 3x64x64 model, in float32 and float64.

``photo_digits_cnn`` has n = 12,288 inputs: its dense input Hessian is 604 MB in float32
(1.2 GB in float64), a 413 on ``/hessian`` with the default limits. This prints, for one
sample (the bundled ``photo_digits_sample.json``, class-2 logit) and each precision, the
time and products of: HVPs with 1 and 16 vectors; the exact diagonal and trace as the
service computes them (the graph engine's forward-Laplacian pass, counted as n products)
and by 12,288 HVPs on chunks of basis vectors (the way for models that pass cannot run);
Hutchinson's diagonal and Hutch++'s trace (64 products); and the top-5
eigenpairs by Lanczos (with the largest residual ``||Hv - lambda v|| / |lambda_1|``).
Each call runs with ``--budget-mib`` of working memory (default 256). Short calls are the
median of ``--repeats``; the exact ones (seconds) are timed once. Peak memory is not
shown here: under ``make``'s malloc settings freed pages stay with the process, so a row
would reuse the pages of the rows before it; ``tests/unit/test_large_input_memory.py``
measures each operation's peak in a fresh process instead.

torch runs with ``--threads`` intra-op threads (default 1: on a shared 2-core machine
two OpenMP threads slow a small model's products 10-100x; the CPU-busy share printed
first says how quiet the machine was).

    python -m bench.large_input
    python -m bench.large_input --dtypes float32 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bench import timing
from hessian_service.config import BUNDLED_MODELS_DIR
from hessian_service.engine import operators
from hessian_service.engine.operators import results, strategies
from hessian_service.engine.progress import NO_PROGRESS
from hessian_service.repository.registry import load_model

MODEL = "photo_digits_cnn"
SAMPLE = "photo_digits_sample.json"
OUTPUT_INDEX = 2
MiB = 1 << 20
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class Row:
    """One operation's figures in one precision."""

    dtype: str
    operation: str
    products: int
    ms: float
    result: str


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """``fn``'s result and its time in ms: of that one call when ``repeats`` is 1, else
    the median of ``repeats`` more."""
    start = time.perf_counter()
    result = fn()
    timing.sync()
    ms = (time.perf_counter() - start) * 1000
    if repeats > 1:
        ms = timing.median_ms(fn, repeats=repeats, budget_s=30.0, warm_up=False)
    return result, ms


def _hvp64(model: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A float64 ``H v`` of the selected logit by ``torch.autograd`` (double backward):
    the reference the eigen residuals are measured with."""
    model64 = copy.deepcopy(model).to(torch.float64)
    x64 = x[0].to(torch.float64)

    def logit(sample: torch.Tensor) -> torch.Tensor:
        value: torch.Tensor = model64(sample.unsqueeze(0))[0, OUTPUT_INDEX]
        return value

    def product(v: torch.Tensor) -> torch.Tensor:
        point = x64.clone().requires_grad_(True)
        (slope,) = torch.autograd.grad(logit(point), point, create_graph=True)
        (result,) = torch.autograd.grad(slope, point, v.to(torch.float64))
        return result

    return product


def _hvp_basis(kind: str, model: nn.Module, x: torch.Tensor, budget: int) -> results.Estimate:
    """The exact diagonal (or trace) by ``n`` HVPs on chunks of basis vectors: the strategy
    for models the forward-Laplacian pass cannot run, called directly to time it here."""
    problem = strategies.make_problem(
        f"hessian_{kind}", kind, model, x, OUTPUT_INDEX, None, True, None, None, 0, budget,
        NO_PROGRESS,
    )  # fmt: skip
    found = strategies.hvp_basis(problem)
    if isinstance(found, strategies.Declined):
        raise RuntimeError(f"the HVP basis declined: {found.reason}")
    return found


def run_dtype(
    name: str, model: nn.Module, x: torch.Tensor, *, budget: int, repeats: int
) -> list[Row]:
    """Every operation on ``model`` at ``x`` in one precision."""
    rows: list[Row] = []
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(1, 16, *x.shape[1:], generator=generator).to(x)
    common: dict[str, Any] = {"output_index": OUTPUT_INDEX, "memory_budget_bytes": budget}

    def add(
        operation: str, fn: Callable[[], Any], repeat: int, describe: Callable[[Any], str]
    ) -> Any:
        result, ms = _timed(fn, repeat)
        rows.append(Row(name, operation, int(result.products), ms, describe(result)))
        return result

    operators.hessian_vector_products(model, x, vectors[:, :1], **common)  # warm-up
    add(
        "hvp, 1 vector",
        lambda: operators.hessian_vector_products(model, x, vectors[:, :1], **common),
        repeats,
        lambda r: f"|Hv| = {float(r.values.norm()):.4g}",
    )
    add(
        "hvp, 16 vectors",
        lambda: operators.hessian_vector_products(model, x, vectors, **common),
        repeats,
        lambda r: f"mode {r.method}",
    )
    diagonal = add(
        "diagonal, exact",
        lambda: operators.hessian_diagonal(model, x, exact=True, **common),
        1,
        lambda r: f"{r.method}; max |H_ii| = {float(r.values.abs().max()):.4g}",
    )
    exact_trace = float(diagonal.values.sum())
    add(
        "diagonal, exact by HVPs on the basis",
        lambda: _hvp_basis("diagonal", model, x, budget),
        1,
        lambda r: (
            f"{r.method}; max diff to the above "
            f"{float((r.values - diagonal.values).abs().max()):.2g}"
        ),
    )
    add(
        "diagonal, Hutchinson (default)",
        lambda: operators.hessian_diagonal(model, x, **common),
        repeats,
        lambda r: (
            f"{r.method}; |error| / |diag H| = "
            f"{float((r.values - diagonal.values).norm() / diagonal.values.norm()):.2f}"
        ),
    )
    add(
        "trace, exact",
        lambda: operators.hessian_trace(model, x, exact=True, **common),
        1,
        lambda r: f"{r.method}; tr H = {float(r.values[0]):.6g}",
    )
    add(
        "trace, exact by HVPs on the basis",
        lambda: _hvp_basis("trace", model, x, budget),
        1,
        lambda r: f"{r.method}; tr H = {float(r.values[0]):.6g}",
    )
    add(
        "trace, Hutch++ (default)",
        lambda: operators.hessian_trace(model, x, **common),
        repeats,
        lambda r: (
            f"{r.method}; {float(r.values[0]):.4g} +- {float(r.standard_error[0]):.3g}"
            f" (exact {exact_trace:.4g})"
        ),
    )
    eigen = add(
        "eigen, top 5",
        lambda: operators.hessian_eigen(model, x, k=5, **common),
        repeats,
        lambda r: "lambda = " + ", ".join(f"{float(v):.4g}" for v in r.values[0]),
    )
    reference = _hvp64(model, x)
    values, pairs = eigen.values[0].to(torch.float64), eigen.vectors[0].to(torch.float64)
    top = float(values.abs().max())
    residual = max(
        float((reference(v) - value * v).norm()) / top
        for value, v in zip(values, pairs, strict=True)
    )
    last = rows[-1]
    rows[-1] = Row(
        last.dtype,
        last.operation,
        last.products,
        last.ms,
        f"{last.result}; max residual {residual:.2g} |lambda_1| (converged: {eigen.converged})",
    )
    return rows


def table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| dtype | operation | products | time (ms) | ms / product | result |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        per = row.ms / max(row.products, 1)
        lines.append(
            f"| {row.dtype} | {row.operation} | {row.products} | {row.ms:.1f} | {per:.3f} "
            f"| {row.result} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=list(DTYPES))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--budget-mib", type=int, default=256, help="memory_budget_bytes")
    parser.add_argument("--repeats", type=int, default=5, help="calls timed per short row")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    timing.set_device(device)
    busy = timing.cpu_busy_fraction()
    loaded = load_model(BUNDLED_MODELS_DIR / MODEL, device)
    sample = json.loads((BUNDLED_MODELS_DIR / SAMPLE).read_text())
    x32 = torch.tensor(sample["data"], dtype=torch.float32).reshape(sample["shape"]).to(device)
    n = x32[0].numel()
    print(
        f"{MODEL}: n = {n}, dense Hessian {n * n * 4 / 1e6:.0f} MB (float32), "
        f"{n * n * 8 / 1e6:.0f} MB (float64); batch 1, output {OUTPUT_INDEX}, "
        f"budget {args.budget_mib} MiB, {args.threads} thread(s), {device}; "
        f"CPU busy before start: {busy:.0%}"
    )
    rows: list[Row] = []
    for name in args.dtypes:
        dtype = DTYPES[name]
        model = loaded.module if dtype == torch.float32 else loaded.for_dtype(dtype)
        rows += run_dtype(
            name, model, x32.to(dtype), budget=args.budget_mib * MiB, repeats=args.repeats
        )
    print(table(rows))


if __name__ == "__main__":
    main()
