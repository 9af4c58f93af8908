"""Whether the service can serve: what ``/health/ready`` and ``/v2/health/ready`` answer.

Ready means models can serve, not merely that loading has finished: with
``HESSIAN_READY_REQUIRES=any`` (the default) at least one model is loaded; with ``all``
every model folder that was found is loaded and none failed. A server whose models
folder is empty, or whose every model folder is broken, is live but not ready, so that
an orchestrator does not send it traffic it can only answer with 404.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hessian_service.repository.registry import FailedModel, Registry

ReadyRequires = Literal["any", "all"]


@dataclass(frozen=True)
class Readiness:
    """The answer, and what it rests on."""

    ready: bool
    detail: str
    loaded: int  # model names with at least one loaded version
    failed: list[FailedModel]


def _failures(failed: list[FailedModel]) -> str:
    return "; ".join(f"{entry.name}: {entry.error}" for entry in failed)


def readiness(registry: Registry, requires: ReadyRequires) -> Readiness:
    """Ready or not under ``requires``; ``detail`` says why, naming every failed folder."""
    failed = list(registry.failed.values())
    loaded = len(registry.models)
    if not registry.ready:
        return Readiness(False, "models are still loading", loaded, failed)
    if loaded == 0 and not failed:
        detail = (
            "no model can serve: none is loaded and none failed to load (an empty models "
            "folder, or every model deleted)"
        )
        return Readiness(False, detail, loaded, failed)
    if loaded == 0:
        detail = (
            f"no model can serve: every model folder failed to load ({len(failed)}): "
            f"{_failures(failed)}"
        )
        return Readiness(False, detail, loaded, failed)
    if requires == "all" and failed:
        detail = (
            f"HESSIAN_READY_REQUIRES=all, and {len(failed)} model folder(s) failed to load "
            f"({loaded} loaded): {_failures(failed)}"
        )
        return Readiness(False, detail, loaded, failed)
    return Readiness(True, f"{loaded} model(s) can serve", loaded, failed)
