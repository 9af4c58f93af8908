"""The FastAPI application: settings -> registry -> service -> routes.

``create_app(settings)`` builds one app; the lifespan loads the models; one handler turns
every ``ServiceError`` into problem+json; the Swagger UI's assets are served from the
package (fastapi-offline) so ``/docs`` works with no internet.
"""

from __future__ import annotations

# ruff: noqa: E402 -- the OpenMP defaults must be set before the imports below load torch.
# First, before torch is imported: libgomp reads OMP_WAIT_POLICY once, when torch loads it,
# and its spin-waiting default collapses latency beside a busy neighbour
# (hessian_service/compute_env.py). The user's environment wins; if torch is already
# imported (a launcher imported it first), a warning says the defaults cannot apply.
from hessian_service.compute_env import apply_compute_defaults

apply_compute_defaults()

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from hessian_service.api.middleware import BodySizeLimit
from hessian_service.api.observability import ObservabilityMiddleware, configure_access_log
from hessian_service.api.responses import install_problem_schemas
from hessian_service.api.routes import (
    admin,
    derivatives,
    health,
    jobs,
    metrics,
    models,
    operators,
    playground,
    umbridge,
    v2,
)
from hessian_service.config import Settings
from hessian_service.errors import (
    PROBLEM_CONTENT_TYPE,
    ServiceError,
    problem,
    problem_of,
    status_of,
)
from hessian_service.metrics import Metrics
from hessian_service.repository.registry import Registry, resolve_device
from hessian_service.repository.uploads import UploadStore
from hessian_service.serving.jobs import JobLimits, JobState, JobStore
from hessian_service.serving.service import DerivativeService
from hessian_service.wire import codec, umbridge_schemas
from hessian_service.wire.fields import field_name

logger = logging.getLogger("hessian_service")

DESCRIPTION = """
Exact Jacobian and Hessian matrices of neural-network outputs (or of a loss built on
them) with respect to the network's **inputs**.

Send a model name and an input tensor (Open Inference Protocol layout, numbers or
base64); get back the matrix, the model's output, and how it was computed. Affine models
give exact zeros with a note instead of an autograd error; ReLU networks say that their
Hessian is zero almost everywhere.
"""


def _problem_response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Response:
    return Response(
        codec.dumps(body), status_code=status, media_type=PROBLEM_CONTENT_TYPE, headers=headers
    )


def _validation_error(error: dict[str, Any], body: Any) -> dict[str, str]:
    loc = tuple(error.get("loc", ()))
    if error.get("type") == "json_invalid":  # loc is ("body", <character offset>)
        reason = error.get("ctx", {}).get("error", "")
        offset = loc[1] if len(loc) > 1 else "?"
        return {"field": "body", "message": f"invalid JSON at character {offset}: {reason}"}
    return {"field": field_name(loc, body), "message": error.get("msg", "")}


def is_oip_path(path: str) -> bool:
    """Open Inference Protocol paths: their errors are ``{"error": ...}``, not problem+json."""
    return path == "/v2" or path.startswith("/v2/")


def _matches(template: str, path: str) -> bool:
    """``/models/{name}`` matches ``/models/quadratic4``: segment by segment, a
    ``{parameter}`` standing for any non-empty segment."""
    want, got = template.split("/"), path.split("/")
    return len(want) == len(got) and all(
        w == g or (w.startswith("{") and w.endswith("}") and g != "")
        for w, g in zip(want, got, strict=True)
    )


def _allowed_methods(request: Request) -> str:
    """Every method the API serves at this path, from the OpenAPI document's paths:
    Starlette's 405 lists only the first route that matched the path (``GET`` for
    ``/models``, though ``POST`` is served too)."""
    paths: dict[str, dict[str, Any]] = request.app.openapi().get("paths", {})
    methods: set[str] = set()
    for template, operations in paths.items():
        if _matches(template, request.url.path):
            methods |= {method.upper() for method in operations}
    return ", ".join(sorted(methods))


def _http_error_text(request: Request, exc: StarletteHTTPException) -> tuple[str, str | None]:
    """What an HTTP-level error (no route, wrong method, unreadable body) says, and its field."""
    method, path = request.method, request.url.path
    if exc.status_code == 404:
        return f"no route {method} {path}; the routes are listed at /docs", "path"
    if exc.status_code == 405:
        allowed = _allowed_methods(request) or (exc.headers or {}).get("Allow", "")
        return f"{method} is not allowed on {path}; allowed: {allowed}", "method"
    if exc.status_code == 400:
        return f"body: {exc.detail}", "body"
    return str(exc.detail), None


