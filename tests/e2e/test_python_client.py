"""hessian_client.Client and AsyncClient against a real server on 127.0.0.1.

The client's binary Hessian equals the server's JSON answer bit for bit; binary bodies
are at least 3x smaller than JSON and faster end to end; errors carry the server's
problem details; 429/503 and lost connections are retried with backoff.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
import torch
from hessian_client import AsyncClient, Client, HessianServiceError

from hessian_service.local_server import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def hc(server_url: str) -> Iterator[Client]:
    with Client(server_url, trust_env=False) as client:
        yield client


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 28, 28), dtype=np.float32)


def json_hessian(server_url: str, x: np.ndarray, **extra: object) -> np.ndarray:
    """The server's JSON answer, read without the client under test."""
    body = {
        "model": "digits_cnn",
        "inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        ],
        "output_index": 2,
        "encoding": "json",
        **extra,
    }
    response = httpx.post(f"{server_url}/hessian", json=body, timeout=120, trust_env=False)
    assert response.status_code == 200, response.text
    hessian = response.json()["outputs"][0]
    dtype = np.float64 if hessian["datatype"] == "FP64" else np.float32
    return np.asarray(hessian["data"], dtype=dtype).reshape(hessian["shape"])


def test_hessian_is_a_tensor_equal_to_the_json_answer_bit_for_bit(
    hc: Client, server_url: str
) -> None:
    x = image()
    hessian = hc.hessian("digits_cnn", x, output_index=2)
    assert isinstance(hessian, torch.Tensor)
    assert hessian.shape == (784, 784) and hessian.dtype == torch.float32
    reference = json_hessian(server_url, x)
    assert np.array_equal(hessian.numpy().view(np.uint32), reference.view(np.uint32))
    # numpy on request, a torch input, float64 and a batch: still the JSON answer's bits
    as_numpy = hc.hessian("digits_cnn", torch.from_numpy(x), output_index=2, as_numpy=True)
    assert isinstance(as_numpy, np.ndarray) and np.array_equal(as_numpy, reference)
    batch = np.stack([image(1), image(2)])
    float64 = hc.hessian("digits_cnn", batch, output_index=2, precision="float64", as_numpy=True)
    assert float64.shape == (2, 784, 784) and float64.dtype == np.float64
    assert np.array_equal(float64, json_hessian(server_url, batch, precision="float64"))


def test_jacobian_models_health_and_full_results(hc: Client) -> None:
    x = 2 * np.ones(4, dtype=np.float32)
    assert np.array_equal(hc.jacobian("quadratic4", x, as_numpy=True), np.diag([0, 4, 8, 12]))
    result = hc.compute("hessian", "quadratic4", x, output_index=2)
    assert np.array_equal(result.value, np.diag([0.0, 0.0, 4.0, 0.0]))
    assert np.array_equal(result.output, x * x * np.arange(4))
    assert result.metadata["batch_size"] is None and result.model_version == "1"
    names = {model["name"] for model in hc.models()}
    assert {"digits_cnn", "mlp_tanh", "quadratic4"} <= names
    assert hc.model("mlp_tanh")["input_shape"] == [1, 28, 28]
    health = hc.health()
    assert health["ready"] is True and health["status"] == "ok"


def test_errors_carry_the_problem_details(hc: Client) -> None:
    with pytest.raises(HessianServiceError) as unknown:
        hc.hessian("no_such_model", image())
    assert unknown.value.status == 404
    assert unknown.value.field == "model"
    assert "no_such_model" in unknown.value.detail
    with pytest.raises(HessianServiceError) as out_of_range:
        hc.hessian("digits_cnn", image(), output_index=10)
    assert out_of_range.value.status == 422
    assert out_of_range.value.problem["field"] == "output_index"
    assert "out of range" in str(out_of_range.value)


