"""``GET /models`` and ``GET /models/{name}``: what is loaded, what it can do, what failed.

``{name}`` is a name (its latest version) or ``name@version``. Each loaded model carries
the capability report of its load-time probe (``hessian_service.repository.capabilities``).
"""

from __future__ import annotations

from fastapi import APIRouter

from hessian_service.api.deps import ModelRef, RegistryDep
from hessian_service.api.responses import problems
from hessian_service.serving.model_info import model_info
from hessian_service.wire.schemas import ModelInfo, ModelList

router = APIRouter(tags=["models"])


@router.get(
    "/models",
    response_model=ModelList,
    operation_id="list_models",
    summary="Loaded models (every version), their capabilities, and those that failed",
)
async def list_models(registry: RegistryDep) -> ModelList:
    loaded = [model_info(entry, registry) for entry in registry.entries()]
    failed = [model_info(entry) for entry in registry.failed.values()]
    return ModelList(models=[*loaded, *failed])


@router.get(
    "/models/{name}",
    response_model=ModelInfo,
    operation_id="get_model",
    responses=problems(
        404,
        422,
        503,
        s404="No model of that name, or no such version of it.",
        s422="`name` is not a model name or name@version.",
        s503="Models are still loading.",
    ),
    summary="One model (`name` or `name@version`) and its capability report",
)
async def get_model(name: ModelRef, registry: RegistryDep) -> ModelInfo:
    if name in registry.failed and name not in registry.models:
        return model_info(registry.failed[name])
    return model_info(registry.get(name), registry)
