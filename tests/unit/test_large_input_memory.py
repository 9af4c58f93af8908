"""The 3x64x64 bundled model (n = 12,288: a 604 MB dense float32 Hessian) is served
matrix-free within a 256 MiB budget: HVPs, the exact diagonal, the exact and the
estimated trace and the top-5 eigenpairs, each in a fresh process.

What is measured (as in ``test_memory_budget.py``): the peak resident set (VmHWM) of a
fresh Python process over its resident size just before the call. The process imports
torch and the engine, loads ``photo_digits_cnn`` with ``registry.load_model`` (checks,
warm-up forward pass and the capability probe, as the service does; its own peak over
the RSS after imports is ``load_extra``), runs one one-vector HVP as a warm-up (torch's
lazy set-up), then resets VmHWM to the current RSS (``/proc/self/clear_refs`` 5) and
runs the operation with ``memory_budget_bytes=256 MiB``. ``extra`` = VmHWM after the
call minus VmRSS at the reset: the call's working memory and its result, nothing that
other tests or the imports touched. glibc runs with its defaults (large blocks are
``mmap``-ed and returned on free, ``MALLOC_ARENA_MAX=1``), so freed pages do not
linger, and torch with one thread (its per-thread scratch is then counted once).

Each answer is checked against float64 references from ``torch.autograd`` (reverse over
reverse, a different AD path from the operators' forward over reverse) on a float64 copy
of the model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from functools import cache

import pytest

MiB = 1 << 20
BUDGET = 256 * MiB
N = 3 * 64 * 64
SCRIPT = textwrap.dedent(
    """
    import copy, json, sys
    import torch
    torch.set_num_threads(1)
    from hessian_service.config import BUNDLED_MODELS_DIR
    from hessian_service.engine import operators
    from hessian_service.repository.registry import load_model

    operation, budget = sys.argv[1], int(sys.argv[2])

    def status(field):
        with open("/proc/self/status") as lines:
            for line in lines:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the peak (VmHWM) to the current resident size
        return status("VmRSS")

    base = reset_peak()
    loaded = load_model(BUNDLED_MODELS_DIR / "photo_digits_cnn", torch.device("cpu"))
    load_extra = status("VmHWM") - base
    model = loaded.module
    sample = json.loads((BUNDLED_MODELS_DIR / "photo_digits_sample.json").read_text())
    x = torch.tensor(sample["data"], dtype=torch.float32).reshape(sample["shape"])
    vectors = torch.randn(1, 16, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    operators.hessian_vector_products(
        model, x, vectors[:, :1], output_index=2, memory_budget_bytes=budget
    )  # warm-up
    runs = {
        "hvp": lambda: operators.hessian_vector_products(
            model, x, vectors, output_index=2, memory_budget_bytes=budget),
        "diagonal": lambda: operators.hessian_diagonal(
            model, x, output_index=2, exact=True, memory_budget_bytes=budget),
        "trace": lambda: operators.hessian_trace(
            model, x, output_index=2, exact=True, memory_budget_bytes=budget),
        "trace_estimate": lambda: operators.hessian_trace(
            model, x, output_index=2, memory_budget_bytes=budget),
        "eigen": lambda: operators.hessian_eigen(
            model, x, k=5, output_index=2, memory_budget_bytes=budget),
    }
    base = reset_peak()
    result = runs[operation]()
    extra = status("VmHWM") - base

    # References in float64, by torch.autograd's double backward (after the measurement).
    model64 = copy.deepcopy(model).to(torch.float64)
    x64 = x[0].to(torch.float64)
    def hvp64(v):
        scalar = lambda s: model64(s.unsqueeze(0))[0, 2]
        return torch.autograd.functional.hvp(scalar, x64, v.to(torch.float64))[1]
    report = {"n": x[0].numel(), "load_extra": load_extra, "extra": extra,
              "products": result.products}
    if operation == "hvp":
        got = result.values[0].to(torch.float64)
        want = torch.stack([hvp64(v) for v in vectors[0]])
        errors = (got - want).flatten(1).norm(dim=1) / want.flatten(1).norm(dim=1)
        report["max_relative_error"] = float(errors.max())
    if operation == "diagonal":
        values = result.values[0].flatten().to(torch.float64)
        picked = torch.randperm(values.numel(), generator=torch.Generator().manual_seed(1))[:24]
        basis = torch.zeros(values.numel(), dtype=torch.float64)
        want = []
        for i in picked.tolist():
            basis.zero_()[i] = 1.0
            want.append(float(hvp64(basis.reshape(x64.shape)).flatten()[i]))
        got = values[picked]
        scale = float(values.abs().max())
        report |= {"exact": result.exact, "sum": float(values.sum()), "scale": scale,
                   "max_entry_error": float((got - torch.tensor(want)).abs().max()) / scale,
                   "method": result.method}
    if operation in ("trace", "trace_estimate"):
        error = result.standard_error
        report |= {"value": float(result.values[0]), "exact": result.exact,
                   "standard_error": None if error is None else float(error[0]),
                   "method": result.method}
    if operation == "eigen":
        values = result.values[0].to(torch.float64)
        pairs = result.vectors[0].to(torch.float64)
        products = torch.stack([hvp64(v) for v in pairs])
        flat, hflat = pairs.flatten(1), products.flatten(1)
        top = float(values.abs().max())
        residuals = (hflat - values[:, None] * flat).norm(dim=1) / top
        rayleigh = (flat * hflat).sum(1)
        gram = flat @ flat.T
        report |= {
            "values": values.tolist(),
            "max_residual": float(residuals.max()),
            "reported_residuals": (result.residuals[0] / top).tolist(),
            "max_rayleigh_error": float(((rayleigh - values).abs() / top).max()),
            "orthonormality": float((gram - torch.eye(len(values), dtype=gram.dtype)).abs().max()),
            "converged": result.converged,
        }
    print(json.dumps(report))
    """
)


@cache
def measure(operation: str) -> dict[str, object]:
    """Run ``operation`` on ``photo_digits_cnn`` in a fresh process; its JSON report."""
    env = {"PATH": "", "MALLOC_ARENA_MAX": "1"}  # plain glibc: freed pages go back
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT, operation, str(BUDGET)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report: dict[str, object] = json.loads(completed.stdout.strip().splitlines()[-1])
    return report


def _within_budget(report: dict[str, object]) -> None:
    assert report["n"] == N  # a dense float32 Hessian would be N * N * 4 = 604 MB
    extra, load_extra = report["extra"], report["load_extra"]
    assert isinstance(extra, int) and isinstance(load_extra, int)
    assert extra < BUDGET, report
    # Loading and probing the model never forms its 12,288 x 12,288 Hessian.
    assert load_extra < BUDGET, report


@pytest.mark.slow
def test_hvp_of_16_vectors_within_the_budget() -> None:
    report = measure("hvp")
    _within_budget(report)
    assert report["products"] == 16
    assert report["max_relative_error"] < 1e-4, report  # float32 against float64


@pytest.mark.slow
def test_exact_diagonal_within_the_budget() -> None:
    report = measure("diagonal")
    _within_budget(report)
    # The graph engine's forward-Laplacian pass where it runs (this model), else 12,288
    # HVPs on basis vectors; either counts n products.
    assert report["method"] in ("forward-laplacian", "hvp-basis"), report
    assert report["exact"] is True and report["products"] == N
    assert report["max_entry_error"] < 1e-4, report


@pytest.mark.slow
def test_exact_trace_within_the_budget_is_the_diagonal_sum() -> None:
    report = measure("trace")
    _within_budget(report)
    assert report["exact"] is True and report["standard_error"] is None
    exact = measure("diagonal")["sum"]
    value = report["value"]
    assert isinstance(exact, float) and isinstance(value, float)
    assert abs(value - exact) <= 1e-5 * abs(exact), (value, exact)


@pytest.mark.slow
def test_estimated_trace_within_the_budget_agrees_with_the_exact_diagonal() -> None:
    report = measure("trace_estimate")
    _within_budget(report)
    # Past the automatic exact limit the trace is Hutch++'s estimate: 64 products.
    assert report["exact"] is False and report["method"] == "hutch++"
    assert report["products"] == 64
    exact = measure("diagonal")["sum"]
    assert isinstance(exact, float)
    value, error = report["value"], report["standard_error"]
    assert isinstance(value, float) and isinstance(error, float)
    assert error > 0 and abs(value - exact) <= 4 * error, (value, exact, error)


@pytest.mark.slow
def test_top_5_eigenpairs_within_the_budget() -> None:
    report = measure("eigen")
    _within_budget(report)
    values = report["values"]
    assert isinstance(values, list) and len(values) == 5
    assert values == sorted(values, reverse=True)
    assert report["converged"] is True
    assert report["max_residual"] < 1e-3, report  # ||H v - lambda v|| / |lambda_1|
    assert report["max_rayleigh_error"] < 1e-4, report
    assert report["orthonormality"] < 1e-4, report
    reported = report["reported_residuals"]
    assert isinstance(reported, list) and max(reported) < 1e-3, report
