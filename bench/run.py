"""Benchmark: our engine against the usual ways to get input Hessians and Jacobians.

Everything is measured in ONE run, on this machine, in four parts:

- ``peers`` (bench/peer_table.py): issue 19's table, float32 on ``--threads`` CPUs (2):
  each row's model through our engine (``method="auto"``) against the row loop,
  ``torch.func.hessian`` (vmapped for a batch), ``torch.compile`` of it and ``jax.jit`` of
  ``jax.hessian`` / ``jacfwd(jacrev)`` / ``jacrev(jacrev)`` on the same weights, with
  ``best_peer`` and ``vs_best_peer`` per row;
- ``engine``: the bundled models and a wider CNN in float32 and float64, one sample and a
  batch of 32, against ``vmap(torch.func.hessian)``, with the max abs error against a
  float64 reference, the peak memory a call adds (RSS sampled every millisecond) and the
  engine's achieved GFLOP/s (FLOPs counted by ``torch.utils.flop_counter``) against the
  matmul peak measured in the same run;
- ``jacobian``: Jacobians of the bundled models against ``vmap(jacrev)`` and the row loop;
- ``http``: one /hessian request through a real uvicorn server on 127.0.0.1, in JSON and
  in base64, against the engine alone.

Times are medians over interleaved rounds (bench/timing.py). The last line printed is one
JSON object with every figure.

Run: ``make bench`` (``make bench-quick``: the peer table's headline rows), or
``python -m bench.run [--quick] [--parts peers,engine] [--rows pinn]``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import hessian as func_hessian
from torch.func import jacrev, vmap
from torch.utils.flop_counter import FlopCounterMode

from bench import families, jax_peers, peer_table, targets, timing
from bench.models import bundled
from bench.timing import Measured, measure_all, median_ms
from hessian_service import engine

OUTPUT_INDEX = 2
DEVICE = torch.device("cpu")  # set by --device


def device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    return f"CPU {platform.machine()} ({os.cpu_count()} cores)"


# Errors are checked on this many leading samples of a batch (a float64 reference for
# 32 wide Hessians would take minutes and gigabytes).
REFERENCE_SAMPLES = 4


def wide_cnn() -> nn.Module:
    """A wider CNN on 3x32x32 (n = 3072), seeded weights."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(32 * 16 * 16, 10),
    )
    return model.eval().requires_grad_(False)


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp_tanh": (lambda: bundled("mlp_tanh"), (1, 28, 28)),
    "digits_cnn": (lambda: bundled("digits_cnn"), (1, 28, 28)),
    "wide_cnn": (wide_cnn, (3, 32, 32)),
}


PEAK_SIZE_CPU, PEAK_SIZE_CUDA = 1024, 4096


