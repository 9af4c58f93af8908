"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import RegistryDep
from app.schemas import HealthStatus

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live", response_model=HealthStatus, summary="The process is up")
async def live(registry: RegistryDep) -> HealthStatus:
    return HealthStatus(
        status="ok" if registry.ready else "loading",
        models_loaded=len(registry.models),
        models_failed=len(registry.failed),
    )


@router.get(
    "/ready",
    response_model=HealthStatus,
    responses={503: {"description": "Models are still loading."}},
    summary="Models are loaded and requests can be served",
)
async def ready(registry: RegistryDep) -> JSONResponse:
    status = await live(registry)
    return JSONResponse(status.model_dump(), status_code=200 if registry.ready else 503)
