"""FastAPI dependencies: the app's registry and service, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.registry import Registry
from app.service import DerivativeService


def get_registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


def get_service(request: Request) -> DerivativeService:
    service: DerivativeService = request.app.state.service
    return service


RegistryDep = Annotated[Registry, Depends(get_registry)]
ServiceDep = Annotated[DerivativeService, Depends(get_service)]
