"""How much work a derivative request is, estimated before any of it is done.

A request's cost grows with its samples, with the passes each sample needs (a Hessian
pushes one tangent per input through the gradient of each selected scalar; a Jacobian
needs one pass per row or per input, whichever is fewer) and with the size of one pass:
the activation elements one forward pass of one sample creates. ``work`` multiplies the
three. It is a coarse measure (a structured or graph path does far less than that many
element operations, a dense layer far more per element), good for refusing requests
that are absurd for the model before they queue, not for predicting a time.

``activation_elements`` runs one forward pass of one sample under a
``TorchDispatchMode`` that counts the elements of every operator's outputs (views
excluded). The mode is thread-local, so a forward pass on another thread (the batcher's
worker computing on the same module) neither sees it nor disturbs the count; hooks on the
module would do both. The count is kept per module and sample shape as long as the
module lives.
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hessian_service.engine.methods import DerivativeKind

_COUNTS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[object, ...], int]] = (
    weakref.WeakKeyDictionary()
)
_LOCK = threading.Lock()


class _OutputElements(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch's
    """Sums the elements of the tensors every (non-view) ATen operator returns."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.elements = 0

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if not getattr(func, "is_view", False):
            for tensor in out if isinstance(out, tuple | list) else (out,):
                if isinstance(tensor, torch.Tensor):
                    self.elements += tensor.numel()
        return out


def activation_elements(
    module: nn.Module, sample_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> int | None:
    """Elements the operators of one forward pass of one zero sample return (views
    excluded; at least the input's count), or None when that pass fails (the estimate is
    then unknown, never an error)."""
    key = (sample_shape, dtype, device)
    with _LOCK:
        known = _COUNTS.get(module, {}).get(key)
    if known is not None:
        return known
    counter = _OutputElements()
    sample = torch.zeros(1, *sample_shape, dtype=dtype, device=device)
    try:
        with torch.no_grad(), counter:
            module(sample)
    except Exception:  # a model that refuses zeros: no estimate, no error
        return None
    elements = max(counter.elements, math.prod(sample_shape))
    with _LOCK:
        _COUNTS.setdefault(module, {})[key] = elements
    return elements


def passes_per_sample(kind: DerivativeKind | str, *, inputs: int, scalars: int) -> int:
    """Passes through the network one sample needs: ``scalars * inputs`` for a Hessian,
    ``min(scalars, inputs)`` (the selected rows or the inputs) for a Jacobian."""
    if DerivativeKind(kind) is DerivativeKind.HESSIAN:
        return scalars * inputs
    return min(scalars, inputs)


def work(
    kind: DerivativeKind | str, *, samples: int, inputs: int, scalars: int, activations: int
) -> int:
    """``samples x passes per sample x activation elements``: see the module docstring."""
    return samples * passes_per_sample(kind, inputs=inputs, scalars=scalars) * activations
