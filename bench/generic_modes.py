"""The generic path's Hessians before and after ``engine.differentiable``, and its cost.

Two measurements, both interleaved calls with medians of wall and CPU time (the CPU time
of this process, which the other jobs on a shared machine move less than the wall time):

- ``before``: ``engine/generic.py`` as it was at the commit ``--before`` (read with
  ``git show``), called the way ``engine.api`` called it: under ``torch.no_grad()``,
  forward-over-reverse, and on ``NotImplementedError`` (SiLU's and Mish's backward have
  no forward-mode rule there) reverse-over-reverse; ``after``: today's ``generic.hessian``
  under the same ``torch.no_grad()``, which turns grad mode on inside.
- ``modes``: today's ``generic.hessian`` with ``derivative_mode`` as it is, without its
  ``TorchFunctionMode`` (the recurrent-op replacement) and with the Python dispatcher
  added (``decomposed_mode``, the retry's cost).

Run: ``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=1000000000000
.venv/bin/python -m bench.generic_modes --before 95a9b3b --threads 1``
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import replace

import torch
from torch import nn
from torch._dispatch.python import enable_python_dispatcher
from torch.jit._fuser import optimized_execution
from torch.nn.attention import SDPBackend, sdpa_kernel

from hessian_service.engine import differentiable, generic
from hessian_service.engine.methods import Algorithm
from hessian_service.engine.planner import Plan, plan_hessian

Scalars = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _mlp(activation: type[nn.Module]) -> nn.Module:
    """784-256-256-10, the bundled ``mlp_tanh`` shape, with ``activation``."""
    layers = [nn.Linear(784, 256), activation(), nn.Linear(256, 256), activation()]
    return nn.Sequential(*layers, nn.Linear(256, 10))


def _pinn() -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(2, 64), nn.Tanh()]
    for _ in range(2):
        layers += [nn.Linear(64, 64), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(64, 1))


CASES: dict[str, tuple[Callable[[], nn.Module], int, int]] = {
    # name: (model, inputs, batch)
    "mlp_silu": (lambda: _mlp(nn.SiLU), 784, 1),
    "mlp_silu_b8": (lambda: _mlp(nn.SiLU), 784, 8),
    "mlp_mish": (lambda: _mlp(nn.Mish), 784, 1),
    "mlp_tanh": (lambda: _mlp(nn.Tanh), 784, 1),
    "pinn_tanh_b256": (_pinn, 2, 256),
}


def _old_generic(commit: str) -> types.ModuleType:
    source = subprocess.run(
        ["git", "show", f"{commit}:hessian_service/engine/generic.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = types.ModuleType("generic_before")
    exec(compile(source, f"{commit}:hessian_service/engine/generic.py", "exec"), module.__dict__)
    return module


def _timed(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of each call, the calls interleaved, after one warm-up."""
    for call in calls.values():
        call()
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            call()
            wall[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - cpu_started)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in calls}


def _case(name: str) -> tuple[Scalars, torch.Tensor, torch.Tensor, Plan]:
    make, n, batch = CASES[name]
    torch.manual_seed(0)
    model = make().eval().requires_grad_(False)
    x = torch.randn(batch, n)

    def scalars(sample: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = model(sample.unsqueeze(0)).reshape(-1)[:1]
        return out

    plan = plan_hessian(n=n, batch=batch, activation_numel=4 * n + 1024, itemsize=4)
    return scalars, x, torch.zeros(batch), plan


def _before(
    old: types.ModuleType, case: tuple[Scalars, torch.Tensor, torch.Tensor, Plan], taken: list[str]
) -> Callable[[], torch.Tensor]:
    """The old generic.hessian as engine.api called it; appends what ran to ``taken``."""
    scalars, x, targets, plan = case

    def call() -> torch.Tensor:
        with torch.no_grad():
            try:
                result: torch.Tensor = old.hessian(scalars, x, targets, plan)
                taken.append("forward-over-reverse")
            except NotImplementedError:
                ror = replace(plan, method=Algorithm.REVERSE_OVER_REVERSE)
                result = old.hessian(scalars, x, targets, ror)
                taken.append("failed forward-over-reverse, then reverse-over-reverse")
        return result

    return call


def _after(
    case: tuple[Scalars, torch.Tensor, torch.Tensor, Plan],
    mode: Callable[[], contextlib.AbstractContextManager[None]] | None = None,
) -> Callable[[], torch.Tensor]:
    """Today's generic.hessian under torch.no_grad(); with ``mode`` in place of
    derivative_mode (run_differentiable's first attempt) when given."""
    scalars, x, targets, plan = case

    def call() -> torch.Tensor:
        real = differentiable.derivative_mode
        if mode is not None:
            differentiable.derivative_mode = mode  # type: ignore[assignment]
        try:
            with torch.no_grad():
                return generic.hessian(scalars, x, targets, plan)
        finally:
            differentiable.derivative_mode = real

    return call


def before_after(commit: str, repeats: int) -> None:
    old = _old_generic(commit)
    for name in CASES:
        case = _case(name)
        taken: list[str] = []
        before, after = _before(old, case, taken), _after(case)
        difference = float((before() - after()).abs().max() / after().abs().max())
        times = _timed({"before": before, "after": after}, repeats)
        (wall_b, cpu_b), (wall_a, cpu_a) = times["before"], times["after"]
        print(
            f"{name}: before ({taken[-1]}) {wall_b * 1e3:.1f} ms wall, "
            f"{cpu_b * 1e3:.1f} ms CPU; after (forward-over-reverse) {wall_a * 1e3:.1f} ms "
            f"wall, {cpu_a * 1e3:.1f} ms CPU; before/after {wall_b / wall_a:.2f}x wall, "
            f"{cpu_b / cpu_a:.2f}x CPU; max relative difference {difference:.1e}"
        )


_REAL_MODE = differentiable.derivative_mode


@contextlib.contextmanager
def _without_function_mode() -> Iterator[None]:
    with (
        torch.enable_grad(),
        sdpa_kernel(SDPBackend.MATH),
        optimized_execution(False),
    ):
        yield


@contextlib.contextmanager
def _with_python_dispatcher() -> Iterator[None]:  # decomposed_mode, unpatched
    with _REAL_MODE(), enable_python_dispatcher():
        yield


def modes(repeats: int) -> None:
    for name in ("mlp_tanh", "pinn_tanh_b256"):
        case = _case(name)
        calls: dict[str, Callable[[], object]] = {
            "derivative_mode": _after(case),
            "without its TorchFunctionMode": _after(case, _without_function_mode),
            "with the Python dispatcher": _after(case, _with_python_dispatcher),
        }
        times = _timed(calls, repeats)
        base = times["derivative_mode"][1]
        print(
            f"{name}: "
            + "; ".join(
                f"{label} {cpu * 1e3:.2f} ms CPU ({cpu / base:.2f}x)"
                for label, (_wall, cpu) in times.items()
            )
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="commit whose generic.py is 'before'")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32")
    before_after(args.before, args.repeats)
    modes(args.repeats)


if __name__ == "__main__":
    main(sys.argv[1:])
