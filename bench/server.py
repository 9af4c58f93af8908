"""End-to-end part of the benchmark: /hessian through a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import base64
import statistics
import time

import httpx
import numpy as np
import torch

from bench.models import bundled
from bench.serving import server
from hessian_service import engine
from hessian_service.api.examples import digit_image


def _decode(response: httpx.Response, encoding: str) -> np.ndarray:
    """The Hessian of a response, as a float32 array, the way a client reads it."""
    if encoding == "binary":
        length = int(response.headers["Inference-Header-Content-Length"])
        return np.frombuffer(response.content, dtype="<f4", count=784 * 784, offset=length)
    data = response.json()["outputs"][0]["data"]
    if encoding == "json":
        return np.asarray(data, dtype=np.float32)
    return np.frombuffer(base64.b64decode(data), dtype="<f4")


def _time_encodings(
    client: httpx.Client, model: str, image: np.ndarray, repeats: int
) -> dict[str, float]:
    """Median ms from request to numpy array, and the body's MB, per encoding."""
    figures: dict[str, float] = {}
    for encoding in ("json", "base64", "binary"):
        body = {
            "model": model,
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
            matrix = _decode(response, encoding)
            elapsed = (time.perf_counter() - start) * 1000
            response.raise_for_status()
            assert matrix.size == 784 * 784
            if attempt:
                times.append(elapsed)
        figures[f"{encoding}_ms"] = round(statistics.median(times), 3)
        figures[f"{encoding}_response_mb"] = round(len(response.content) / 2**20, 3)
    for other in ("json", "base64"):
        figures[f"{other}_over_binary_time"] = round(
            figures[f"{other}_ms"] / figures["binary_ms"], 2
        )
        figures[f"{other}_over_binary_size"] = round(
            figures[f"{other}_response_mb"] / figures["binary_response_mb"], 2
        )
    return figures


def end_to_end(repeats: int) -> dict[str, float]:
    """Median ms of one digits_cnn /hessian in JSON, base64 and binary, and the engine
    alone; the same encodings for mlp_tanh, whose Hessian is dense (a CNN's is mostly
    exact zeros, which JSON writes in four bytes)."""
    image = np.asarray(digit_image(), dtype=np.float32)
    x = torch.from_numpy(image).reshape(1, 1, 28, 28)
    model = bundled("digits_cnn")
    engine_ms = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        engine.hessian(model, x, output_index=2)
        engine_ms.append((time.perf_counter() - start) * 1000)
    engine_alone = round(statistics.median(engine_ms[1:]), 3)
    figures: dict[str, float] = {"http/engine_alone_ms": engine_alone}
    with server() as url, httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
        for name in ("digits_cnn", "mlp_tanh"):
            measured = _time_encodings(client, name, image, repeats)
            prefix = "http/" if name == "digits_cnn" else f"http/{name}/"
            figures.update({f"{prefix}{key}": value for key, value in measured.items()})
        for encoding in ("json", "base64", "binary"):
            figures[f"http/{encoding}_over_engine"] = round(
                figures[f"http/{encoding}_ms"] / engine_alone, 2
            )
    return figures
