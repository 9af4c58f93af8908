"""Hot forward-Laplacian passes, compiled by ``torch.compile`` in the background.

A physics-informed training loop asks for the same Laplacian shape over and over (one
batch of collocation points after another). The eager pass (``laplacian.second_order``)
runs one small kernel per operation and column; fused, the same arithmetic runs in about
half the time (PINN 2-64-64-64-1, 4096 points, one thread: 12 ms against 21-25 ms).

So a pass that was asked for ``compile_after`` times with the same plan, shape, dtype
and device is traced once into a flat graph of aten operations (``make_fx``) and handed
to ``torch.compile`` on a background thread, while the eager pass keeps answering; once
compiled, calls take the compiled graph. A compile that fails (no C compiler in a slim
image, an operator inductor cannot lower) is remembered and never retried: the eager pass
stays, with the same values. Only single-pass calls (every input column at once) are
compiled: their result is one call with no progress to report in between.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from hessian_service.engine.graph import laplacian
from hessian_service.engine.graph.plan import GraphPlan

Pass = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Key = tuple[tuple[int, ...], torch.dtype, str, bool]


@dataclass
class _Entry:
    calls: int = 0
    state: str = "eager"  # eager -> compiling -> compiled | failed
    compiled: Pass | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


_LOCK = threading.Lock()  # guards every plan's compiled_passes


def _key(x: torch.Tensor, trace: bool) -> Key:
    return (tuple(x.shape), x.dtype, str(x.device), trace)


def state(graph_plan: GraphPlan, x: torch.Tensor, trace: bool) -> _Entry | None:
    """The compile state of this plan's pass at ``x``'s shape (None: never asked for)."""
    with _LOCK:
        entry = graph_plan.compiled_passes.get(_key(x, trace))
    assert entry is None or isinstance(entry, _Entry)
    return entry


def second_order(
    graph_plan: GraphPlan,
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    trace: bool,
    compile_after: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``laplacian.second_order`` with every column in one pass: compiled once the shape
    was asked for ``compile_after`` times, eager until then (and for good, if compiling
    fails). The caller holds the engine's autodiff lock; the compile runs on a thread."""
    n = int(x[0].numel())
    key = _key(x, trace)
    with _LOCK:
        entry = graph_plan.compiled_passes.setdefault(key, _Entry())
        assert isinstance(entry, _Entry)
        entry.calls += 1
        compiled = entry.compiled if entry.state == "compiled" else None
        start = entry.state == "eager" and entry.calls >= compile_after
        if start:
            entry.state = "compiling"
    if compiled is not None:
        with torch.no_grad():  # as it was compiled: a grad-mode change would recompile
            return compiled(x, targets)
    if start:
        _start_compile(graph_plan, x, targets, trace, n, entry)
    return laplacian.second_order(graph_plan, x, targets, trace=trace, columns=n)


def _start_compile(
    graph_plan: GraphPlan,
    x: torch.Tensor,
    targets: torch.Tensor,
    trace: bool,
    n: int,
    entry: _Entry,
) -> None:
    """Trace the pass into a flat aten graph here (fast), compile it on a thread."""

    def run(xs: torch.Tensor, ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return laplacian.second_order(graph_plan, xs, ts, trace=trace, columns=n)

    try:
        with torch.no_grad():
            flat = make_fx(run)(x, targets)
    except Exception as error:  # an operation make_fx cannot trace: stay eager
        _fail(entry, error)
        return
    example = (x.detach().clone(), targets.detach().clone())

    def build() -> None:
        try:
            compiled = torch.compile(flat, dynamic=False, fullgraph=True)
            with torch.no_grad():
                compiled(*example)  # the compile happens on this first call
        except Exception as error:
            _fail(entry, error)
            return
        with _LOCK:
            entry.compiled, entry.state = compiled, "compiled"
        entry.done.set()

    threading.Thread(target=build, name="hessian-compile", daemon=True).start()


def _fail(entry: _Entry, error: Exception) -> None:
    with _LOCK:
        entry.state = "failed"
        entry.error = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    entry.done.set()
