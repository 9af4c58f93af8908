"""Liveness and readiness probes.

``/health/live``: the process answers (and how loading went). ``/health/ready``: models
can serve, as ``HESSIAN_READY_REQUIRES`` defines it (``repository.readiness``); otherwise 503
problem+json naming every model folder that failed to load and why.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from hessian_service.api.deps import RegistryDep
from hessian_service.api.responses import problems
from hessian_service.errors import NotReady
from hessian_service.repository.readiness import readiness
from hessian_service.wire.schemas import HealthStatus

router = APIRouter(prefix="/health", tags=["health"])


@router.get(
    "/live", response_model=HealthStatus, operation_id="health_live", summary="The process is up"
)
async def live(registry: RegistryDep) -> HealthStatus:
    return HealthStatus(
        status="ok" if registry.ready else "loading",
        models_loaded=len(registry.models),
        models_failed=len(registry.failed),
    )


@router.get(
    "/ready",
    response_model=HealthStatus,
    operation_id="health_ready",
    responses=problems(
        503,
        s503="Not ready: loading, no model can serve, or (HESSIAN_READY_REQUIRES=all) a "
        "model folder failed; `failed` lists each folder and its error.",
    ),
    summary="Models can serve requests (at least one, or every one by HESSIAN_READY_REQUIRES)",
)
async def ready(request: Request, registry: RegistryDep) -> HealthStatus:
    state = readiness(registry, request.app.state.settings.ready_requires)
    if not state.ready:
        raise NotReady(
            state.detail,
            models_loaded=state.loaded,
            models_failed=len(state.failed),
            failed=[{"name": entry.name, "error": entry.error} for entry in state.failed],
        )
    return await live(registry)
