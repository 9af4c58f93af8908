"""Prometheus metrics, per-request timing, request ids and structured access logs.

``Metrics`` owns one ``CollectorRegistry`` per app (so that several apps in one process,
as in the tests, never share counters). ``ObservabilityMiddleware`` is a pure ASGI
middleware (no ``BaseHTTPMiddleware``: it would copy every body through a stream) that

- gives every request a ``RequestTiming`` in a context variable, which the service fills
  in (queue time, compute time, the model);
- adds ``X-Request-Id`` (the client's when it is sane, else a new one),
  ``X-Queue-Time-Ms`` and ``X-Compute-Time-Ms`` (0 for routes that do not compute) to
  every response;
- counts the request and its latency per route template, model and status, and writes
  one JSON access-log line.

Label cardinality stays bounded: the route label is the route's template
(``/models/{name}``), ``unmatched`` for 404s; the model label is set only by the
service, after the registry knew the model.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_logger = logging.getLogger("hessian_service.access")
REQUEST_ID_HEADER = "x-request-id"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
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

    def bind_queue_depth(self, depth: Callable[[], int]) -> None:
        """Read the queue depth from ``depth()`` at every scrape."""
        self.queue_depth.set_function(lambda: float(depth()))

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


def _request_id(scope: Scope) -> str:
    for key, value in scope.get("headers", ()):
        if key == b"x-request-id":
            text = bytes(value).decode("latin-1")
            if _SANE_REQUEST_ID.match(text):
                return text
            break
    return uuid.uuid4().hex


class ObservabilityMiddleware:
    """Request id, timing headers, request metrics and one JSON access-log line."""

    def __init__(self, app: ASGIApp, metrics: Metrics, access_log: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        timing = RequestTiming()
        token = _current.set(timing)
        status = 500  # what an exception that escapes the app becomes

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"
                ]
                headers += [
                    (b"x-request-id", request_id.encode()),
                    (b"x-queue-time-ms", f"{timing.queue_ms:.3f}".encode()),
                    (b"x-compute-time-ms", f"{timing.compute_ms:.3f}".encode()),
                ]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            _current.reset(token)
            elapsed = time.perf_counter() - started
            route = _route_template(scope)
            labels = (scope["method"], route, timing.model, str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(elapsed)
            if self.access_log and access_logger.isEnabledFor(logging.INFO):
                access_logger.info(
                    json.dumps(
                        {
                            "request_id": request_id,
                            "method": scope["method"],
                            "path": scope["path"],
                            "route": route,
                            "model": timing.model or None,
                            "status": status,
                            "duration_ms": round(elapsed * 1000, 3),
                            "queue_ms": round(timing.queue_ms, 3),
                            "compute_ms": round(timing.compute_ms, 3),
                            "client": (scope.get("client") or [None])[0],
                        }
                    )
                )


def configure_access_log() -> None:
    """Send ``hessian_service.access`` lines (already JSON) to stderr, once, unless configured."""
    if access_logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_logger.addHandler(handler)
    access_logger.setLevel(logging.INFO)
    access_logger.propagate = False
