"""The peer table of ``make bench`` (issue 19): our engine against the tools a user would
pick instead, on the same weights, in the same run, float32, on ``threads`` CPUs.

Each row (bench/families.py) times, interleaved in rounds (bench/timing.py), our
``engine.compute_hessian`` / ``compute_jacobian`` with ``method="auto"`` (the path it took
is reported), the row loop of ``autograd.grad`` calls, ``torch.func.hessian`` (``vmap`` of it
for a batch), ``torch.compile`` of that (its compile time apart), and JAX: ``jax.jit`` of
``jax.hessian``, ``jax.jacfwd(jax.jacrev)`` and ``jax.jacrev(jax.jacrev)``, on the torch
model ported to JAX with the same weights (its forward checked against torch's first). The
best JAX variant is the row's JAX figure. Every ratio is ``peer time / our time``: above 1
we are faster. A peer that fails (a compile error, an op JAX cannot port) is named in the
row with its error, never fatal.
"""

from __future__ import annotations

import functools
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bench import jax_peers, torch_peers
from bench.families import BenchRow
from bench.timing import Measured, measure_all
from hessian_service import engine
from hessian_service.engine import Objective, ObjectiveKind

# Errors are checked on this many leading samples of a batch, against float64 torch.func.
REFERENCE_SAMPLES = 4
OURS = "ours"
TORCH_COMPILE = "torch.compile"
# --quick compiles with torch.compile only on these families' rows (where issue 19 names it
# as the peer to beat); a compile takes 10-80 s on the 2-core machine.
QUICK_COMPILE = ("residual", "layernorm")


@dataclass
class RowResult:
    """Everything measured on one row."""

    row: BenchRow
    method: str = "failed"
    measured: dict[str, Measured] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    compile_s: dict[str, float] = field(default_factory=dict)
    jax_port_error: float | None = None
    seconds: float = 0.0

    def ratio(self, peer: str) -> float:
        return self.measured[peer].ms / self.measured[OURS].ms

    @property
    def peers(self) -> list[str]:
        return [name for name in self.measured if name != OURS]

    @property
    def jax_peers(self) -> list[str]:
        return [name for name in self.peers if name.startswith("jax.")]

    def best(self, names: list[str]) -> str | None:
        return min(names, key=lambda name: self.measured[name].ms, default=None)


def ours(model: nn.Module, row: BenchRow, x: torch.Tensor) -> tuple[Callable[[], Any], str]:
    """Our engine's call for the row (``method="auto"``), and the path it takes."""
    if row.kind == "jacobian":

        def call() -> engine.DerivativeResult:
            return engine.compute_jacobian(model, x)

    elif row.kind == "trace":
        return _ours_trace(model, row, x)

    else:
        objective = (
            Objective(kind=ObjectiveKind(row.objective), target=torch.tensor(row.target))
            if row.objective is not None
            else None
        )
        index = row.output_index if objective is None else None

        def call() -> engine.DerivativeResult:
            return engine.compute_hessian(model, x, output_index=index, objective=objective)

    method = str(call().method)
    return (lambda: call().matrix), method


COMPILE_WAIT_S = 300.0  # ours' background compile of the trace row's pass, at most


def _ours_trace(model: nn.Module, row: BenchRow, x: torch.Tensor) -> tuple[Callable[[], Any], str]:
    """``POST /hessian/trace``'s engine call: the exact trace (``exact=True``), with the
    service's default ``HESSIAN_COMPILE_AFTER``: a shape asked for that often is compiled
    in the background. The row is timed after that compile finished (its seconds are
    printed), as a training loop that asks for the same shape sees it."""
    from hessian_service.config import Settings
    from hessian_service.engine.api import graph_plan_for
    from hessian_service.engine.graph import compiled
    from hessian_service.engine.graph.plan import GraphPlan
    from hessian_service.engine.operators import hessian_trace

    after = Settings().compile_after

    def call() -> Any:
        return hessian_trace(
            model, x, output_index=row.output_index, exact=True, compile_after=after
        )

    method = str(call().method)
    started = time.perf_counter()
    for _ in range(max(0, after - 1)):
        call()
    plan = graph_plan_for(model, x, output_index=row.output_index)
    entry = compiled.state(plan, x, True) if isinstance(plan, GraphPlan) else None
    if entry is not None and entry.done.wait(COMPILE_WAIT_S):
        state = entry.state if entry.error is None else f"{entry.state}: {entry.error}"
        print(f"  ours' compiled pass: {state} after {time.perf_counter() - started:.1f} s")
        method += " (compiled)" if entry.state == "compiled" else " (eager)"
    return (lambda: call().values), method