def _peak_operands(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    size = PEAK_SIZE_CUDA if DEVICE.type == "cuda" else PEAK_SIZE_CPU
    a = torch.randn(size, size, dtype=dtype, device=DEVICE)
    return a, torch.randn(size, size, dtype=dtype, device=DEVICE)


def _square_gflops(a: torch.Tensor, b: torch.Tensor, repeats: int, budget_s: float) -> float:
    """GFLOP/s of ``a @ b`` for square operands, from its median time."""
    ms = median_ms(lambda: a @ b, repeats=repeats, budget_s=budget_s)
    return 2 * a.shape[0] ** 3 / (ms / 1000) / 1e9


def matmul_peak_gflops(dtype: torch.dtype) -> float:
    """GFLOP/s of one square matmul large enough to run at this machine's peak."""
    a, b = _peak_operands(dtype)
    return _square_gflops(a, b, repeats=15, budget_s=5)


def scalar_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda sample: model(sample.unsqueeze(0)).reshape(-1)[OUTPUT_INDEX]


def row_loop_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The classic answer for Jacobians: one autograd.grad call per output, per sample."""
    result = []
    for sample in x:
        at = sample.detach().requires_grad_(True)
        with torch.enable_grad():
            out = model(at.unsqueeze(0)).reshape(-1)
            result.append(
                torch.stack(
                    [
                        torch.autograd.grad(out[i], at, retain_graph=True)[0].reshape(-1)
                        for i in range(out.numel())
                    ]
                )
            )
    return torch.stack(result)


def tabulate(
    kind: str, key: str, results: dict[str, Measured], batch: int
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Table rows (time per matrix, ratio to ours) and the JSON ratios of one case."""
    rows, ratios = [], {}
    for label, measured in results.items():
        ratio = measured.ms / results["ours"].ms
        rows.append(
            {
                "case": key,
                "method": label,
                f"ms_per_{kind}": measured.ms / batch,
                "ratio": ratio,
                "max_abs_error": measured.error,
                "peak_mb": measured.peak_mb,
            }
        )
        if label != "ours":
            ratios[f"{kind}/{key}/vs {label.split(' chunk=')[0]}"] = round(ratio, 2)
    return rows, ratios


def hessian_methods(model: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """Ours against ``torch.func.hessian`` (vmapped over the batch; chunked when a whole
    batch of n x n Hessians would not fit). The row loop, torch.compile and JAX are in the
    peer table (bench/peer_table.py), on the float32 single-sample rows."""
    f = scalar_fn(model)
    vmap_chunk = None if x[0].numel() <= 1024 else 1
    return {
        "ours": lambda: engine.hessian(model, x, output_index=OUTPUT_INDEX),
        "torch.func.hessian": lambda: vmap(func_hessian(f), chunk_size=vmap_chunk)(x),
    }


def hessian_case(
    name: str,
    base: nn.Module,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    batch: int,
    quick: bool,
    peak: float,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    repeats, budget = (3, 2.0) if quick else (7, 2.0)
    model = copy.deepcopy(base).to(dtype=dtype, device=DEVICE)
    reference_model = copy.deepcopy(base).double()
    torch.manual_seed(1)
    x = torch.rand(batch, *shape, dtype=dtype).to(DEVICE)
    n = x[0].numel()
    reference = torch.stack(  # float64, sample by sample, on the first REFERENCE_SAMPLES
        [
            func_hessian(scalar_fn(reference_model))(sample).reshape(n, n)
            for sample in x[:REFERENCE_SAMPLES].double().cpu()
        ]
    )
    results = measure_all(hessian_methods(model, x), reference, repeats=repeats, budget_s=budget)
    ours = results["ours"]
    with FlopCounterMode(display=False) as counter:
        engine.hessian(model, x, output_index=OUTPUT_INDEX)
    gflops = counter.get_total_flops() / (ours.ms / 1000) / 1e9
    key = f"{name}/{str(dtype)[6:]}/B{batch}"
    rows, ratios = tabulate("hessian", key, results, batch)
    ratios[f"hessian/{key}/ours_ms"] = round(ours.ms, 3)
    ratios[f"hessian/{key}/ours_fraction_of_matmul_peak"] = round(gflops / peak, 3)
    matmuls = (
        matmuls_fraction_of_peak(lambda: engine.hessian(model, x, output_index=OUTPUT_INDEX), dtype)
        if name in PROFILED
        else None
    )
    if matmuls is not None:
        ratios[f"hessian/{key}/ours_matmuls_fraction_of_matmul_peak"] = round(matmuls[1], 3)
    print(
        f"  {key}: ours {ours.ms:.2f} ms, {gflops:.1f} GFLOP/s over the whole call"
        + (f", {matmuls[0]:.1f} GFLOP/s in its matmuls" if matmuls is not None else ""),
        flush=True,
    )
    return rows, ratios


MATMUL_OPS = ("mm", "bmm", "addmm", "baddbmm")


def matmuls_fraction_of_peak(
    fn: Callable[[], object], dtype: torch.dtype, rounds: int = 5
) -> tuple[float, float] | None:
    """GFLOP/s inside the call's matrix products alone, and that as a fraction of the
    matmul peak: their flops (FlopCounterMode) over the time the profiler records in
    them, on the CPU, where ops run synchronously (None on a GPU). The whole-call figure
    also charges the elementwise work, the scatters and Python between the products.

    Each round times the peak product right before one profiled call, so both see the
    machine at the same speed (this shared CPU drifts by up to 2x within minutes); the
    medians over the rounds are returned."""
    if DEVICE.type != "cpu":
        return None
    with FlopCounterMode(display=False) as counter:
        fn()
    flops = sum(
        count
        for op, count in counter.get_flop_counts()["Global"].items()
        if str(op).split(".")[1] in MATMUL_OPS
    )
    if not flops:
        return None
    a, b = _peak_operands(dtype)
    names = {f"aten::{op}" for op in MATMUL_OPS}
    achieved, fractions = [], []
    for _ in range(rounds):
        peak = _square_gflops(a, b, repeats=3, budget_s=1)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            fn()
        self_us = sum(
            event.self_cpu_time_total for event in profiler.key_averages() if event.key in names
        )
        if self_us:  # a product too short for the profiler's clock says nothing
            achieved.append(flops / (self_us / 1e6) / 1e9)
            fractions.append(achieved[-1] / peak)
    if not achieved:
        return None
    return statistics.median(achieved), statistics.median(fractions)


# The cases of the engine-against-torch.func part: every model, dtype and batch, except
# wide_cnn's batches (a float64 vmap(torch.func.hessian) of 32 of its 3072x3072 Hessians
# takes 40 s a call; one sample shows its ratio).
CASES: tuple[tuple[str, torch.dtype, int], ...] = tuple(
    (name, dtype, batch)
    for name in MODELS
    for dtype in (torch.float32, torch.float64)
    for batch in (1, 32)
    if not (name == "wide_cnn" and batch > 1)
)
# Models whose matrix products' share of the matmul peak is profiled (the MLP path is
# products; the CNN paths spend their time scattering receptive-field blocks).
PROFILED = ("mlp_tanh",)


def hessian_rows(quick: bool) -> tuple[list[dict[str, Any]], dict[str, float]]:
    rows: list[dict[str, Any]] = []
    ratios: dict[str, float] = {}
    peaks = {dtype: matmul_peak_gflops(dtype) for dtype in (torch.float32, torch.float64)}
    ratios["matmul_peak_gflops_float32"] = round(peaks[torch.float32], 1)
    ratios["matmul_peak_gflops_float64"] = round(peaks[torch.float64], 1)
    for name, (make, shape) in MODELS.items():
        base = make()
        for dtype, batch in ((d, b) for model, d, b in CASES if model == name):
            case_rows, case_ratios = hessian_case(
                name, base, shape, dtype, batch, quick, peaks[dtype]
            )
            rows += case_rows
            ratios.update(case_ratios)
            gc.collect()
    return rows, ratios


def jacobian_methods(model: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    def full(sample: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = model(sample.unsqueeze(0))
        return out.reshape(-1)

    return {
        "ours": lambda: engine.jacobian(model, x),
        "vmap(jacrev)": lambda: vmap(jacrev(full))(x),
        "row loop": lambda: row_loop_jacobian(model, x),
    }


def jacobian_rows(quick: bool) -> tuple[list[dict[str, Any]], dict[str, float]]:
    rows: list[dict[str, Any]] = []
    ratios: dict[str, float] = {}
    repeats, budget = (3, 2.0) if quick else (9, 4.0)
    for name in ("mlp_tanh", "digits_cnn"):
        make, shape = MODELS[name]
        model = make().to(DEVICE)
        reference_model = copy.deepcopy(model).double().cpu()
        for batch in (1, 32):
            torch.manual_seed(2)
            x = torch.rand(batch, *shape).to(DEVICE)
            reference = engine.jacobian(reference_model, x.double().cpu(), method="generic")
            results = measure_all(
                jacobian_methods(model, x), reference, repeats=repeats, budget_s=budget
            )
            key = f"{name}/float32/B{batch}"
            case_rows, case_ratios = tabulate("jacobian", key, results, batch)
            rows += case_rows
            ratios.update(case_ratios)
            print(f"  jacobian {key}: ours {results['ours'].ms:.3f} ms", flush=True)
    return rows, ratios


def http_ratios(quick: bool) -> dict[str, float]:
    """One digits_cnn /hessian through a real uvicorn server, JSON and base64."""
    from bench.server import end_to_end

    return end_to_end(repeats=5 if quick else 15)


def table(rows: list[dict[str, Any]], time_key: str) -> str:
    lines = [
        f"| case | method | {time_key} | ours is x faster | max abs error | peak MB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['case']} | {row['method']} | {row[time_key]:.3f} | {row['ratio']:.1f} | "
            f"{row['max_abs_error']:.1e} | {row['peak_mb']:.0f} |"
        )
    return "\n".join(lines)


PARTS = ("http", "peers", "engine", "jacobian")


def parts(args: argparse.Namespace) -> tuple[str, ...]:
    """The parts to run: ``--parts``, else all on the CPU; ``--quick`` on the CPU is the
    peer table's headline rows alone; on CUDA the peer table (a CPU comparison at a fixed
    thread count, against JAX on the CPU) is left out."""
    if args.parts:
        chosen = tuple(part.strip() for part in args.parts.split(","))
        unknown = sorted(set(chosen) - set(PARTS))
        if unknown:
            raise SystemExit(f"--parts: unknown {unknown}; expected some of {list(PARTS)}")
        return chosen
    if DEVICE.type != "cpu":
        return tuple(part for part in PARTS if part != "peers")
    return ("peers",) if args.quick else PARTS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="the peer table's headline rows, fewer repeats"
    )
    parser.add_argument("--skip-http", action="store_true", help="skip the end-to-end part")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--parts", default="", help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument(
        "--rows", action="append", default=[], help="peer-table rows whose key contains this"
    )
    parser.add_argument("--threads", type=int, default=2, help="CPUs for torch and XLA")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    timing.set_device(DEVICE)
    chosen = tuple(part for part in parts(args) if not (args.skip_http and part == "http"))
    started = time.perf_counter()
    ratios: dict[str, Any] = {
        "load_average_1min_start": round(os.getloadavg()[0], 2),
        "cpu_busy_fraction_start": round(timing.cpu_busy_fraction(), 2),
    }
    # Threads and CPU affinity before the server starts (it inherits them); on CUDA the
    # host keeps its CPUs.
    jax_setup = jax_peers.setup(args.threads) if DEVICE.type == "cpu" else None
    print(
        f"# {device_name()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, MALLOC_MMAP_THRESHOLD_="
        f"{os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')} MALLOC_TRIM_THRESHOLD_="
        f"{os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}; "
        f"{jax_setup.note if jax_setup else 'no JAX peers on ' + str(DEVICE)}; "
        f"load average {ratios['load_average_1min_start']}, CPUs busy "
        f"{ratios['cpu_busy_fraction_start']:.0%} before the start; parts {', '.join(chosen)}",
        flush=True,
    )
    if ratios["cpu_busy_fraction_start"] > 0.1:
        print(
            "# WARNING: other processes are using the CPUs; torch's 2-thread timings "
            "(ours included) suffer several-fold more than JAX's under such load",
            flush=True,
        )
    # The server runs first: the allocator settings keep the pages the big baselines
    # below touch, and a server started after them can find the machine's memory gone.
    if "http" in chosen:
        ratios.update(http_ratios(args.quick))
    peers: list[peer_table.RowResult] = []
    if "peers" in chosen:
        selected = families.rows(quick=args.quick, only=tuple(args.rows))
        peers, peer_ratios = peer_table.peer_rows(selected, quick=args.quick, threads=args.threads)
        ratios.update(peer_ratios)
        ratios.update(targets.summary(targets.check(peers)))
    hessians: list[dict[str, Any]] = []
    if "engine" in chosen:
        hessians, hessian_ratios = hessian_rows(args.quick)
        ratios.update(hessian_ratios)
    jacobians: list[dict[str, Any]] = []
    if "jacobian" in chosen:
        jacobians, jacobian_ratios = jacobian_rows(args.quick)
        ratios.update(jacobian_ratios)
    if peers:
        print("\n## Peers (float32; ratio = peer time / ours: above 1, ours is faster)\n")
        print(peer_table.summary(peers))
        print()
        print(peer_table.table(peers))
        print("\n## Issue 19's speed targets (ratio = peer time / ours)\n")
        print(targets.table(targets.check(peers)))
    if hessians:
        print("\n## Hessians (time per Hessian, ratio = method time / ours)\n")
        print(table(hessians, "ms_per_hessian"))
    if jacobians:
        print("\n## Jacobians (time per Jacobian of all 10 outputs)\n")
        print(table(jacobians, "ms_per_jacobian"))
    print()
    ratios["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    ratios["cpu_busy_fraction_end"] = round(timing.cpu_busy_fraction(), 2)
    ratios["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(ratios, sort_keys=True))


if __name__ == "__main__":
    main()
