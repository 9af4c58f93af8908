"""One computing request through the service, answered with the bytes it encoded.

Shared by ``/hessian``, ``/jacobian`` and the operator routes: each validates its body,
then hands it here, so that they pass the same things on to ``DerivativeService.run``.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import Request, Response

from hessian_service.engine import DerivativeKind
from hessian_service.serving.service import DerivativeService
from hessian_service.wire.operator_schemas import OperatorRequest
from hessian_service.wire.schemas import DerivativeRequest


async def serve(
    service: DerivativeService,
    kind: DerivativeKind,
    request: DerivativeRequest | OperatorRequest,
    http: Request,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """``request`` computed as ``kind`` and answered as the service encoded it, with
    ``headers`` added. The body's size is passed on (it bounds the decoding done on the
    event loop), and a client that went away has its queued work dropped."""
    encoded = await service.run(
        kind, request, disconnected=http.is_disconnected, body_bytes=len(await http.body())
    )
    return Response(
        encoded.body, media_type=encoded.media_type, headers={**encoded.headers, **(headers or {})}
    )
