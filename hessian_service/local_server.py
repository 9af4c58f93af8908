"""The service in a child process on this machine, for code that needs a real server
next to it: scripts, notebooks, the benchmarks (``bench/``) and the end-to-end tests.

``hessian-service serve`` (``make serve``) builds its command line and allocator
settings here too, so every way of starting the server runs the same thing.

    with local_server({"HESSIAN_MAX_BATCH_SIZE": "8"}) as url:
        Client(url).hessian(...)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from hessian_service.compute_env import with_compute_defaults

# glibc keeps freed pages with these: the vectorized derivative code otherwise spends
# most of its time in page faults (docs/engine.md, "The allocator settings"). glibc
# reads them at process start, so they go into the server's environment.
ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "1000000000000",
}
LOCALHOST = "127.0.0.1"


class ServerDidNotStart(RuntimeError):
    """The child exited, or did not answer ``/health/ready`` in time; the message ends
    with the tail of its stderr."""


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


# The event loop and HTTP parser the service is tested and measured with, named: uvicorn's
# "auto" takes uvloop and httptools wherever they are installed (the [ray] extra brings
# both), so the same command would otherwise run another stack in the dev venv than in the
# image (which has neither). Whether they measure better is the wire work's to show.
PROTOCOL_OPTIONS = ("--loop", "asyncio", "--http", "h11")


def uvicorn_command(host: str, port: int, options: Sequence[str] = ()) -> list[str]:
    """``python -m uvicorn hessian_service.main:app`` on ``host:port``, with uvicorn ``options``.

    ``python`` is this interpreter (``sys.executable``), so the server runs in the same
    environment as its caller -- a venv's ``bin/hessian-service`` serves that venv's
    packages whether or not the venv is activated.
    """
    command = [sys.executable, "-m", "uvicorn", "hessian_service.main:app", "--host", host]
    return [*command, "--port", str(port), *PROTOCOL_OPTIONS, *options]


def server_env(settings: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without its ``HESSIAN_*`` settings (so that a caller's
    shell cannot change what a started server does), plus the allocator settings and
    ``settings``, plus the OpenMP defaults (hessian_service/compute_env.py) where neither
    sets them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HESSIAN_")}
    return with_compute_defaults({**env, **ALLOCATOR_ENV, "PYTHONUNBUFFERED": "1", **settings})


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def wait_until_ready(
    process: subprocess.Popen[bytes], url: str, ready_timeout_s: float
) -> str | None:
    """Poll ``url``'s ``/health/ready`` until it answers 200 (None), the process exits or
    ``ready_timeout_s`` passes (then why, in words)."""
    deadline = time.monotonic() + ready_timeout_s
    with httpx.Client(base_url=url, timeout=2.0, trust_env=False) as client:
        while True:
            if process.poll() is not None:
                return f"the server exited with code {process.returncode} before it was ready"
            try:
                if client.get("/health/ready").status_code == 200:
                    return None
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                return f"the server at {url} was not ready after {ready_timeout_s:.0f} s"
            time.sleep(0.1)


@contextmanager
def local_server(
    settings: Mapping[str, str] | None = None,
    *,
    uvicorn_options: Sequence[str] = ("--no-access-log",),
    ready_timeout_s: float = 60.0,
    cwd: Path | None = None,
    launcher: Sequence[str] | None = None,
) -> Iterator[str]:
    """Start the service on a free port of 127.0.0.1 with ``HESSIAN_*`` ``settings`` and
    yield its base URL once ``/health/ready`` answers 200; stop it on exit.

    Raises ``ServerDidNotStart`` (with the server's stderr) if it exits first or is not
    ready within ``ready_timeout_s``. ``cwd`` is the server's working directory (this
    process's by default). ``launcher`` replaces ``python -m uvicorn
    hessian_service.main:app``: the command is ``[*launcher, "--host", host, "--port",
    port, *uvicorn_options]``, e.g. ``[".../bin/hessian-service", "serve"]`` to run an
    installed command (whose ``serve`` takes ``--no-access-log`` too).
    """
    with local_server_process(
        settings,
        uvicorn_options=uvicorn_options,
        ready_timeout_s=ready_timeout_s,
        cwd=cwd,
        launcher=launcher,
    ) as (url, _process):
        yield url


@contextmanager
def local_server_process(
    settings: Mapping[str, str] | None = None,
    *,
    uvicorn_options: Sequence[str] = ("--no-access-log",),
    ready_timeout_s: float = 60.0,
    cwd: Path | None = None,
    launcher: Sequence[str] | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``local_server``, yielding the server's process too (the soak reads its memory
    from ``/proc/<pid>``)."""
    port = free_port()
    url = f"http://{LOCALHOST}:{port}"
    if launcher is None:
        command = uvicorn_command(LOCALHOST, port, uvicorn_options)
    else:
        command = [*launcher, "--host", LOCALHOST, "--port", str(port), *uvicorn_options]
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=server_env(settings or {}),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )

        def failed(why: str) -> ServerDidNotStart:
            stderr.seek(0)
            tail = stderr.read().decode(errors="replace")[-8000:]
            return ServerDidNotStart(f"{why}; its stderr:\n{tail}")

        try:
            why_not = wait_until_ready(process, url, ready_timeout_s)
            if why_not is not None:
                raise failed(why_not)
            yield url, process
        finally:
            _stop(process)
