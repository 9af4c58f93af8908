"""Out-of-memory during a computation: recognise it, free what can be freed, retry smaller.

The planner sizes every chunk to ``memory_budget_bytes``, but the budget is a setting and
the device is shared (other requests, other processes, the allocator's fragmentation), so
an allocation can still fail. torch reports that as ``torch.OutOfMemoryError`` (CUDA,
and the alias ``torch.cuda.OutOfMemoryError``) or, on the CPU, as a ``RuntimeError``
whose message names ``DefaultCPUAllocator: can't allocate memory``. ``retrying`` reruns
the computation with half the budget (the planner then halves its chunks), after emptying
CUDA's cache, a bounded number of times; when every try failed it raises
``OutOfMemory`` for the service to answer 507. Nothing else is caught: any other error
is the caller's to report.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")
# Tries after the first, each with half the previous budget: 1/2, 1/4, 1/8 of it.
MAX_RETRIES = 3
_CPU_MESSAGES = ("DefaultCPUAllocator: can't allocate memory", "not enough memory")


class OutOfMemory(Exception):
    """Every try ran out of memory; ``budgets`` are the budgets tried, in order, and
    ``last`` the last failure's message (the exception itself is dropped: its traceback
    holds the failed try's tensors)."""

    def __init__(self, budgets: list[int], last: str) -> None:
        super().__init__(f"out of memory with budgets {budgets}: {last}")
        self.budgets = budgets
        self.last = last


def is_out_of_memory(error: BaseException) -> bool:
    """True for a device or host allocation failure, not for any other error."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _CPU_MESSAGES)


def free_cached(device: torch.device) -> None:
    """Give back what the failed try left: its tensors (a collection drops the frames
    the traceback held), and CUDA's cached blocks so that the retry may get them."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def retrying(
    compute: Callable[[int], T],
    budget: int,
    device: torch.device,
    *,
    retries: int = MAX_RETRIES,
    on_retry: Callable[[int], None] | None = None,
) -> T:
    """``compute(budget)``; on out-of-memory, ``compute(budget // 2)`` and so on, at most
    ``retries`` more times. ``on_retry(next_budget)`` is told of each retry (a metric).
    Raises ``OutOfMemory`` when the last try failed too."""
    budgets: list[int] = []
    for attempt in range(retries + 1):
        budgets.append(budget)
        try:
            return compute(budget)
        except Exception as exc:  # only memory failures are retried; the rest re-raise
            if not is_out_of_memory(exc):
                raise
            failure = f"{type(exc).__name__}: {str(exc)[:300]}"
        # Outside the except block: the traceback (and the tensors its frames hold) is
        # gone before the cache is emptied.
        free_cached(device)
        if attempt == retries:
            raise OutOfMemory(budgets, failure)
        budget = max(1, budget // 2)
        if on_retry is not None:
            on_retry(budget)
    raise AssertionError("unreachable")  # pragma: no cover
