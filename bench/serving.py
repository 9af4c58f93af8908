"""A real uvicorn server on 127.0.0.1 for the benchmarks, started and stopped here."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from hessian_client.cli import ALLOCATOR_ENV

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def server(**settings: str) -> Iterator[str]:
    """``uvicorn app.main:app`` on 127.0.0.1 with HESSIAN_* ``settings`` (ready in 60 s)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HESSIAN_")}
    env.update(ALLOCATOR_ENV)
    env.update({"HESSIAN_DEVICE": "cpu", "HESSIAN_ACCESS_LOG": "false", **settings})
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", HOST]
    command += ["--port", str(port), "--no-access-log", "--log-level", "warning"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode}")
            try:
                if httpx.get(f"{url}/health/ready", timeout=1, trust_env=False).is_success:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the benchmark server was not ready in 60 s")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