def test_async_client_gives_the_same_bits(hc: Client, server_url: str) -> None:
    x = image(3)

    async def both() -> list[np.ndarray]:
        async with AsyncClient(server_url, trust_env=False) as client:
            assert (await client.health())["ready"]
            assert {m["name"] for m in await client.models()} >= {"digits_cnn"}
            return list(
                await asyncio.gather(
                    client.hessian("digits_cnn", x, output_index=2, as_numpy=True),
                    client.jacobian("digits_cnn", x, as_numpy=True),
                )
            )

    hessian, jacobian = asyncio.run(both())
    assert np.array_equal(hessian, hc.hessian("digits_cnn", x, output_index=2, as_numpy=True))
    assert jacobian.shape == (10, 784)
    assert np.array_equal(jacobian, hc.jacobian("digits_cnn", x, as_numpy=True))


def test_binary_is_3x_smaller_than_json_and_faster_end_to_end(server_url: str) -> None:
    """One dense 784x784 Hessian (mlp_tanh): body size, and request-to-numpy time
    (medians of 5). A CNN's Hessian is mostly exact zeros, which JSON writes in 4 bytes
    ("0.0,"): there binary is about 1.2x smaller (bench/server.py reports both)."""
    x = image(4)
    body = {
        "model": "mlp_tanh",
        "inputs": [
            {"name": "x", "shape": [1, 28, 28], "datatype": "FP32", "data": x.ravel().tolist()}
        ],
        "output_index": 2,
    }
    sizes: dict[str, int] = {}
    times: dict[str, list[float]] = {"json": [], "binary": []}
    with Client(server_url, trust_env=False) as client:
        for _ in range(6):
            for encoding in ("json", "binary"):
                start = time.perf_counter()
                response = client.request("POST", "/hessian", json={**body, "encoding": encoding})
                if encoding == "json":
                    matrix = np.asarray(response.json()["outputs"][0]["data"], dtype=np.float32)
                else:
                    length = int(response.headers["Inference-Header-Content-Length"])
                    matrix = np.frombuffer(response.content, "<f4", 784 * 784, length)
                times[encoding].append(time.perf_counter() - start)
                assert matrix.size == 784 * 784
                sizes[encoding] = len(response.content)
    assert sizes["binary"] < 784 * 784 * 4 + 2000  # the raw bytes and a small header
    assert sizes["json"] >= 3 * sizes["binary"], sizes
    json_s, binary_s = (statistics.median(times[k][1:]) for k in ("json", "binary"))
    assert binary_s < json_s, (binary_s, json_s)


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503 (Retry-After: 1) or 429 ``failures`` times, then 200."""

    failures = 2
    status = 503
    seen: list[float] = []  # noqa: RUF012 - one test at a time

    def do_GET(self) -> None:
        _Flaky.seen.append(time.monotonic())
        if len(_Flaky.seen) <= _Flaky.failures:
            body = b'{"title": "Overloaded", "status": 503, "detail": "busy"}'
            self.send_response(_Flaky.status)
            self.send_header("Retry-After", "1")
        else:
            body = b'{"models": [{"name": "m"}]}'
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky_url() -> Iterator[str]:
    _Flaky.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status", [503, 429])
def test_429_and_503_are_retried_after_retry_after(flaky_url: str, status: int) -> None:
    _Flaky.status = status
    with Client(flaky_url, retries=3, backoff=0.01, trust_env=False) as client:
        assert client.models() == [{"name": "m"}]
    gaps = np.diff(_Flaky.seen)
    assert len(_Flaky.seen) == 3 and all(gap >= 0.95 for gap in gaps), gaps
    _Flaky.seen = []
    with (
        Client(flaky_url, retries=1, backoff=0.01, trust_env=False) as client,
        pytest.raises(HessianServiceError) as exhausted,
    ):
        client.models()
    assert exhausted.value.status == status and exhausted.value.detail == "busy"


def test_lost_connections_are_retried_then_reported() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with (
        Client(url, retries=3, backoff=0.2, trust_env=False) as client,
        pytest.raises(HessianServiceError) as refused,
    ):
        client.models()
    waited = time.monotonic() - start
    assert refused.value.status is None
    assert "ConnectError" in str(refused.value) and "after 4 tries" in str(refused.value)
    assert waited >= (0.2 + 0.4 + 0.8) / 2  # full jitter: at least half of each backoff