def install_error_handlers(app: FastAPI) -> None:
    """One handler per error family, all answering RFC 9457 problem+json (``/v2`` paths
    that no route matched: the protocol's ``{"error": ...}``)."""

    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, exc: ServiceError) -> Response:
        return _problem_response(status_of(exc), problem_of(exc), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> Response:
        errors = [_validation_error(e, exc.body) for e in exc.errors()]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        field = errors[0]["field"] if errors else "body"
        return _problem_response(
            422, problem(422, "Invalid input", detail, field=field, errors=errors)
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # A 405 must say what is allowed (RFC 9110 15.5.6): Starlette's Allow, completed.
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
        detail, field = _http_error_text(request, exc)
        if is_oip_path(request.url.path):
            return JSONResponse({"error": detail}, status_code=exc.status_code, headers=headers)
        if request.url.path in umbridge_schemas.PATHS:  # what UM-Bridge's clients read
            body = umbridge_schemas.error_body("InvalidInput", detail)
            return JSONResponse(body, status_code=exc.status_code, headers=headers)
        title = {400: "Bad request", 404: "Not found", 405: "Method not allowed"}.get(
            exc.status_code, "HTTP error"
        )
        body = problem(exc.status_code, title, detail, field=field)
        return _problem_response(exc.status_code, body, headers)

    @app.exception_handler(torch.OutOfMemoryError)
    async def out_of_memory(request: Request, exc: torch.OutOfMemoryError) -> Response:
        detail = "the device ran out of memory; retry with a smaller batch"
        if is_oip_path(request.url.path):
            return JSONResponse({"error": detail}, status_code=503)
        if request.url.path in umbridge_schemas.PATHS:
            return JSONResponse(umbridge_schemas.error_body("Overloaded", detail), 503)
        return _problem_response(503, problem(503, "Overloaded", detail))


def freeze_startup_heap() -> None:
    """Collect once, then move every object alive after start-up (torch, FastAPI, the
    loaded models: about 330,000 tracked objects) out of the garbage collector's reach.

    A full collection walks them all holding the GIL, 195 ms here, on whichever thread
    happens to trigger it; while four clients sent 1.8 MiB JSON bodies, one
    ``/health/live`` probe waited 385 ms. After the freeze a full collection only walks
    what requests allocate (0.0 ms at rest). Frozen objects are still freed by reference
    counting; only cycles among them would wait, and start-up leaves none (collected
    first)."""
    gc.collect()
    gc.freeze()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the application; models load in the lifespan, before the first request."""
    settings = settings or Settings()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    registry = Registry(resolve_device(settings.device))
    metrics_ = Metrics(registry.device)
    service = DerivativeService(registry, settings, metrics=metrics_)
    if settings.access_log:
        configure_access_log()
    uploads = UploadStore(settings.upload_dir)
    job_store = JobStore(
        service,
        JobLimits.from_settings(settings),
        folder=settings.job_dir,
        on_finish=lambda job: metrics_.jobs_finished.labels(job.operation, str(job.state)).inc(),
    )
    metrics_.bind_jobs(job_store.counts, [str(state) for state in JobState])

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        registry.load_dir(settings.models_dir)
        uploads.start()
        # Uploaded models (HESSIAN_UPLOAD_DIR) win over a models_dir folder of the same
        # name@version: the operator replaced it through the admin API.
        registry.load_dir(uploads.root, source="upload", replace=True)
        logger.info(
            "%d models loaded, %d failed, on %s",
            len(registry.models),
            len(registry.failed),
            registry.device,
        )
        job_store.start()  # reloads HESSIAN_JOB_DIR, if set
        freeze_startup_heap()
        yield
        job_store.close()
        service.close()
        uploads.close()

    app = FastAPIOffline(
        title="hessian-service",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.service = service
    app.state.uploads = uploads
    app.state.jobs = job_store
    app.state.metrics = metrics_
    app.include_router(derivatives.router)
    for router in operators.routers:
        app.include_router(router)
    app.include_router(jobs.submit_router)
    app.include_router(jobs.router)
    app.include_router(models.router)
    app.include_router(admin.router)
    app.include_router(health.router)
    app.include_router(v2.router)
    app.include_router(umbridge.router)
    app.include_router(metrics.router)
    app.include_router(playground.router)
    install_error_handlers(app)
    install_problem_schemas(app)
    app.add_middleware(
        BodySizeLimit,
        limit=settings.max_body_bytes,
        path_limits={("POST", "/models"): settings.max_upload_bytes},
    )
    # Added last, so outermost: even a 413 from BodySizeLimit gets its id and headers.
    app.add_middleware(ObservabilityMiddleware, metrics=metrics_, access_log=settings.access_log)
    return app


app = create_app()
