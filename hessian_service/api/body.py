"""JSON bodies that FastAPI validates but the service reads: counted, then parsed off the loop.

FastAPI reads a ``Body`` parameter with ``json.loads`` and validates it on the event
loop, so a large body of JSON numbers stalled every other request. A route of
``counted_json_route(Model, alternative)`` reads its body through ``hessian_service.wire.json_body``
instead -- the JSON-number limit checked while it arrives -- and hands FastAPI a request
whose ``json()`` parses with jiter and validates in a worker thread (inline when the body
is small: a thread hop costs more than that parse). The endpoint keeps its ``Body``
parameter, so the OpenAPI document, and every error FastAPI reports, stay exactly as
they were: ``json()`` raises ``json.JSONDecodeError`` as ``json.loads`` did (422
"invalid JSON at character N"), and a body that does not validate is returned parsed, for
FastAPI to validate again and report as it always has (its 422 names every field).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import anyio
from anyio.lowlevel import RunVar
from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError

from hessian_service.config import Settings
from hessian_service.wire.json_body import INLINE_BODY_BYTES, parse_json, read_body

# One parse at a time: a parse holds the GIL throughout, so parallel parses gain nothing,
# and each more thread waiting for the GIL is one more the event loop queues behind.
_PARSERS: RunVar[anyio.CapacityLimiter] = RunVar("json_body_parsers")


def parsers() -> anyio.CapacityLimiter:
    """This event loop's limiter of JSON parses (anyio keeps its own thread limiter so)."""
    try:
        return _PARSERS.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(1)
        _PARSERS.set(limiter)
        return limiter


class _ReadRequest(Request):
    """The same request, its body already read; ``json()`` parses and validates it."""

    def __init__(self, request: Request, body: bytes, adapter: TypeAdapter[Any]) -> None:
        super().__init__(request.scope, request.receive)
        self._read = body
        self._adapter = adapter

    async def body(self) -> bytes:
        return self._read

    def _parse(self) -> Any:
        data = parse_json(self._read)
        try:
            return self._adapter.validate_python(data, from_attributes=True)
        except ValidationError:
            return data  # FastAPI validates it again and reports the errors as always

    async def json(self) -> Any:
        if len(self._read) <= INLINE_BODY_BYTES:
            return self._parse()
        return await anyio.to_thread.run_sync(self._parse, limiter=parsers())


def counted_json_route(
    model: type[BaseModel], alternative: Callable[[Settings], str]
) -> type[APIRoute]:
    """A route class whose JSON body of ``model`` is counted, then parsed off the loop.

    ``alternative(settings)`` says, in the 413 for too many JSON-number bytes, how to
    send the same numbers in binary form.
    """
    adapter: TypeAdapter[Any] = TypeAdapter(model)

    class CountedJsonRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def route(request: Request) -> Response:
                settings: Settings = request.app.state.settings
                body = await read_body(
                    request.stream(),
                    json_number_limit=settings.max_json_number_bytes,
                    alternative=alternative(settings),
                )
                return await handler(_ReadRequest(request, body, adapter))

            return route

    return CountedJsonRoute
