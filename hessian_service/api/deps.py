"""FastAPI dependencies: the app's registry and service, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from hessian_service.names import REF_PATTERN
from hessian_service.repository.registry import Registry
from hessian_service.serving.service import DerivativeService


def get_registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


def get_service(request: Request) -> DerivativeService:
    service: DerivativeService = request.app.state.service
    return service


RegistryDep = Annotated[Registry, Depends(get_registry)]
ServiceDep = Annotated[DerivativeService, Depends(get_service)]
# ``{name}`` in /models paths: ``name`` or ``name@version``; ``name@`` is a 422 naming
# it, not every version of ``name``.
ModelRef = Annotated[
    str, Path(pattern=REF_PATTERN, description="`name` (its latest version) or `name@version`.")
]
