"""One graph plan per (model, sample shape, dtype, device, selection), kept while the model
lives.

Capturing and planning a graph costs 0.1-4 s (tracing plus decompositions), so a plan is
made once and reused by every later call with the same key; a model whose graph cannot be
captured or planned is remembered too, with the reason, so it goes to the generic path
at once. The key includes the parameters' and buffers' version counters: changing a
weight in place (``p.add_(...)``) makes a new plan, as a new model object does.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
from torch import nn

from hessian_service.engine.graph import direct
from hessian_service.engine.graph.capture import CaptureError, capture
from hessian_service.engine.graph.plan import GraphPlan, GraphUnsupported, plan

# One sample ``[1, *shape]`` and its target -> (selected scalars [k], flat output [m]).
SampleFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Unsupported:
    """Why a model has no graph plan for a key: the node at fault, when there is one."""

    reason: str
    node: str | None = None


_PLANS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[object, ...], GraphPlan | Unsupported]] = (
    weakref.WeakKeyDictionary()
)
_LOCK = threading.Lock()
MAX_PLANS_PER_MODEL = 32


def _versions(model: nn.Module) -> tuple[int, ...]:
    return tuple(t._version for t in (*model.parameters(), *model.buffers()))


def graph_plan(
    model: nn.Module,
    sample: torch.Tensor,
    target: torch.Tensor,
    selection_key: Hashable,
    function: SampleFn,
) -> GraphPlan | Unsupported:
    """The cached plan for ``function`` (one sample of ``model``), or why there is none."""
    key = (
        tuple(sample.shape),
        sample.dtype,
        sample.device,
        tuple(target.shape),
        target.dtype,
        selection_key,
        _versions(model),
    )
    with _LOCK:
        known = _PLANS.get(model)
        if known is None:
            known = _PLANS[model] = {}
        if key in known:
            return known[key]
    result: GraphPlan | Unsupported
    try:
        result = plan(capture(function, sample, target))
        result.direct_reason = direct.unsupported_reason(result)
    except GraphUnsupported as error:
        result = Unsupported(str(error), error.node)
    except CaptureError as error:
        result = Unsupported(f"capture failed: {error}")
    with _LOCK:
        if len(known) >= MAX_PLANS_PER_MODEL:
            known.pop(next(iter(known)))
        known[key] = result
    return result
