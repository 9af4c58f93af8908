"""Run a model so that every operator in it has the derivatives the engine takes.

A model that runs forward can still fail under ``torch.func`` transforms or a second
``torch.autograd`` pass, for reasons that have nothing to do with its math:

- Recurrent layers and cells (``nn.GRU``, ``nn.LSTMCell`` ...) call fused ATen ops
  (``torch.gru``, ``torch.lstm_cell`` ...) that update gates in place: under ``vmap``
  over samples they fail on the unbatched zero initial state ("output with shape
  [1, 16] doesn't match the broadcast shape [3, 1, 16]"; ``recurrent``).
- Attention (``F.scaled_dot_product_attention``, used by ``nn.MultiheadAttention`` with
  ``need_weights=False`` and so by ``nn.TransformerEncoderLayer``) picks a fused kernel
  (flash attention on CPU) whose backward has no derivative of its own: no Hessian.
  The math kernel is plain matmuls and a softmax, differentiable to any order.
- A TorchScript module runs through the JIT's graph executor, whose optimized plans
  (differentiable subgraphs with their own symbolic backward) do not compose with
  ``torch.func``: measured on a scripted SiLU MLP, the first ``vmap``-ed Hessian was off
  by 4e-2 and the second raised "accessing `data` under vmap transform is not allowed".
  Unoptimized execution (``torch.jit.optimized_execution(False)``, thread-local) runs
  the graph's ops one by one, which every transform handles; a plan the executor built
  before is still used, so the first runs of a ScriptModule that had grad must be
  unoptimized too.
- Under ``torch.no_grad()`` some backward formulas (SiLU's, Mish's) are the fused
  ``silu_backward`` op, which has no forward-mode rule, so forward-over-reverse fails;
  with grad mode on torch uses their differentiable composite form.

``derivative_mode()`` fixes all four for the code it wraps, without changing a result
beyond rounding: grad mode on, the math attention kernel, unoptimized TorchScript, and
the recurrent ops replaced by ``recurrent``'s functional forms (the same gate equations
without in-place updates) through a ``TorchFunctionMode``. While one is active
``torch.overrides.has_torch_function`` is true, which also keeps
``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` off their inference fast
paths (``torch._transformer_encoder_layer_fwd``, ``torch._native_multi_head_attention``),
which have no derivatives either. The attention kernel choice is process-wide torch
state; the engine's callers hold ``AUTODIFF_LOCK`` around it.

A TorchScript graph calls its ops from C++, past any ``TorchFunctionMode``: a scripted
GRU still fails under ``vmap``, and a module traced under ``torch.no_grad()`` has the
fused attention ops in its graph. ``run_differentiable`` therefore retries a failed
computation once in ``decomposed_mode``: ``derivative_mode`` plus torch's Python
dispatcher, under which composite ops run as their Python decompositions (torch's own
for the recurrent sequence ops, ``fused_attention``'s for the fused attention kernels).
Only the retry pays for the Python dispatcher (every op consults it: 1.5x the CPU time
of ``mlp_tanh``'s generic Hessian, 2.5x on 256 PINN points; the ``TorchFunctionMode``
costs 3-8%; ``bench/generic_modes.py``, figures in ``docs/engine.md``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch._dispatch.python import enable_python_dispatcher
from torch.jit._fuser import optimized_execution
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from hessian_service.engine import (
    fused_attention,  # noqa: F401  (registers its forms)
    recurrent,
)

_T = TypeVar("_T")


class _FunctionalRecurrence(TorchFunctionMode):
    """Replaces the fused recurrent ops (called positionally, as ``nn.RNNBase`` and the
    cells do) with ``recurrent``'s functional forms; every other call passes through."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        replacement = recurrent.REPLACEMENTS.get(func)
        if replacement is not None and not kwargs and len(args) in replacement[1]:
            return replacement[0](*args)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def derivative_mode() -> Iterator[None]:
    """Grad mode on, the math attention kernel, unoptimized TorchScript, functional
    recurrent ops: see the module docstring. Re-entrant; restores everything on exit."""
    with (
        torch.enable_grad(),
        sdpa_kernel(SDPBackend.MATH),
        optimized_execution(False),
        _FunctionalRecurrence(),
    ):
        yield


@contextlib.contextmanager
def decomposed_mode() -> Iterator[None]:
    """``derivative_mode`` and the Python dispatcher: composite and fused ops run as
    their Python decompositions, inside TorchScript graphs too (see the module
    docstring; ``fused_attention.FORMS`` are the fused attention ops' forms)."""
    with derivative_mode(), enable_python_dispatcher():
        yield


def run_differentiable(compute: Callable[[], _T]) -> _T:
    """``compute()`` in ``derivative_mode``; if it raises a ``RuntimeError`` (which
    includes ``NotImplementedError``), once more in ``decomposed_mode``. When the retry
    fails too, its error is raised, chained to the first."""
    try:
        with derivative_mode():
            return compute()
    except RuntimeError as first:
        try:
            with decomposed_mode():
                return compute()
        except RuntimeError as second:
            raise second from first
