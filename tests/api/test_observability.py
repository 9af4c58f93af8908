"""Access logs and headers of the in-process app (the real middleware, no server).

One JSON line per request on the ``hessian_service.access`` logger, carrying the id that the
response echoes in ``X-Request-Id``; the e2e tests cover /metrics over real HTTP.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


@pytest.fixture
def access_lines() -> Iterator[list[dict[str, object]]]:
    handler = Lines()
    logger = logging.getLogger("hessian_service.access")
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)


def test_one_json_access_line_per_request_with_its_id(
    client: TestClient, access_lines: list[dict[str, object]]
) -> None:
    body = {
        "model": "quadratic4",
        "inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": [2, 2, 2, 2]}],
        "output_index": 2,
    }
    response = client.post("/hessian", json=body, headers={"x-request-id": "trace-7"})
    assert response.status_code == 200
    assert response.json()["outputs"][0]["data"][10] == 4.0  # diag(0, 0, 4, 0)
    missing = client.get("/models/nope")
    assert missing.status_code == 404
    assert [line["request_id"] for line in access_lines] == [
        "trace-7",
        missing.headers["x-request-id"],
    ]
    computed, not_found = access_lines
    assert computed["route"] == "/hessian" and computed["model"] == "quadratic4"
    assert computed["status"] == 200 and computed["method"] == "POST"
    assert float(response.headers["x-compute-time-ms"]) == computed["compute_ms"]
    assert isinstance(computed["duration_ms"], float) and computed["duration_ms"] > 0
    assert not_found["route"] == "/models/{name}" and not_found["path"] == "/models/nope"
    assert not_found["status"] == 404 and not_found["model"] is None
    assert not_found["compute_ms"] == 0 and missing.headers["x-compute-time-ms"] == "0.000"


def test_the_startup_heap_is_frozen_so_a_full_collection_is_short(client: TestClient) -> None:
    """After start-up a full garbage collection must not walk torch's and the models'
    objects while holding the GIL (195 ms before the freeze; a probe waited 385 ms)."""
    import gc
    import time

    assert client.get("/health/ready").status_code == 200
    assert gc.get_freeze_count() > 100_000
    start = time.perf_counter()
    gc.collect()
    assert time.perf_counter() - start < 0.05
