"""End-to-end part of the benchmark: /hessian through a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import base64
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import torch

from app import engine
from app.api.examples import digit_image
from bench.run import bundled


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def uvicorn_server() -> Iterator[str]:
    """A real server on 127.0.0.1 (bounded: 60 s to get ready), stopped on exit."""
    port = _free_port()
    env = {**os.environ, "HESSIAN_DEVICE": "cpu"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health/ready", timeout=1, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise RuntimeError("the benchmark server did not become ready in 60 s")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def end_to_end(repeats: int) -> dict[str, float]:
    """Median ms of one digits_cnn /hessian in JSON and base64, and the engine alone."""
    image = np.asarray(digit_image(), dtype=np.float32)
    x = torch.from_numpy(image).reshape(1, 1, 28, 28)
    model = bundled("digits_cnn")
    engine_ms = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        engine.hessian(model, x, output_index=2)
        engine_ms.append((time.perf_counter() - start) * 1000)
    figures: dict[str, float] = {"http/engine_alone_ms": round(statistics.median(engine_ms[1:]), 3)}
    with uvicorn_server() as url, httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
        for encoding in ("json", "base64"):
            body = {
                "model": "digits_cnn",
                "inputs": [
                    {
                        "name": "x",
                        "shape": [1, 1, 28, 28],
                        "datatype": "FP32",
                        "data": base64.b64encode(image.tobytes()).decode(),
                    }
                ],
                "output_index": 2,
                "encoding": encoding,
            }
            times = []
            for attempt in range(repeats + 1):
                start = time.perf_counter()
                response = client.post("/hessian", json=body)
                if encoding == "json":
                    matrix = np.asarray(response.json()["outputs"][0]["data"], dtype=np.float32)
                else:
                    data = response.json()["outputs"][0]["data"]
                    matrix = np.frombuffer(base64.b64decode(data), dtype="<f4")
                elapsed = (time.perf_counter() - start) * 1000
                response.raise_for_status()
                assert matrix.size == 784 * 784
                if attempt:
                    times.append(elapsed)
            ms = statistics.median(times)
            figures[f"http/{encoding}_ms"] = round(ms, 3)
            figures[f"http/{encoding}_over_engine"] = round(ms / figures["http/engine_alone_ms"], 2)
            figures[f"http/{encoding}_response_mb"] = round(len(response.content) / 2**20, 2)
    return figures
