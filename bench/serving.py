"""A real uvicorn server on 127.0.0.1 for the benchmarks, started and stopped here."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hessian_service.local_server import local_server_process

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def server(**settings: str) -> Iterator[str]:
    """``uvicorn hessian_service.main:app`` on 127.0.0.1 with HESSIAN_* ``settings`` (ready
    in 60 s), on the CPU and without access logs, which would be timed with the requests."""
    with server_process(**settings) as (url, _process):
        yield url


@contextmanager
def server_process(**settings: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``server``, yielding the server's process too (for its memory in ``/proc``)."""
    quiet = {"HESSIAN_DEVICE": "cpu", "HESSIAN_ACCESS_LOG": "false", **settings}
    options = ("--no-access-log", "--log-level", "warning")
    with local_server_process(quiet, uvicorn_options=options, cwd=ROOT) as started:
        yield started
