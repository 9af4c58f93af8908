"""Prometheus metrics and the per-request timing record the service fills in.

``Metrics`` owns one ``CollectorRegistry`` per app (so that several apps in one process,
as in the tests, never share counters). ``request_timing`` opens a ``RequestTiming`` in a
context variable for one request (``api.observability`` does, around every request); the
service fills it in (queue time, compute time, the model) through ``current_timing``.
No web framework here: the HTTP side (request ids, headers, access log) is the api's.

Label cardinality stays bounded: the route label is the route's template
(``/models/{name}``), ``unmatched`` for 404s; the model label is set only by the
service, after the registry knew the model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class RequestTiming:
    """What the service reports about one request: filled in while it is handled."""

    queue_ms: float = 0.0
    compute_ms: float = 0.0
    model: str = ""


_current: ContextVar[RequestTiming | None] = ContextVar("request_timing", default=None)


def current_timing() -> RequestTiming | None:
    """The timing record of the request being handled, if any (None outside requests)."""
    return _current.get()


@contextmanager
def request_timing() -> Iterator[RequestTiming]:
    """A fresh timing record, current for the duration of one request."""
    timing = RequestTiming()
    token = _current.set(timing)
    try:
        yield timing
    finally:
        _current.reset(token)


def _rss_bytes() -> float:
    """Resident set size of this process (Linux /proc; 0 where it is not available)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return float(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return 0.0


class Metrics:
    """The service's Prometheus metrics (one registry per app)."""

    def __init__(self, device: torch.device) -> None:
        self.registry = CollectorRegistry()
        labels = ("method", "route", "model", "status")
        self.requests = Counter(
            "hessian_requests", "HTTP requests answered.", labels, registry=self.registry
        )
        self.latency = Histogram(
            "hessian_request_duration_seconds",
            "Time from the request's arrival to the end of its response.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_samples = Histogram(
            "hessian_batch_samples",
            "Samples per computed batch (merged requests count together).",
            ("kind",),
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_requests = Histogram(
            "hessian_batch_requests",
            "Requests merged into one computed batch.",
            ("kind",),
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "hessian_queue_time_seconds",
            "Time a computing request waited before its batch started.",
            ("kind",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute_time = Histogram(
            "hessian_compute_time_seconds",
            "Time one batch took to compute.",
            ("kind",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rejected = Counter(
            "hessian_rejected",
            "Computing requests refused or dropped: queue_full (503), deadline (504), "
            "disconnected (client gone).",
            ("reason",),
            registry=self.registry,
        )
        self.oom_retries = Counter(
            "hessian_oom_retries",
            "Computations rerun with half the memory budget after running out of memory.",
            ("kind",),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "hessian_queue_depth", "Requests waiting to compute.", registry=self.registry
        )
        self.device_memory = Gauge(
            "hessian_device_memory_bytes",
            "Memory in use on the compute device: CUDA allocated bytes, or the process's "
            "resident set size on CPU.",
            ("device",),
            registry=self.registry,
        )
        if device.type == "cuda":
            self.device_memory.labels(str(device)).set_function(
                lambda: float(torch.cuda.memory_allocated(device))
            )
        else:
            self.device_memory.labels(str(device)).set_function(_rss_bytes)

        self.jobs_finished = Counter(
            "hessian_jobs_finished",
            "Jobs (POST /jobs) that ended, by operation and end state: succeeded, failed, "
            "cancelled.",
            ("operation", "state"),
            registry=self.registry,
        )
        self.jobs_kept = Gauge(
            "hessian_jobs", "Jobs kept by the server, by state.", ("state",), registry=self.registry
        )

    def bind_jobs(self, counts: Callable[[], dict[str, int]], states: Sequence[str]) -> None:
        """Read the kept jobs of each of ``states`` from ``counts()`` at every scrape."""

        def reader(state: str) -> Callable[[], float]:
            return lambda: float(counts().get(state, 0))

        for state in states:
            self.jobs_kept.labels(state).set_function(reader(state))

    def bind_queue_depth(self, depth: Callable[[], int]) -> None:
        """Read the queue depth from ``depth()`` at every scrape."""
        self.queue_depth.set_function(lambda: float(depth()))

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)
