"""A real uvicorn server on 127.0.0.1 for the end-to-end tests.

``server_url`` starts one server for the whole session; ``limited_server_url`` starts a
second one, for one module, with small body and result limits (the 413 paths). Every
client here talks to 127.0.0.1 only, with ``trust_env=False`` so that no proxy from the
environment is ever used.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from hessian_service.local_server import ServerDidNotStart, local_server
from tests.device import TEST_DEVICE
from tests.e2e.browser import missing

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def running_server(**settings: str) -> Iterator[str]:
    """Start ``uvicorn hessian_service.main:app`` on a free port; yield its URL once it is ready.

    ``settings`` are extra environment variables (e.g. ``HESSIAN_MAX_BODY_BYTES``); the
    device is the one under test. Fails the test with the server's stderr if it exits
    or is not ready in 60 s.
    """
    try:
        # No background compiles of hot Laplacian passes beside the tests (tests/conftest.py).
        defaults = {"HESSIAN_DEVICE": TEST_DEVICE, "HESSIAN_COMPILE_AFTER": "0"}
        with local_server({**defaults, **settings}, cwd=ROOT) as url:
            yield url
    except ServerDidNotStart as error:
        pytest.fail(str(error))


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """Base URL of a server with the default settings, shared by the whole session."""
    with running_server() as url:
        yield url


@pytest.fixture(scope="session")
def client(server_url: str) -> Iterator[httpx.Client]:
    """An httpx client bound to ``server_url`` (never a proxy, generous timeout)."""
    with httpx.Client(base_url=server_url, timeout=120.0, trust_env=False) as http:
        yield http


LIMITED_MAX_BODY_BYTES = 200_000
LIMITED_MAX_RESULT_BYTES = 1_000_000


@pytest.fixture(scope="module")
def limited_server_url() -> Iterator[str]:
    """A second server whose body limit is 200 kB and whose result limit is 1 MB."""
    with running_server(
        HESSIAN_MAX_BODY_BYTES=str(LIMITED_MAX_BODY_BYTES),
        HESSIAN_MAX_RESULT_BYTES=str(LIMITED_MAX_RESULT_BYTES),
    ) as url:
        yield url


@pytest.fixture(scope="module")
def chromium() -> str:
    """The path of Debian's chromium (``make browser`` installs it)."""
    path = shutil.which("chromium")
    if path is None:
        missing("chromium is not on PATH")
    return path
