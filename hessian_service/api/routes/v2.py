"""Open Inference Protocol v2 routes (KServe v2 / Triton HTTP), binary extension included.

Existing clients -- ``tritonclient.http``, KServe's -- work unchanged: server and model
metadata, liveness and readiness, and ``infer`` (the model's forward pass). Errors on
these routes are the protocol's ``{"error": "..."}`` (what tritonclient reads), with the
service's statuses, except that invalid input is 400, as the protocol asks.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from hessian_service.api.deps import RegistryDep, ServiceDep
from hessian_service.api.responses import Responses, inline_schema
from hessian_service.errors import (
    PROBLEM_CONTENT_TYPE,
    InvalidInput,
    ServiceError,
    TooLarge,
    problem_of,
    status_of,
)
from hessian_service.names import NAME_PATTERN, VERSION_PATTERN
from hessian_service.repository.readiness import readiness
from hessian_service.serving import inference
from hessian_service.wire import codec
from hessian_service.wire.binary import BINARY_CONTENT_TYPE, HEADER_LENGTH
from hessian_service.wire.fields import field_name
from hessian_service.wire.json_body import read_body
from hessian_service.wire.oip_schemas import (
    ErrorBody,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
)

EXTENSIONS = ["binary_tensor_data"]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class OipRoute(APIRoute):
    """A route whose errors come out as ``{"error": ...}`` instead of problem+json."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except TooLarge as exc:  # as the body-size limit answers: problem+json + error
                body = {**problem_of(exc), "error": exc.detail}
                return Response(codec.dumps(body), status_of(exc), media_type=PROBLEM_CONTENT_TYPE)
            except ServiceError as exc:
                status = 400 if isinstance(exc, InvalidInput) else status_of(exc)
                return _error(status, exc.detail)
            except RequestValidationError as exc:
                first = exc.errors()[0] if exc.errors() else {}
                where = field_name(first.get("loc", ()), exc.body)
                return _error(400, f"{where}: {first.get('msg', 'invalid')}")

        return route


router = APIRouter(prefix="/v2", tags=["open inference protocol v2"], route_class=OipRoute)

_ERRORS: Responses = {
    400: {"model": ErrorBody, "description": "Invalid request, naming the field."},
    404: {"model": ErrorBody, "description": "Unknown model or version."},
    503: {"model": ErrorBody, "description": "Not ready: no model can serve yet."},
}
_TOO_LARGE: Responses = {413: {"model": ErrorBody, "description": "Body over a size limit."}}
# Names and versions as the registry holds them: ``name@`` or ``../x`` is a 400 naming
# the path parameter, never resolved to some other model.
ModelName = Annotated[str, Path(pattern=NAME_PATTERN, description="A loaded model's name.")]
ModelVersion = Annotated[str, Path(pattern=VERSION_PATTERN, description="One of its versions.")]


_INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "An `$inference_request` as JSON; or, with the binary tensor "
        f"extension, its JSON header of `{HEADER_LENGTH}` bytes followed by the inputs' "
        "raw little-endian bytes (inputs carry `parameters.binary_data_size`).",
        "content": {
            "application/json": {"schema": inline_schema(InferRequest.model_json_schema())},
            BINARY_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.get(
    "", response_model=ServerMetadata, operation_id="v2_server_metadata", summary="Server metadata"
)
async def server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(
        name="hessian-service", version=request.app.version, extensions=EXTENSIONS
    )


# The status is the answer (tritonclient reads only it), and the body says it again as
# KServe's server writes it, {"live": true} / {"ready": true}: KServe's Python client
# (InferenceRESTClient.is_server_live / is_server_ready) returns that field and fails on
# an empty body, which the protocol text allows ("should be empty") but does not require.
@router.get(
    "/health/live",
    response_model=ServerLive,
    operation_id="v2_health_live",
    summary="The server is live",
)
async def live() -> ServerLive:
    return ServerLive(live=True)


@router.get(
    "/health/ready",
    response_model=ServerReady,
    operation_id="v2_health_ready",
    responses={503: {"model": ErrorBody, "description": "Not ready: why, in `error`."}},
    summary="The server is ready for inference",
)
async def ready(request: Request, registry: RegistryDep) -> Response | ServerReady:
    state = readiness(registry, request.app.state.settings.ready_requires)
    if not state.ready:
        return _error(503, state.detail)
    return ServerReady(ready=True)


def _ready(registry: RegistryDep, name: str, version: str | None) -> ModelReady:
    model = inference.lookup(registry, name, version)
    return ModelReady(name=model.manifest.name, ready=True)


@router.get(
    "/models/{name}",
    response_model=ModelMetadata,
    responses=_ERRORS,
    operation_id="v2_model_metadata",
    summary="Model metadata",
)
async def model_metadata(name: ModelName, registry: RegistryDep) -> ModelMetadata:
    model = inference.lookup(registry, name)
    return inference.model_metadata(model, inference.versions_of(registry, model))


@router.get(
    "/models/{name}/versions/{version}",
    response_model=ModelMetadata,
    responses=_ERRORS,
    operation_id="v2_model_version_metadata",
    summary="Model metadata, one version",
)
async def model_version_metadata(
    name: ModelName, version: ModelVersion, registry: RegistryDep
) -> ModelMetadata:
    return inference.model_metadata(inference.lookup(registry, name, version))


@router.get(
    "/models/{name}/ready",
    response_model=ModelReady,
    responses=_ERRORS,
    operation_id="v2_model_ready",
    summary="Model ready",
)
async def model_ready(name: ModelName, registry: RegistryDep) -> ModelReady:
    return _ready(registry, name, None)


@router.get(
    "/models/{name}/versions/{version}/ready",
    response_model=ModelReady,
    responses=_ERRORS,
    operation_id="v2_model_version_ready",
    summary="Model ready, one version",
)
async def model_version_ready(
    name: ModelName, version: ModelVersion, registry: RegistryDep
) -> ModelReady:
    return _ready(registry, name, version)


_BINARY_ALTERNATIVE = (
    "Send the input with the binary tensor extension instead: a JSON header of "
    f"{HEADER_LENGTH} bytes whose input carries parameters.binary_data_size and no data, "
    "followed by the tensor's raw little-endian bytes."
)


async def _infer(
    request: Request,
    registry: RegistryDep,
    service: ServiceDep,
    name: str,
    version: str | None,
) -> Response:
    settings = request.app.state.settings
    header_length = request.headers.get(HEADER_LENGTH)
    json_length = header_length.strip() if header_length is not None else ""
    body = await read_body(  # its JSON numbers counted as it arrives, before any parsing
        request.stream(),
        json_number_limit=settings.max_json_number_bytes,
        json_length=int(json_length) if json_length.isdigit() else None,
        alternative=_BINARY_ALTERNATIVE,
    )
    encoded = await inference.infer(
        registry,
        service,
        name,
        version,
        body,
        header_length,
        settings.max_samples_per_request,
        disconnected=request.is_disconnected,
    )
    return Response(encoded.body, media_type=encoded.media_type, headers=encoded.headers)


_INFER_DOC = """The model's forward pass on a batch `[B, *input_shape]`: its output, named
`output`, shaped `[B, *output_shape]`; and, when `outputs` names them, its derivatives:
`jacobian`, `hessian`, `hvp` (of the second input, `vectors`), `hessian_diagonal`,
`hessian_trace`, each exactly as `/jacobian`, `/hessian`, `/hvp`, `/hessian/diagonal` and
`/hessian/trace` compute it, the selection (`output_index`, `objective`, ...) in the
request's `parameters` or the output's own. Outputs asked for with
`parameters.binary_data` (or the request's `parameters.binary_data_output`) come back as
raw bytes after a JSON header of `Inference-Header-Content-Length` bytes."""


@router.post(
    "/models/{name}/infer",
    response_model=InferResponse,
    responses=_ERRORS | _TOO_LARGE,
    openapi_extra=_INFER_BODY,
    operation_id="v2_model_infer",
    summary="Inference: the model's output",
    description=_INFER_DOC,
)
async def infer(
    name: ModelName, request: Request, registry: RegistryDep, service: ServiceDep
) -> Response:
    return await _infer(request, registry, service, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer",
    response_model=InferResponse,
    responses=_ERRORS | _TOO_LARGE,
    openapi_extra=_INFER_BODY,
    operation_id="v2_model_version_infer",
    summary="Inference on one version",
    description=_INFER_DOC,
)
async def infer_version(
    name: ModelName,
    version: ModelVersion,
    request: Request,
    registry: RegistryDep,
    service: ServiceDep,
) -> Response:
    return await _infer(request, registry, service, name, version)
