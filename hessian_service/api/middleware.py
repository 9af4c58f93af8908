"""Request-body size limit, enforced before the body is parsed."""

from __future__ import annotations

from collections import deque

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hessian_service.errors import PROBLEM_CONTENT_TYPE, problem
from hessian_service.wire import codec, umbridge_schemas


class BodySizeLimit:
    """Refuse bodies over ``limit`` bytes with 413, by Content-Length or while streaming.

    ``path_limits`` maps ``(method, path)`` to another limit (model uploads are larger).
    """

    def __init__(
        self, app: ASGIApp, limit: int, path_limits: dict[tuple[str, str], int] | None = None
    ) -> None:
        self.app = app
        self.limit = limit
        self.path_limits = path_limits or {}

    async def _refuse(self, scope: Scope, send: Send, limit: int) -> None:
        detail = f"request body is over this server's limit of {limit} bytes"
        # Open Inference Protocol clients (tritonclient) read {"error": ...}, as every
        # other /v2 error; elsewhere the problem names the body as the field at fault.
        path = str(scope.get("path", ""))
        if path.startswith("/v2/"):
            body, content_type = codec.dumps({"error": detail}), "application/json"
        elif path in umbridge_schemas.PATHS:  # UM-Bridge's clients read its own shape
            body = codec.dumps(umbridge_schemas.error_body("TooLarge", detail))
            content_type = "application/json"
        else:
            problem_body = problem(413, "Too large", detail, field="body", limit_bytes=limit)
            body, content_type = codec.dumps(problem_body), PROBLEM_CONTENT_TYPE
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", content_type.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.path_limits.get((scope["method"], scope["path"]), self.limit)
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit() and int(value) > limit:
                await self._refuse(scope, send, limit)
                return
        if any(key == b"content-length" for key, _ in scope["headers"]):
            await self.app(scope, receive, send)  # the server stops at Content-Length
            return
        # A streamed (chunked) body: read it up to the limit before the app sees it.
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                await self._refuse(scope, send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        # Replayed chunk by chunk as it came, not joined: no second copy of the body, and
        # the JSON-number count (hessian_service.wire.json_body) sees the chunks the server read.
        pending = deque(chunks or [b""])

        async def replay() -> Message:
            if not pending:
                return await receive()
            chunk = pending.popleft()
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

        await self.app(scope, replay, send)
