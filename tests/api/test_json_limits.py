"""The JSON-number limit in process: what is refused, what is not, and what stays as it was.

An app whose limit on bytes outside JSON strings is 64 KiB: a batch of digits written as
JSON numbers is a 413 that names the limit, the setting, the exact count and the binary
way (base64 on /hessian and /jacobian, the binary tensor extension on /v2); the same
numbers sent that way are answered, values equal to the JSON ones. Bodies parsed in a
worker thread (over 64 KiB) give the same 422s as small ones, and the OpenAPI document
still describes the request body.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from hessian_service.api.examples import hessian_examples
from hessian_service.config import Settings
from hessian_service.main import create_app
from hessian_service.wire.json_body import INLINE_BODY_BYTES, bytes_outside_strings
from tests.device import TEST_DEVICE

LIMIT = 64 * 1024
SETTING = "HESSIAN_MAX_JSON_NUMBER_BYTES"
PROBLEM = "application/problem+json"
INFER = "/v2/models/digits_cnn/infer"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    settings = Settings(device=TEST_DEVICE, max_json_number_bytes=LIMIT, access_log=False)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def digits(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).random((batch, 1, 28, 28), dtype=np.float32)


def request(x: np.ndarray, data: Any) -> dict[str, Any]:
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": data}
    return {"model": "digits_cnn", "inputs": [tensor], "encoding": "base64"}


def as_numbers(x: np.ndarray) -> dict[str, Any]:
    return request(x, x.ravel().tolist())


def as_base64(x: np.ndarray) -> dict[str, Any]:
    return request(x, base64.b64encode(x.tobytes()).decode())


def result(response: Any) -> np.ndarray:
    assert response.status_code == 200, response.text[:1000]
    obj = response.json()["outputs"][0]
    return np.frombuffer(base64.b64decode(obj["data"]), "<f4").reshape(obj["shape"])


def assert_refused(response: Any, body: bytes, alternative: str) -> dict[str, Any]:
    assert response.status_code == 413, response.text[:1000]
    assert response.headers["content-type"] == PROBLEM
    problem: dict[str, Any] = response.json()
    assert problem["limit_bytes"] == LIMIT and problem["setting"] == SETTING
    assert problem["json_number_bytes"] == bytes_outside_strings(body)
    assert problem["field"] == "body"
    assert f"limit of {LIMIT} ({SETTING})" in problem["detail"]
    assert alternative in problem["detail"]
    return problem


@pytest.mark.parametrize("path", ["/hessian", "/jacobian"])
def test_json_numbers_over_the_limit_are_413_naming_the_limit_and_base64(
    client: TestClient, path: str
) -> None:
    body = json.dumps({**as_numbers(digits(16)), "output_index": 2}).encode()
    assert bytes_outside_strings(body) > LIMIT
    response = client.post(path, content=body, headers=JSON)
    problem = assert_refused(response, body, "base64")
    assert "inputs[0].data as a string" in problem["detail"]


def test_the_same_numbers_as_base64_are_answered_equal_to_json_numbers(
    client: TestClient,
) -> None:
    x = digits(32)  # 133 kB of base64: strings do not count
    body = json.dumps(as_base64(x)).encode()
    assert len(body) > 2 * LIMIT and bytes_outside_strings(body) < 200
    jacobians = result(client.post("/jacobian", content=body, headers=JSON))
    assert jacobians.shape == (32, 10, 784)
    small = as_numbers(x[:2])  # under the limit as JSON numbers
    assert bytes_outside_strings(json.dumps(small).encode()) < LIMIT
    np.testing.assert_array_equal(result(client.post("/jacobian", json=small)), jacobians[:2])


def test_a_streamed_body_is_counted_as_it_comes(client: TestClient) -> None:
    body = json.dumps({**as_numbers(digits(16)), "output_index": 2}).encode()

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked, through BodySizeLimit
        for start in range(0, len(body), 10_000):
            yield body[start : start + 10_000]

    response = client.post("/hessian", content=chunks(), headers=JSON)
    assert_refused(response, body, "base64")


def test_v2_json_over_the_limit_is_413_problem_with_error(client: TestClient) -> None:
    x = digits(16)
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    body = json.dumps({"inputs": [tensor]}).encode()
    problem = assert_refused(client.post(INFER, content=body), body, "binary tensor extension")
    assert problem["error"] == problem["detail"]  # what tritonclient reads


def test_v2_binary_tail_does_not_count_and_matches_json(client: TestClient) -> None:
    x = digits(32)  # a 100 kB tail of raw float32 bytes
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32"}
    header = json.dumps(
        {"inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}]}
    ).encode()
    response = client.post(
        INFER,
        content=header + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 200, response.text
    logits = np.asarray(response.json()["outputs"][0]["data"], dtype=np.float32)
    small = {"inputs": [{**tensor, "shape": [2, 1, 28, 28], "data": x[:2].ravel().tolist()}]}
    json_logits = client.post(INFER, json=small).json()["outputs"][0]["data"]
    # A batch of 32 and one of 2 sum in different orders: float32 rounding apart.
    np.testing.assert_allclose(logits.reshape(32, 10)[:2].ravel(), json_logits, atol=1e-5)


def big(change: dict[str, Any]) -> bytes:
    """A body over INLINE_BODY_BYTES (parsed in a worker thread), under the limit."""
    body = json.dumps({**as_base64(digits(16)), "output_index": 2, **change}).encode()
    assert len(body) > INLINE_BODY_BYTES and bytes_outside_strings(body) < LIMIT
    return body


def test_bodies_parsed_in_a_thread_give_the_same_422_as_small_ones(client: TestClient) -> None:
    headers = JSON
    small = json.dumps({**as_base64(digits(1)), "output_index": 2, "layout": "x"}).encode()
    for body in (small, big({"layout": "x"})):
        problem = client.post("/hessian", content=body, headers=headers).json()
        assert problem["status"] == 422 and problem["field"] == "layout", problem
        assert problem["errors"] == [
            {"field": "layout", "message": "Input should be 'matrix', 'tensor' or 'packed'"}
        ]
    broken = big({})[:-1]  # the closing brace is missing: the error is at the end
    problem = client.post("/hessian", content=broken, headers=headers).json()
    assert problem["status"] == 422 and problem["field"] == "body"
    assert problem["detail"].startswith(f"body: invalid JSON at character {len(broken)}: ")
    response = client.post("/hessian", content=big({}), headers=headers)
    assert result(response).shape == (16, 784, 784)


def test_openapi_still_describes_the_request_body(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/hessian", "/jacobian"):
        body = spec["paths"][path]["post"]["requestBody"]
        content = body["content"]["application/json"]
        assert body["required"] is True
        assert content["schema"] == {"$ref": "#/components/schemas/DerivativeRequest"}
        assert content["examples"]
    examples = spec["paths"]["/hessian"]["post"]["requestBody"]["content"]["application/json"]
    assert set(examples["examples"]) == set(hessian_examples())
    assert "inputs" in spec["components"]["schemas"]["DerivativeRequest"]["properties"]
