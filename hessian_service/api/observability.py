"""Request ids, timing headers, request metrics and one JSON access-log line per request.

``ObservabilityMiddleware`` is a pure ASGI middleware (no ``BaseHTTPMiddleware``: it
would copy every body through a stream) that

- opens a ``RequestTiming`` for every request (``metrics.request_timing``), which the
  service fills in (queue time, compute time, the model);
- adds ``X-Request-Id`` (the client's when it is sane, else a new one),
  ``X-Queue-Time-Ms`` and ``X-Compute-Time-Ms`` (0 for routes that do not compute) to
  every response;
- counts the request and its latency per route template, model and status, and writes
  one JSON access-log line on the ``hessian_service.access`` logger.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hessian_service.metrics import Metrics, RequestTiming, request_timing

access_logger = logging.getLogger("hessian_service.access")
REQUEST_ID_HEADER = "x-request-id"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


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

        with request_timing() as timing:
            try:
                await self.app(scope, receive, send_with_headers)
            finally:
                self._record(scope, request_id, status, timing, time.perf_counter() - started)

    def _record(
        self, scope: Scope, request_id: str, status: int, timing: RequestTiming, elapsed: float
    ) -> None:
        """Count the request, time it, and write its access-log line."""
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
