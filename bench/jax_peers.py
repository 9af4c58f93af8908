"""The JAX peers of a benchmark row: ``jax.jit`` of ``jax.hessian``, of
``jax.jacfwd(jax.jacrev)`` and of ``jax.jacrev(jax.jacrev)`` (``jax.vmap`` of each for a
batch; ``jax.jacrev`` and ``jax.jacfwd`` for a Jacobian row), on the row's torch model
ported with its weights (bench/jax_models.py).

JAX is optional (the ``bench`` extra): ``setup`` says whether it can be imported and
fixes its settings before the first import (float32: ``jax_enable_x64`` off; the thread
count, below); without it the rows have no JAX columns and say why.

Threads: XLA's CPU client sizes its intra-op thread pool from the process's CPU affinity
(there is no XLA_FLAGS setting for it: ``intra_op_parallelism_threads=N`` in XLA_FLAGS is
not a flag and is ignored, and ``--xla_cpu_multi_thread_eigen=false`` would make XLA's
matrix products single-threaded while torch's use two). So the benchmark pins the whole
process, torch included, to ``threads`` CPUs with ``os.sched_setaffinity`` before JAX
starts, and sets ``torch.set_num_threads(threads)``: both libraries get the same CPUs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench.families import BenchRow


@dataclass(frozen=True)
class JaxSetup:
    """Whether the JAX peers run, and the thread and precision settings they ran with."""

    available: bool
    note: str


def setup(threads: int) -> JaxSetup:
    """Pin the process to ``threads`` CPUs and configure JAX (before it is imported)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > threads:
        os.sched_setaffinity(0, cpus[:threads])
    pinned = sorted(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    try:
        import jax
    except ImportError:
        return JaxSetup(False, "jax is not installed (pip install -e '.[bench]')")
    update: Callable[[str, object], None] = jax.config.update  # untyped in jax's stubs
    update("jax_enable_x64", False)
    flags = os.environ.get("XLA_FLAGS", "unset")
    note = (
        f"jax {jax.__version__} on {jax.devices()[0].platform}, float32, XLA's thread pool "
        f"sized by the CPU affinity {pinned} ({len(pinned)} CPUs), XLA_FLAGS={flags}"
    )
    return JaxSetup(True, note)


@dataclass
class JaxPeer:
    """One jitted JAX variant, compiled (first call timed apart) and ready to time."""

    name: str
    method: Callable[[], Any] | None
    compile_s: float
    error: str | None


def _variants(row: BenchRow) -> dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]]:
    """The derivative transforms to jit for the row, by name, over ``argnums=1`` (x)."""
    import jax

    if row.kind == "jacobian":
        return {
            "jax.jacrev": lambda f: jax.jacrev(f, argnums=1),
            "jax.jacfwd": lambda f: jax.jacfwd(f, argnums=1),
        }
    if row.kind == "trace":
        import jax.numpy as jnp

        def traced(transform: Callable[..., Any]) -> Callable[..., Any]:
            return lambda *args: jnp.trace(transform(*args))

        return {
            "trace(jax.hessian)": lambda f: traced(jax.hessian(f, argnums=1)),
            "trace(jax.jacfwd(jax.jacrev))": lambda f: traced(
                jax.jacfwd(jax.jacrev(f, argnums=1), argnums=1)
            ),
        }
    return {
        "jax.hessian": lambda f: jax.hessian(f, argnums=1),
        "jax.jacfwd(jax.jacrev)": lambda f: jax.jacfwd(jax.jacrev(f, argnums=1), argnums=1),
        "jax.jacrev(jax.jacrev)": lambda f: jax.jacrev(jax.jacrev(f, argnums=1), argnums=1),
    }


def peers(row: BenchRow, model: torch.nn.Module, x: torch.Tensor) -> tuple[list[JaxPeer], float]:
    """The row's JAX peers and the port's forward error (relative to the output's scale).

    Raises ``bench.jax_models.UnsupportedNode`` when the model cannot be ported, and
    ``ValueError`` when the port's forward differs from torch's by more than 1e-5: no
    JAX figure is better than a figure of another function.
    """
    import jax
    import jax.numpy as jnp

    from bench.jax_models import forward_error, port

    ported = port(model)
    error = forward_error(ported, model, x[: min(x.shape[0], 64)])
    if not error <= 1e-5:
        raise ValueError(f"the JAX port's forward differs from torch's by {error:.1e}")
    forward = ported.forward

    def outputs(params: Any, sample: jax.Array) -> jax.Array:
        return forward(params, sample[None]).reshape(-1)

    def scalar(params: Any, sample: jax.Array) -> jax.Array:
        flat = outputs(params, sample)
        if row.objective == "cross_entropy":
            return -jax.nn.log_softmax(flat)[row.target]
        return flat[row.output_index]

    function = outputs if row.kind == "jacobian" else scalar
    xs = jnp.asarray(x.numpy()) if row.batch > 1 else jnp.asarray(x[0].numpy())
    result = []
    for name, transform in _variants(row).items():
        derivative = transform(function)
        if row.batch > 1:
            derivative = jax.vmap(derivative, in_axes=(None, 0))
            name = f"jax.vmap({name})"
        jitted = jax.jit(derivative)
        label = f"jax.jit({name})"
        start = time.perf_counter()
        try:
            jitted(ported.params, xs).block_until_ready()
        except Exception as failure:
            message = f"{type(failure).__name__}: {str(failure).splitlines()[0][:200]}"
            result.append(JaxPeer(label, None, time.perf_counter() - start, message))
            continue
        compile_s = time.perf_counter() - start

        def call(jitted: Any = jitted) -> Any:
            return jitted(ported.params, xs).block_until_ready()

        result.append(JaxPeer(label, call, compile_s, None))
    return result, error
