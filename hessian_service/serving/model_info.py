"""A loaded (or failed) model as the API describes it: manifest, device, capability report.

The one mapping from the repository's records (``LoadedModel``, ``FailedModel``, the
probe's ``Capabilities``) to the wire's ``ModelInfo``, shared by ``GET /models`` and the
model-management answers.
"""

from __future__ import annotations

from dataclasses import asdict

from hessian_service.repository.registry import FailedModel, LoadedModel, Registry
from hessian_service.wire.schemas import CapabilityReport, ModelInfo


def _report(entry: LoadedModel) -> CapabilityReport | None:
    found = entry.capabilities
    if found is None:
        return None
    return CapabilityReport.model_validate(
        {**asdict(found), "curvature": found.curvature.value, "hessian_zero": found.hessian_zero}
    )


def model_info(entry: LoadedModel | FailedModel, registry: Registry | None = None) -> ModelInfo:
    """The public description of a loaded or failed model."""
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
    latest = registry.models.get(manifest.name) is entry if registry is not None else None
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
        format=manifest.format,
        latest=latest,
        source=entry.source,
        capabilities=_report(entry),
    )
