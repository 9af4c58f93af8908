"""Many clients at once against a real uvicorn: batching, backpressure, metrics, liveness.

References are the same requests computed alone by the engine in this process (the
unbatched answer): 1e-5 relative in float32, 1e-12 in float64. Counts and times are
bounded: at most 64 concurrent clients, each test well under a minute.
"""

from __future__ import annotations

import base64
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from hessian_service.config import BUNDLED_MODELS_DIR
from hessian_service.engine import Objective, compute_hessian, compute_jacobian
from hessian_service.repository.registry import LoadedModel, load_model
from tests.device import TEST_DEVICE
from tests.e2e.conftest import running_server

pytestmark = pytest.mark.e2e

BUSY_QUEUE = 8
BUSY_TIMEOUT_S = 4.0


@pytest.fixture(scope="module")
def batching_url() -> Iterator[str]:
    """Batching on (the defaults), with 20 ms to gather company so that merging is sure."""
    with running_server(HESSIAN_MAX_BATCH_DELAY_MS="20") as url:
        yield url


@cache
def model(name: str) -> LoadedModel:
    return load_model(BUNDLED_MODELS_DIR / name, torch.device("cpu"))


def sample(shape: list[int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def body(model_name: str, x: np.ndarray, **fields: Any) -> dict[str, Any]:
    tensor = {
        "name": "x",
        "shape": list(x.shape),
        "datatype": "FP32",
        "data": base64.b64encode(x.tobytes()).decode(),
    }
    return {"model": model_name, "inputs": [tensor], "encoding": "base64", **fields}


def decoded(response: httpx.Response) -> tuple[np.ndarray, np.ndarray]:
    assert response.status_code == 200, response.text[:1000]
    arrays = []
    for obj in response.json()["outputs"]:
        dtype = {"FP32": "<f4", "FP64": "<f8"}[obj["datatype"]]
        arrays.append(np.frombuffer(base64.b64decode(obj["data"]), dtype).reshape(obj["shape"]))
    return arrays[0], arrays[1]


def reference(kind: str, request: dict[str, Any]) -> np.ndarray:
    """The request computed alone by the engine, shaped as the service returns it."""
    loaded = model(request["model"])
    dtype = torch.float64 if request.get("precision") == "float64" else torch.float32
    tensor = request["inputs"][0]
    raw = np.frombuffer(base64.b64decode(tensor["data"]), "<f4").reshape(tensor["shape"])
    batched = len(tensor["shape"]) == len(loaded.manifest.input_shape) + 1
    x = torch.from_numpy(raw.copy()).to(dtype)
    x = x if batched else x.unsqueeze(0)
    spec = request.get("objective")
    objective = None
    if spec is not None:
        target = spec.get("target")
        objective = Objective(
            spec["type"],
            index=spec.get("index"),
            target=None if target is None else torch.tensor(target),
        )
    function = compute_hessian if kind == "hessian" else compute_jacobian
    result = function(
        loaded.for_dtype(dtype), x, output_index=request.get("output_index"), objective=objective
    )
    matrix = result.matrix[:, 0] if result.squeeze_scalars else result.matrix
    return (matrix if batched else matrix[0]).numpy()


def mixed_requests() -> list[tuple[str, dict[str, Any]]]:
    """48 requests: output indices, objectives, precisions, batch sizes, two models."""
    one, two = [1, 28, 28], [2, 1, 28, 28]
    requests: list[tuple[str, dict[str, Any]]] = []
    for i in range(48):
        precision = "float64" if i % 3 == 0 else "float32"
        shape = two if i % 5 == 0 else one
        x = sample(shape, seed=i)
        batch = shape[0] if shape == two else 1
        variant = i % 8
        fields: dict[str, Any] = {"precision": precision}
        if variant in (0, 1, 2):
            kind, fields["output_index"] = "hessian", variant  # three outputs, mixed
        elif variant == 3:
            kind, fields["objective"] = "hessian", {"type": "log_softmax", "index": i % 10}
        elif variant == 4:
            target = [float(v) for v in sample([batch * 10], seed=100 + i)]
            kind, fields["objective"] = "hessian", {"type": "mse", "target": target}
        elif variant == 5:
            classes = [(i + j) % 10 for j in range(batch)]
            kind, fields["objective"] = "hessian", {"type": "cross_entropy", "target": classes}
        elif variant == 6:
            kind = "jacobian"
        else:
            kind, fields["output_index"] = "jacobian", [i % 10, (i + 3) % 10]
        requests.append((kind, body("mlp_tanh", x, **fields)))
    return requests


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics parsed by the Prometheus client's own parser: {(sample, labels): value}."""
    response = httpx.get(f"{url}/metrics", timeout=10, trust_env=False)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    values = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return values


def metric(values: dict[Any, float], name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def test_concurrent_mixed_requests_each_get_their_own_answer(batching_url: str) -> None:
    requests = mixed_requests()
    before = scrape(batching_url)
    barrier = threading.Barrier(16)

    def send(chunk: list[tuple[str, dict[str, Any]]]) -> list[httpx.Response]:
        with httpx.Client(base_url=batching_url, timeout=120, trust_env=False) as http:
            barrier.wait(timeout=30)
            return [http.post(f"/{kind}", json=request) for kind, request in chunk]

    with ThreadPoolExecutor(16) as pool:
        answers = [r for rs in pool.map(send, [requests[i::16] for i in range(16)]) for r in rs]
    order = [req for i in range(16) for req in requests[i::16]]
    for (kind, request), response in zip(order, answers, strict=True):
        matrix, _ = decoded(response)
        expected = reference(kind, request)
        assert matrix.shape == expected.shape, (kind, request.get("output_index"))
        tolerance = 1e-12 if request["precision"] == "float64" else 1e-5
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(matrix, expected, rtol=tolerance, atol=tolerance * scale)
        assert float(response.headers["x-queue-time-ms"]) >= 0
        assert float(response.headers["x-compute-time-ms"]) > 0
    after = scrape(batching_url)
    batches = sum(
        metric(after, "hessian_batch_requests_count", kind=k)
        - metric(before, "hessian_batch_requests_count", kind=k)
        for k in ("hessian", "jacobian")
    )
    jobs = sum(
        metric(after, "hessian_batch_requests_sum", kind=k)
        - metric(before, "hessian_batch_requests_sum", kind=k)
        for k in ("hessian", "jacobian")
    )
    assert jobs == len(requests)
    assert batches < jobs, "no two requests were ever merged: the test did not test batching"
    print(f"48 mixed requests from 16 clients ran in {batches:.0f} batches")


def test_metrics_count_exactly_the_requests_sent(batching_url: str) -> None:
    before = scrape(batching_url)
    with httpx.Client(base_url=batching_url, timeout=60, trust_env=False) as http:
        for i in range(5):
            assert http.post("/jacobian", json=body("mlp_tanh", sample([1, 28, 28], i))).is_success
        quadratic = body("quadratic4", np.full(4, 2.0, np.float32), output_index=2)
        for _ in range(3):
            assert http.post("/hessian", json=quadratic).is_success
        for _ in range(2):
            assert http.post("/hessian", json={**quadratic, "model": "nope"}).status_code == 404
        bad_shape = body("quadratic4", np.zeros(3, np.float32), output_index=2)
        assert http.post("/hessian", json=bad_shape).status_code == 422
        for _ in range(2):
            assert http.get("/models/mlp_tanh").status_code == 200
    after = scrape(batching_url)

    def sent(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    expected = [
        ({"method": "POST", "route": "/jacobian", "model": "mlp_tanh", "status": "200"}, 5),
        ({"method": "POST", "route": "/hessian", "model": "quadratic4", "status": "200"}, 3),
        ({"method": "POST", "route": "/hessian", "model": "", "status": "404"}, 2),
        ({"method": "POST", "route": "/hessian", "model": "", "status": "422"}, 1),
        ({"method": "GET", "route": "/models/{name}", "model": "", "status": "200"}, 2),
    ]
    for labels, count in expected:
        assert sent("hessian_requests_total", **labels) == count, labels
        assert sent("hessian_request_duration_seconds_count", **labels) == count, labels
    assert sent("hessian_batch_samples_sum", kind="jacobian") == 5
    assert sent("hessian_batch_samples_sum", kind="hessian") == 3
    assert sent("hessian_queue_time_seconds_count", kind="hessian") == 3
    assert metric(after, "hessian_queue_depth") == 0
    memory = metric(after, "hessian_device_memory_bytes", device=TEST_DEVICE)
    assert memory > (50e6 if TEST_DEVICE == "cpu" else 0)  # RSS: torch + models
    # The scrape before counted itself; the one after is not in its own output yet.
    assert sent("hessian_requests_total", method="GET", route="/metrics", model="", status="200")
    assert not any(
        key[0] == "hessian_requests_total" and ("model", "nope") in key[1] for key in after
    )


def test_request_ids_and_timing_headers_on_every_response(batching_url: str) -> None:
    with httpx.Client(base_url=batching_url, timeout=60, trust_env=False) as http:
        mine = http.get("/health/live", headers={"x-request-id": "client-42.a"})
        assert mine.headers["x-request-id"] == "client-42.a"
        assert mine.headers["x-queue-time-ms"] == "0.000"
        assert mine.headers["x-compute-time-ms"] == "0.000"
        for insane in ("has spaces in it", "x" * 200, 'quote"s'):
            generated = http.get("/models", headers={"x-request-id": insane}).headers
            assert len(generated["x-request-id"]) == 32
            assert int(generated["x-request-id"], 16) >= 0
        computed = http.post(
            "/hessian", json=body("mlp_tanh", sample([1, 28, 28], 0), output_index=1)
        )
        assert float(computed.headers["x-compute-time-ms"]) > 0
        meta_ms = computed.json()["metadata"]["compute_ms"]
        assert math.isclose(float(computed.headers["x-compute-time-ms"]), meta_ms, abs_tol=1e-3)
        error = http.post("/hessian", json={"model": "nope"})
        assert error.status_code == 422 and len(error.headers["x-request-id"]) == 32


def test_liveness_answers_in_under_50_ms_while_a_long_hessian_computes(batching_url: str) -> None:
    request = body("digits_cnn", sample([16, 1, 28, 28], 3), output_index=2)
    outcome: dict[str, Any] = {}

    def send() -> None:
        with httpx.Client(base_url=batching_url, timeout=120, trust_env=False) as http:
            outcome["sent"] = time.perf_counter()
            outcome["response"] = http.post("/hessian", json=request)

    worker = threading.Thread(target=send, daemon=True)
    probes: list[tuple[float, float]] = []  # (latency, end)
    with httpx.Client(base_url=batching_url, timeout=10, trust_env=False) as http:
        http.get("/health/live")  # the connection is open before the clock starts
        worker.start()
        while worker.is_alive() and len(probes) < 2000:
            started = time.perf_counter()
            response = http.get("/health/live")
            ended = time.perf_counter()
            assert response.status_code == 200
            probes.append((ended - started, ended))
            time.sleep(0.001)
    worker.join(timeout=120)
    response = outcome["response"]
    assert response.status_code == 200
    # Probes that ended before queue + compute time had passed since the request was sent
    # certainly overlapped the computation (not the encoding that follows it).
    computing_until = (
        outcome["sent"]
        + (
            float(response.headers["x-queue-time-ms"])
            + float(response.headers["x-compute-time-ms"])
        )
        / 1000
    )
    during = [latency for latency, ended in probes if outcome["sent"] < ended < computing_until]
    print(
        f"/health/live during a {response.headers['x-compute-time-ms']} ms batch-of-16 CNN "
        f"Hessian: {len(during)} probes, max {max(during, default=0) * 1000:.1f} ms, "
        f"median {sorted(during)[len(during) // 2] * 1000 if during else 0:.1f} ms"
    )
    assert len(during) >= 5, "the Hessian was too quick to probe: make it longer"
    assert max(during) < 0.050, sorted(during)[-5:]


def test_disconnects_and_deadlines_free_queued_work() -> None:
    # A 1.5 s batching delay holds a lone request in the queue, waiting for company; the
    # deadline is 0.6 s. A client that gives up after 0.3 s has its work dropped, a
    # patient one gets 504 at its deadline, and neither reaches the engine.
    request = body("mlp_tanh", sample([3, 1, 28, 28], 5), output_index=4)
    with running_server(HESSIAN_MAX_BATCH_DELAY_MS="1500", HESSIAN_REQUEST_TIMEOUT_S="0.6") as url:
        before = scrape(url)
        with (
            httpx.Client(base_url=url, timeout=0.3, trust_env=False) as http,
            pytest.raises(httpx.ReadTimeout),
        ):
            http.post("/hessian", json=request)
        deadline = time.monotonic() + 1.0  # before the 1.5 s delay runs out
        while True:
            after = scrape(url)
            dropped = metric(after, "hessian_rejected_total", reason="disconnected")
            if dropped or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert dropped == 1
        assert metric(after, "hessian_queue_depth") == 0

        with httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
            started = time.perf_counter()
            late = http.post("/hessian", json=request)
            elapsed = time.perf_counter() - started
        assert late.status_code == 504, late.text
        assert late.headers["content-type"].startswith("application/problem+json")
        assert late.json()["timeout_s"] == 0.6 and "deadline" in late.json()["detail"]
        assert 0.6 <= elapsed < 1.4  # at the deadline, not after the 1.5 s delay
        after = scrape(url)
        assert metric(after, "hessian_rejected_total", reason="deadline") == 1
        assert metric(after, "hessian_queue_depth") == 0  # the slot is free again

        time.sleep(1.6)  # past the delay: had either job stayed queued, it would run now
        after = scrape(url)
        assert metric(after, "hessian_batch_samples_count", kind="hessian") == metric(
            before, "hessian_batch_samples_count", kind="hessian"
        ), "a dropped request reached the engine"
        # A full batch does not wait for company: it is answered at once, and right.
        full = body("quadratic4", sample([32, 4], 6))
        with httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
            matrix, _ = decoded(http.post("/jacobian", json=full))
        np.testing.assert_allclose(matrix, reference("jacobian", full), rtol=1e-6, atol=0)


def test_overload_gives_503_with_retry_after_then_recovers() -> None:
    request = body("digits_cnn", sample([1, 28, 28], 7), output_index=5)
    expected = reference("hessian", request)
    clients = 64
    # The queued requests wait up to 1 s for company (a batch holds 64 samples), so the
    # queue is full during the burst however fast this machine computes.
    with running_server(
        HESSIAN_MAX_QUEUE=str(BUSY_QUEUE),
        HESSIAN_REQUEST_TIMEOUT_S=str(BUSY_TIMEOUT_S),
        HESSIAN_MAX_BATCH_SIZE="64",
        HESSIAN_MAX_BATCH_DELAY_MS="1000",
    ) as url:
        barrier = threading.Barrier(clients)

        def send(_: int) -> tuple[httpx.Response, float]:
            with httpx.Client(base_url=url, timeout=60, trust_env=False) as http:
                http.get("/health/live")  # connected before the burst
                barrier.wait(timeout=30)
                started = time.perf_counter()
                response = http.post("/hessian", json=request)
                return response, time.perf_counter() - started

        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(send, range(clients)))
        statuses = [response.status_code for response, _ in results]
        print(
            f"{clients} clients, queue {BUSY_QUEUE}: statuses {sorted(set(statuses))}, "
            f"{statuses.count(503)} x 503, {statuses.count(504)} x 504, "
            f"slowest {max(t for _, t in results):.2f} s"
        )
        assert set(statuses) <= {200, 503, 504}, statuses
        # Far more clients than the queue holds: most are turned away at once.
        assert statuses.count(503) >= clients // 2
        assert statuses.count(200) >= 1
        for response, elapsed in results:
            # Nobody waits past the deadline (plus time to decode, encode and send).
            assert elapsed < BUSY_TIMEOUT_S + 3.0, (response.status_code, elapsed)
            if response.status_code == 200:
                np.testing.assert_allclose(
                    decoded(response)[0], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max()
                )
            else:
                assert response.headers["content-type"].startswith("application/problem+json")
                problem = response.json()
                assert problem["status"] == response.status_code
                if response.status_code == 503:
                    assert int(response.headers["retry-after"]) >= 1
                    assert "busy" in problem["detail"]
        after = scrape(url)
        assert metric(after, "hessian_rejected_total", reason="queue_full") == statuses.count(503)
        assert metric(after, "hessian_rejected_total", reason="deadline") == statuses.count(504)
        assert metric(
            after,
            "hessian_requests_total",
            method="POST",
            route="/hessian",
            model="digits_cnn",
            status="503",
        ) == statuses.count(503)
        # The burst is over: normal service, the right answer, no queue left.
        assert metric(after, "hessian_queue_depth") == 0
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as http:
            for _ in range(3):
                started = time.perf_counter()
                matrix, _ = decoded(http.post("/hessian", json=request))
                assert time.perf_counter() - started < BUSY_TIMEOUT_S
                np.testing.assert_allclose(
                    matrix, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max()
                )