def run_row(row: BenchRow, *, quick: bool, with_jax: bool) -> RowResult:
    """Build the row's model and input, check every method against float64 torch.func,
    then time them all interleaved."""
    started = time.perf_counter()
    result = RowResult(row)
    model = row.build()
    torch.manual_seed(1)
    x = torch.rand(row.batch, *row.sample_shape)
    reference = torch_peers.reference(model, row, x, REFERENCE_SAMPLES)
    methods: dict[str, Callable[[], Any]] = {}
    try:
        methods[OURS], result.method = ours(model, row, x)
    except Exception as error:
        result.failed[OURS] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    methods.update(torch_peers.methods(model, row, x, row_loop=not quick))
    if quick:
        result.skipped[torch_peers.ROW_LOOP] = "--quick (never the best peer)"
    if quick and row.family not in QUICK_COMPILE:
        name = f"{TORCH_COMPILE}({torch_peers.func_name(row, transform_name(row))})"
        result.skipped[name] = f"--quick (compiled on the {', '.join(QUICK_COMPILE)} rows only)"
    else:
        for compiled in torch_peers.compiled_transforms(model, row, x):
            result.compile_s[compiled.name] = compiled.compile_s
            if compiled.method is None:
                result.failed[compiled.name] = compiled.error or "failed"
            else:
                methods[compiled.name] = compiled.method
    if with_jax:
        try:
            peers, result.jax_port_error = jax_peers.peers(row, model, x)
        except Exception as error:
            result.failed["jax"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            peers = []
        for peer in peers:
            result.compile_s[peer.name] = peer.compile_s
            if peer.method is None:
                result.failed[peer.name] = peer.error or "failed"
            else:
                methods[peer.name] = peer.method
    repeats, budget = (5, 1.0) if quick else (7, 2.0)
    result.measured = measure_all(
        methods, reference, repeats=repeats, budget_s=budget, failed=result.failed
    )
    if OURS not in result.measured:  # no ratios without our time
        result.measured = {}
    result.seconds = time.perf_counter() - started
    del model, x, methods
    torch._dynamo.reset()
    gc.collect()
    return result


transform_name = torch_peers.transform_name


def ratios(result: RowResult) -> dict[str, Any]:
    """The row's entries of the final JSON line, under ``peers/<kind>/<name>/B<batch>/``."""
    prefix = f"peers/{result.row.key}/"
    out: dict[str, Any] = {prefix + "method": result.method}
    for name, message in result.failed.items():
        out[prefix + f"{name} failed"] = message
    for name, reason in result.skipped.items():
        out[prefix + f"{name} skipped"] = reason
    for name, seconds in result.compile_s.items():
        if name not in result.failed:
            out[prefix + f"{name} compile_s"] = round(seconds, 2)
    if result.jax_port_error is not None:
        out[prefix + "jax_port_max_error"] = float(f"{result.jax_port_error:.2e}")
    if not result.measured:
        return out
    out[prefix + "ours_ms"] = round(result.measured[OURS].ms, 4)
    out[prefix + "ours_max_abs_error"] = float(f"{result.measured[OURS].error:.2e}")
    for name in result.peers:
        out[prefix + f"vs {name}"] = round(result.ratio(name), 2)
    best_jax = result.best(result.jax_peers)
    if best_jax is not None:
        out[prefix + "best_jax"] = best_jax
        out[prefix + "vs jax"] = round(result.ratio(best_jax), 2)
    best = result.best(result.peers)
    if best is not None:
        out[prefix + "best_peer"] = best
        out[prefix + "vs_best_peer"] = round(result.ratio(best), 2)
    return out


def peer_rows(
    rows: tuple[BenchRow, ...], *, quick: bool, threads: int
) -> tuple[list[RowResult], dict[str, Any]]:
    """Run every row; the results and the JSON entries (with the thread settings)."""
    jax_setup = jax_peers.setup(threads)
    cache = torch_peers.inductor_cache()
    print(
        f"# peers: torch {torch.get_num_threads()} threads; {jax_setup.note}; "
        f"torch.compile cache {cache}",
        flush=True,
    )
    json: dict[str, Any] = {
        "peers/threads": threads,
        "peers/jax": jax_setup.note,
        "peers/torch.compile cache": cache,
    }
    results = []
    for row in rows:
        result = run_row(row, quick=quick, with_jax=jax_setup.available)
        results.append(result)
        json.update(ratios(result))
        summary = ", ".join(
            f"{name} {result.ratio(name):.2f}x" for name in result.peers if result.measured
        )
        print(
            f"  {result.row.key}: {result.method}, ours "
            + (f"{result.measured[OURS].ms:.3f} ms" if result.measured else "failed")
            + f" ({result.seconds:.0f} s); {summary}",
            flush=True,
        )
    return results, json


def table(results: list[RowResult]) -> str:
    """Markdown: one line per row and method (time per call, ratio, error, peak), then
    the failures and compile times."""
    lines = [
        "| row | method | ms per call | ours is x faster | max abs error | peak MB | compile s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        key = result.row.key
        for name, measured in result.measured.items():
            label = f"ours ({result.method})" if name == OURS else name
            compile_s = result.compile_s.get(name)
            lines.append(
                f"| {key} | {label} | {measured.ms:.3f} | {result.ratio(name):.2f} | "
                f"{measured.error:.1e} | {measured.peak_mb:.0f} | "
                + (f"{compile_s:.1f}" if compile_s is not None else "")
                + " |"
            )
        for name, message in result.failed.items():
            lines.append(f"| {key} | {name} | failed: {message} | | | | |")
        for name, reason in result.skipped.items():
            lines.append(f"| {key} | {name} | skipped: {reason} | | | | |")
    return "\n".join(lines)


def _ratio_cell(result: RowResult, name: str | None) -> str:
    return f"{result.ratio(name):.2f}x" if name is not None else "n/a"


def summary(results: list[RowResult]) -> str:
    """Markdown: one line per row with the ratios the issue asks for."""
    lines = [
        "| row | our path | ours ms | best peer | vs best peer | vs torch.func | "
        "vs torch.compile | vs best JAX (variant) | JAX port error |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        if not result.measured:
            lines.append(f"| {result.row.key} | failed | | | | | | | |")
            continue
        func = next((p for p in result.peers if p.startswith(("torch.func", "vmap("))), None)
        compiled = next((p for p in result.peers if p.startswith(TORCH_COMPILE)), None)
        best, best_jax = result.best(result.peers), result.best(result.jax_peers)
        cell = functools.partial(_ratio_cell, result)
        jax_cell = cell(best_jax) + (f" ({best_jax})" if best_jax else "")
        port = result.jax_port_error
        port_cell = f"{port:.0e}" if port is not None else "n/a"
        lines.append(
            f"| {result.row.key} | {result.method} | {result.measured[OURS].ms:.3f} | {best} | "
            f"{cell(best)} | {cell(func)} | {cell(compiled)} | {jax_cell} | {port_cell} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.peer_table [--quick] [--row NAME ...]``: the peer table alone."""
    import argparse
    import json

    from bench.families import rows

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the headline rows, fewer repeats")
    parser.add_argument("--row", action="append", default=[], help="rows whose key has this")
    parser.add_argument("--threads", type=int, default=2, help="CPUs for torch and XLA")
    args = parser.parse_args(argv)
    results, entries = peer_rows(
        rows(quick=args.quick, only=tuple(args.row)), quick=args.quick, threads=args.threads
    )
    print("\n" + summary(results) + "\n\n" + table(results) + "\n")
    print(json.dumps(entries, sort_keys=True))


if __name__ == "__main__":
    main()
