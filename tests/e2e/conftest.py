"""A real uvicorn server on 127.0.0.1 for the end-to-end tests.

``server_url`` starts one server for the whole session; ``limited_server_url`` starts a
second one, for one module, with small body and result limits (the 413 paths). Every
client here talks to 127.0.0.1 only, with ``trust_env=False`` so that no proxy from the
environment is ever used.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from hessian_client.cli import ALLOCATOR_ENV
from tests.device import TEST_DEVICE

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
READY_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _server_env(settings: dict[str, str]) -> dict[str, str]:
    # Settings inherited from the caller's shell must not change what the tests see.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HESSIAN_")}
    env.update(ALLOCATOR_ENV)
    # The device under test: cpu unless the run asks for another (bench/gpu_check.sh).
    env.update({"HESSIAN_DEVICE": TEST_DEVICE, "PYTHONUNBUFFERED": "1"})
    env.update(settings)
    return env


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@contextmanager
def running_server(**settings: str) -> Iterator[str]:
    """Start ``uvicorn app.main:app`` on a free port, yield its base URL once it is ready.

    ``settings`` are extra environment variables (e.g. ``HESSIAN_MAX_BODY_BYTES``).
    Fails the test with the server's stderr if it exits or is not ready in 60 s.
    """
    port = free_port()
    url = f"http://{HOST}:{port}"
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "app.main:app",
        "--host",
        HOST,
        "--port",
        str(port),
        "--no-access-log",
    ]
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=_server_env(settings),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )

        def captured() -> str:
            stderr.seek(0)
            return stderr.read().decode(errors="replace")[-8000:]

        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            with httpx.Client(base_url=url, timeout=2.0, trust_env=False) as client:
                while True:
                    if process.poll() is not None:
                        pytest.fail(
                            f"the server exited with code {process.returncode} before it was "
                            f"ready; its stderr:\n{captured()}"
                        )
                    try:
                        if client.get("/health/ready").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline:
                        pytest.fail(
                            f"the server at {url} was not ready after {READY_TIMEOUT_S:.0f} s; "
                            f"its stderr:\n{captured()}"
                        )
                    time.sleep(0.1)
            yield url
        finally:
            _stop(process)


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
