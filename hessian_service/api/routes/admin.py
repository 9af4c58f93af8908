"""``POST /models`` and ``DELETE /models/{name}``: model management behind a Bearer token.

Off unless the operator sets ``HESSIAN_ADMIN_TOKEN``: then every call answers 403. With a
token set, a call without ``Authorization: Bearer <token>``, or with another token,
answers 401 with ``WWW-Authenticate: Bearer``; tokens are compared in constant time.
The token is checked before the body is read. The body's size is limited by
``HESSIAN_MAX_UPLOAD_BYTES`` (``hessian_service.api.middleware``), before it is read, too.

The handlers parse the form; staging, loading and publishing are
``repository.management``'s, in a worker thread, off the event loop, so that requests on
other models go on; the new model is published by an atomic swap of the registry's
dictionaries.
"""

from __future__ import annotations

import functools
import hmac
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from hessian_service.api.deps import ModelRef, RegistryDep
from hessian_service.api.responses import problems
from hessian_service.config import Settings
from hessian_service.errors import Forbidden, InvalidInput, Unauthorized
from hessian_service.repository import management
from hessian_service.repository.isolation import IsolationLimits
from hessian_service.repository.loaders import DEFAULT_FILES
from hessian_service.repository.registry import (
    Manifest,
)
from hessian_service.repository.uploads import UploadStore
from hessian_service.serving.model_info import model_info
from hessian_service.wire.fields import field_name
from hessian_service.wire.schemas import ModelInfo, ModelList

router = APIRouter(tags=["model management"])
bearer = HTTPBearer(auto_error=False, description="The operator's HESSIAN_ADMIN_TOKEN.")
MAX_MANIFEST_BYTES = 64 * 1024


def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """403 when management is off; 401 unless the Bearer token matches."""
    settings: Settings = request.app.state.settings
    token = settings.admin_token.get_secret_value() if settings.admin_token else ""
    if not token:
        raise Forbidden(
            "model management is off on this server: the operator has not set HESSIAN_ADMIN_TOKEN"
        )
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized(
            "Authorization: expected the header 'Authorization: Bearer <token>'",
            field="Authorization",
        )
    if not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
        raise Unauthorized("Authorization: the token is not valid", field="Authorization")


AdminDep = Annotated[None, Depends(require_admin)]

_REGISTER_ERRORS = problems(
    400,
    401,
    403,
    409,
    413,
    422,
    s400="The body is not a readable multipart/form-data body.",
    s413="Body over HESSIAN_MAX_UPLOAD_BYTES.",
    s422="Bad manifest, or a file that is refused or fails to load; `field` names it.",
)
_DELETE_ERRORS = problems(401, 403, 404, 422, s422="`name` is not a model name or name@version.")
_MULTIPART = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["manifest", "file"],
                    # The form is read with max_fields=1, max_files=1: other parts are refused.
                    "additionalProperties": False,
                    "properties": {
                        "manifest": {
                            "type": "string",
                            "description": "JSON: name, version, format (zoo | torchscript "
                            "| export), input_shape, architecture (zoo), ...",
                        },
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "safetensors weights (zoo) or the archive.",
                        },
                    },
                }
            }
        },
    }
}


def _manifest(text: str) -> Manifest:
    try:
        manifest = Manifest.model_validate_json(text)
    except ValidationError as error:
        first = error.errors()[0]
        where = field_name(first["loc"]) if first["loc"] else ""
        field = f"manifest.{where}" if where else "manifest"
        raise InvalidInput(f"{field}: {first['msg']}", field=field) from None
    if manifest.file or manifest.weights:
        raise InvalidInput(
            "manifest.file: the server names uploaded files itself; leave it out",
            field="manifest.file",
        )
    return manifest.model_copy(update={"file": DEFAULT_FILES[manifest.format]})


async def _text(part: str | UploadFile | None, name: str) -> str:
    if isinstance(part, UploadFile):
        data = await part.read(MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:
            raise InvalidInput(f"{name}: over {MAX_MANIFEST_BYTES} bytes", field=name)
        return data.decode("utf-8", errors="replace")
    if part is None:
        raise InvalidInput(f"{name}: a required multipart/form-data part is missing", field=name)
    return part


@router.post(
    "/models",
    status_code=201,
    response_model=ModelInfo,
    responses=_REGISTER_ERRORS,
    openapi_extra=_MULTIPART,
    operation_id="register_model",
    summary="Register a model (multipart: manifest JSON + file); needs the admin token",
)
async def register_model(
    request: Request,
    response: Response,
    registry: RegistryDep,
    _admin: AdminDep,
    replace: bool = False,
) -> ModelInfo:
    """Upload a model: `manifest` (JSON text) and `file` (safetensors weights for a zoo
    architecture, a TorchScript archive, or a torch.export archive). Answers 201 with the
    model's capability report. `replace=true` replaces a loaded `name@version`."""
    settings: Settings = request.app.state.settings
    store: UploadStore = request.app.state.uploads
    async with request.form(max_files=1, max_fields=1) as form:
        manifest = _manifest(await _text(form.get("manifest"), "manifest"))
        if not replace:
            management.check_not_loaded(registry, manifest)  # before the file is staged
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidInput(
                "file: a required multipart/form-data file part is missing", field="file"
            )
        staging = await anyio.to_thread.run_sync(management.stage, store, manifest, upload.file)
    limits = management.UploadLimits(
        max_unpacked_bytes=4 * settings.max_upload_bytes,
        isolation=IsolationLimits(
            memory_bytes=settings.upload_check_memory_bytes,
            timeout_s=settings.upload_check_timeout_s,
        ),
    )
    loaded = await anyio.to_thread.run_sync(
        functools.partial(management.register, staging, registry, store, limits, replace=replace)
    )
    response.headers["Location"] = f"/models/{loaded.manifest.ref}"
    return model_info(loaded, registry)


@router.delete(
    "/models/{name}",
    response_model=ModelList,
    responses=_DELETE_ERRORS,
    operation_id="delete_model",
    summary="Unload a model (`name`: every version; `name@version`: one); needs the token",
)
async def delete_model(
    name: ModelRef, request: Request, registry: RegistryDep, _admin: AdminDep
) -> ModelList:
    """Unload a model at once; requests already running on it finish on it. An uploaded
    model's files are deleted too; a model from HESSIAN_MODELS_DIR is only unloaded (its
    folder is the operator's) and comes back at the next start."""
    store: UploadStore = request.app.state.uploads
    removed = await anyio.to_thread.run_sync(management.unregister, store, registry, name)
    return ModelList(models=[model_info(entry) for entry in removed])
