"""The OpenAPI ``responses=`` of every route's errors, so the document says what is sent.

Outside ``/v2`` every 4xx/5xx is ``application/problem+json`` with the ``Problem`` schema
(``hessian_service.wire.schemas``); declaring 422 here also replaces FastAPI's default
``HTTPValidationError``, which the service never sends. ``install_problem_schemas`` puts
``Problem`` and its parts into the document's components, where these references point.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hessian_service.errors import PROBLEM_CONTENT_TYPE
from hessian_service.wire.binary import BINARY_CONTENT_TYPE, HEADER_LENGTH
from hessian_service.wire.schemas import Problem

REF_PREFIX = "#/components/schemas/"
PROBLEM_REF = {"$ref": f"{REF_PREFIX}Problem"}
Responses = dict[int | str, dict[str, Any]]

# What each status means wherever it is not said more precisely.
DEFAULT_DESCRIPTIONS: dict[int, str] = {
    400: "The body could not be read (not UTF-8, malformed multipart).",
    401: "Missing or wrong Bearer token.",
    403: "Model management is off: HESSIAN_ADMIN_TOKEN is not set.",
    404: "Unknown model or version.",
    409: "That name@version is loaded; replace=true replaces it.",
    413: "Body or result over the configured limit.",
    422: "Invalid input: `field` names the field at fault, `errors` every failed check.",
    503: "Not ready, or overloaded: retry after `Retry-After` seconds.",
    504: "Not computed within the per-request deadline.",
    507: "Out of memory even at an eighth of the memory budget: `estimated_bytes`, the "
    "budgets tried, and what to ask instead (rows, /hvp, /hessian/diagonal, ...).",
}


def problem_response(description: str) -> dict[str, Any]:
    """One documented error: problem+json with the ``Problem`` schema."""
    return {
        "description": f"{description} (problem+json)",
        "content": {PROBLEM_CONTENT_TYPE: {"schema": PROBLEM_REF}},
    }


def problems(*statuses: int, **descriptions: str) -> Responses:
    """``responses=`` for ``statuses``; ``descriptions`` (``s404="..."``) override the
    default wording of a status."""
    return {
        status: problem_response(descriptions.get(f"s{status}", DEFAULT_DESCRIPTIONS[status]))
        for status in statuses
    }


def computation_problems(**descriptions: str) -> Responses:
    """The errors of every route that computes on a model (``/hessian``, ``/jacobian``
    and the operators), with their shared wording; ``descriptions`` (``s413=...``) say
    what differs for a route."""
    return problems(
        400,
        404,
        413,
        422,
        503,
        504,
        507,
        **{
            "s400": "The body could not be read as UTF-8 JSON.",
            "s404": "Unknown model or version; `field` is `model`.",
            "s503": "Queue full (retry after `Retry-After` seconds), or models still loading.",
            **descriptions,
        },
    )


def binary_result(description: str) -> dict[str, Any]:
    """A computing route's 200: ``description``, the octet-stream body of the binary
    encoding and its ``Inference-Header-Content-Length`` header. A new dict each call:
    FastAPI adds the route's own JSON schema into the ``content`` it is given, so routes
    with different response models must not share one."""
    return {
        "description": description,
        "content": {BINARY_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        "headers": {
            HEADER_LENGTH: {
                "description": 'Length of the JSON header (encoding "binary" only).',
                "schema": {"type": "integer"},
            }
        },
    }


_DEFAULT_422 = f"{REF_PREFIX}HTTPValidationError"


def _drop_default_422(document: dict[str, Any]) -> None:
    """Remove FastAPI's default 422 (``HTTPValidationError``), which the service never
    sends: outside ``/v2`` every route declares its 422 as a ``Problem``; ``/v2`` routes
    answer validation errors with the protocol's 400 ``{"error": ...}``."""
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            content = responses.get("422", {}).get("content", {})
            if content.get("application/json", {}).get("schema", {}).get("$ref") == _DEFAULT_422:
                del responses["422"]
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def install_problem_schemas(app: Any) -> None:
    """Make ``app.openapi()`` carry ``Problem`` (and the models it uses) in its
    components, so the ``$ref`` of every problem response resolves, and no 422 schema
    the service does not send."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        document = build()  # FastAPI caches the document: this runs once per app
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        if "Problem" not in schemas:
            problem = Problem.model_json_schema(ref_template=REF_PREFIX + "{model}")
            schemas.update(problem.pop("$defs", {}))
            schemas["Problem"] = problem
            _drop_default_422(document)
        return document

    app.openapi = openapi


def inline_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema with its ``$defs`` references inlined (OpenAPI resolves refs from
    the document root, where these definitions do not live)."""
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(definitions[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved
