"""``GET /models`` and ``GET /models/{name}``: what is loaded, and what failed."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import RegistryDep
from app.errors import NotFound
from app.registry import FailedModel, LoadedModel, Registry
from app.schemas import ModelInfo, ModelList

router = APIRouter(tags=["models"])


def _info(entry: LoadedModel | FailedModel) -> ModelInfo:
    if isinstance(entry, FailedModel):
        return ModelInfo(
            name=entry.name,
            version="",
            description="",
            input_shape=[],
            output_shape=[],
            device=None,
            ready=False,
            error=entry.error,
        )
    manifest = entry.manifest
    return ModelInfo(
        name=manifest.name,
        version=manifest.version,
        description=manifest.description,
        input_shape=manifest.input_shape,
        output_shape=manifest.output_shape,
        device=str(entry.device),
        ready=True,
        curvature=entry.curvature.value,
        training=manifest.training,
    )


def _entries(registry: Registry) -> list[LoadedModel | FailedModel]:
    return [*registry.models.values(), *registry.failed.values()]


@router.get("/models", response_model=ModelList, summary="Loaded models, and those that failed")
async def list_models(registry: RegistryDep) -> ModelList:
    return ModelList(models=[_info(entry) for entry in _entries(registry)])


@router.get("/models/{name}", response_model=ModelInfo, summary="One model")
async def get_model(name: str, registry: RegistryDep) -> ModelInfo:
    if name in registry.failed:
        return _info(registry.failed[name])
    if name not in registry.models:
        raise NotFound(f"model {name!r} is not loaded", field="name")
    return _info(registry.models[name])
