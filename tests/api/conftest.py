"""The real application, in process (no mocks): one app for the module's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from hessian_service.config import Settings
from hessian_service.main import create_app
from tests.device import TEST_DEVICE


@pytest.fixture(scope="session")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(device=TEST_DEVICE))) as test_client:
        yield test_client
