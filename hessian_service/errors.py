"""One error taxonomy and ONE table mapping it to HTTP statuses.

Every failure the service reports is a ``ServiceError`` subclass; the handler in
``hessian_service.main`` turns it into an RFC 9457 ``application/problem+json`` body. Bad input is
always one of these (4xx), never a 500.
"""

from __future__ import annotations

from typing import Any

PROBLEM_CONTENT_TYPE = "application/problem+json"


class ServiceError(Exception):
    """Base of every error the service reports to clients.

    ``field`` names the request field at fault (e.g. ``inputs[0].shape``), when there is one.
    """

    title = "Service error"

    def __init__(self, detail: str, *, field: str | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field
        self.extra = extra
        self.headers: dict[str, str] = {}  # extra response headers (e.g. Retry-After)


class NotFound(ServiceError):
    title = "Not found"


class InvalidInput(ServiceError):
    title = "Invalid input"


class TooLarge(ServiceError):
    title = "Too large"


class Overloaded(ServiceError):
    """The server is too busy now; ``Retry-After`` says when to try again."""

    title = "Overloaded"

    def __init__(self, detail: str, *, retry_after_s: int = 1, **extra: Any) -> None:
        super().__init__(detail, retry_after_s=retry_after_s, **extra)
        self.headers["Retry-After"] = str(retry_after_s)


class Timeout(ServiceError):
    """The request did not finish within the server's per-request deadline."""

    title = "Timeout"


class ClientClosedRequest(ServiceError):
    """The client went away before its work ran (nginx's 499: nobody reads the answer)."""

    title = "Client closed request"


class NotReady(ServiceError):
    title = "Not ready"


class Unauthorized(ServiceError):
    """Missing or wrong credentials; the response asks for a Bearer token."""

    title = "Unauthorized"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.headers["WWW-Authenticate"] = 'Bearer realm="hessian-service"'


class InsufficientStorage(ServiceError):
    """The computation ran out of device or host memory even with smaller chunks (WebDAV's
    507: the server cannot store what this request needs); the request may fit in pieces."""

    title = "Insufficient storage"


class Forbidden(ServiceError):
    title = "Forbidden"


class Conflict(ServiceError):
    title = "Conflict"


STATUS_BY_ERROR: dict[type[ServiceError], int] = {
    NotFound: 404,
    InvalidInput: 422,
    TooLarge: 413,
    Overloaded: 503,
    NotReady: 503,
    Unauthorized: 401,
    Forbidden: 403,
    Conflict: 409,
    Timeout: 504,
    ClientClosedRequest: 499,
    InsufficientStorage: 507,
    ServiceError: 500,
}


def status_of(error: ServiceError) -> int:
    """The HTTP status for an error: the table's entry for its nearest listed class."""
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


def problem(
    status: int, title: str, detail: str, *, field: str | None = None, **extra: Any
) -> dict[str, Any]:
    """An RFC 9457 problem-details body (``hessian_service.wire.schemas.Problem`` documents it).

    ``field`` is always present: the request field at fault (``inputs[0].data``,
    ``model``, ``body``, ``path``, ``method``...), or null where no part of the request
    is (the server is overloaded, not ready, out of time). Other extras are left out
    when None.
    """
    body: dict[str, Any] = {
        "type": "about:blank",  # RFC 9457: the title says it all
        "title": title,
        "status": status,
        "detail": detail,
        "field": field,
    }
    body.update({key: value for key, value in extra.items() if value is not None})
    return body


def problem_of(error: ServiceError) -> dict[str, Any]:
    """The problem-details body of a ``ServiceError``."""
    return problem(status_of(error), error.title, error.detail, field=error.field, **error.extra)
