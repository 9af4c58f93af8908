"""Progress and cancellation of long derivative work, counted in products.

The matrix-free operators (Hessian-vector products, diagonals, traces, eigenpairs) and the
chunked dense paths do their work in chunks of products (one product: one Hessian-vector,
Jacobian-vector or vector-Jacobian product, or one row of a dense matrix). Between chunks
they call ``Progress.advance``: the counter a poller reads (a job's progress), and the one
point where a cancelled job stops (``Cancelled``), so that the worker is free within one
chunk. Engine code takes an optional ``progress`` and uses ``NO_PROGRESS`` without one.

Thread-safe: the engine advances it on the worker thread while the event loop reads it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


class Cancelled(Exception):  # a state, not a fault: the caller asked for it
    """Raised by ``Progress.advance`` once ``cancel()`` was called: the work stops there."""


@dataclass(frozen=True)
class ProgressSnapshot:
    """What a poll sees: products done of the planned total, and an estimate of the rest."""

    done: int
    total: int
    elapsed_s: float

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total > 0 else 0.0

    @property
    def seconds_left(self) -> float | None:
        """Linear extrapolation from the rate so far; ``None`` before the first chunk."""
        if self.done <= 0 or self.total <= 0:
            return None
        return max(0.0, self.elapsed_s * (self.total - self.done) / self.done)


class Progress:
    """Counts products done against a total the planner set, and carries a cancel flag."""

    def __init__(self, total: int = 0) -> None:
        self._lock = threading.Lock()
        self._done = 0
        self._total = total
        self._started = time.monotonic()
        self._cancelled = threading.Event()

    def plan(self, total: int) -> None:
        """Set (or raise, when the work found it needs more) the total number of products."""
        with self._lock:
            self._total = max(int(total), self._done)

    def advance(self, products: int = 1) -> None:
        """Record ``products`` more done; raise ``Cancelled`` if the work was cancelled."""
        self.check()
        with self._lock:
            self._done += int(products)
            self._total = max(self._total, self._done)

    def check(self) -> None:
        """Raise ``Cancelled`` if ``cancel()`` was called (call it before each chunk)."""
        if self._cancelled.is_set():
            raise Cancelled("the work was cancelled")

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def snapshot(self) -> ProgressSnapshot:
        with self._lock:
            return ProgressSnapshot(self._done, self._total, time.monotonic() - self._started)


class _NoProgress(Progress):
    """Counts nothing and is never cancelled: the default of direct engine calls."""

    def advance(self, products: int = 1) -> None:
        return None

    def plan(self, total: int) -> None:
        return None

    def cancel(self) -> None:
        raise TypeError("NO_PROGRESS is shared by every direct call and cannot be cancelled")


NO_PROGRESS: Progress = _NoProgress()
