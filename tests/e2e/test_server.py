"""The HTTP contract against a real uvicorn server on 127.0.0.1, values asserted."""

from __future__ import annotations

import base64
import json
import math
import threading
import time
from collections.abc import Iterator
from functools import cache
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hessian_service.config import BUNDLED_MODELS_DIR
from hessian_service.repository import zoo
from tests.e2e.conftest import LIMITED_MAX_BODY_BYTES, LIMITED_MAX_RESULT_BYTES

pytestmark = pytest.mark.e2e

MODELS = {"linear4", "quadratic4", "mlp_tanh", "mlp_relu", "digits_cnn", "photo_digits_cnn"}
PROBLEM = "application/problem+json"
NUMPY_DTYPES = {"FP32": "<f4", "FP64": "<f8"}


@cache
def digit() -> list[float]:
    """The held-out handwritten 2 shipped with the models, 784 numbers."""
    sample = json.loads((BUNDLED_MODELS_DIR / "digits_sample.json").read_text())
    assert sample["shape"] == [1, 1, 28, 28]
    assert len(sample["data"]) == 784
    return [float(v) for v in sample["data"]]


def tensor(shape: list[int], data: Any, datatype: str = "FP32") -> list[dict[str, Any]]:
    return [{"name": "x", "shape": shape, "datatype": datatype, "data": data}]


def decode(obj: dict[str, Any]) -> np.ndarray:
    """A response tensor object as a numpy array of its shape and datatype."""
    dtype = np.dtype(NUMPY_DTYPES[obj["datatype"]])
    if isinstance(obj["data"], str):
        array = np.frombuffer(base64.b64decode(obj["data"]), dtype=dtype)
    else:
        array = np.asarray(obj["data"], dtype=np.float64).astype(dtype)
    assert array.size == math.prod(obj["shape"]), obj["shape"]
    return array.reshape(obj["shape"])


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text[:2000]
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert [o["name"] for o in body["outputs"]][1:] == ["output"]
    return body


def result(body: dict[str, Any]) -> np.ndarray:
    return decode(body["outputs"][0])


def output(body: dict[str, Any]) -> np.ndarray:
    return decode(body["outputs"][1])


def problem(response: httpx.Response, status: int, *in_detail: str) -> dict[str, Any]:
    """Check an RFC 9457 error: status, content type, and the words its detail must hold."""
    assert response.status_code == status, response.text[:2000]
    assert response.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["title"]
    assert isinstance(body["detail"], str)
    for words in in_detail:
        assert words in body["detail"], body
    return body


# --- health and models --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/health/live", "/health/ready"])
def test_health(client: httpx.Client, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "models_loaded": len(MODELS), "models_failed": 0}


def test_models_lists_the_six_bundled_models(client: httpx.Client) -> None:
    response = client.get("/models")
    assert response.status_code == 200
    models = response.json()["models"]
    assert {m["name"] for m in models} == MODELS
    assert len(models) == len(MODELS) == 6
    assert all(m["ready"] and m["error"] is None and m["device"] == "cpu" for m in models)
    curvature = {m["name"]: m["curvature"] for m in models}
    assert curvature["linear4"] == "affine"
    assert curvature["mlp_relu"] == "piecewise_linear"
    assert curvature["digits_cnn"] == "general"


def test_model_detail(client: httpx.Client) -> None:
    response = client.get("/models/digits_cnn")
    assert response.status_code == 200
    info = response.json()
    assert info["name"] == "digits_cnn"
    assert info["input_shape"] == [1, 28, 28]
    assert info["output_shape"] == [10]
    assert info["training"]["held_out_accuracy"] >= 0.95


def test_unknown_model_detail_is_404(client: httpx.Client) -> None:
    problem(client.get("/models/no_such_model"), 404, "no_such_model")


# --- the contract cases -------------------------------------------------------------------


def test_linear4_hessian_is_exact_zeros_with_a_note(client: httpx.Client) -> None:
    body = ok(client.post("/hessian", json={"model": "linear4", "inputs": tensor([4], [1.0] * 4)}))
    hessian = result(body)
    assert hessian.shape == (4, 4)
    assert not hessian.any()
    np.testing.assert_allclose(output(body), [2.5])  # 0.5 * 4 + 0.5
    meta = body["metadata"]
    assert meta["zero"] is True
    assert any("affine" in note for note in meta["notes"]), meta["notes"]
    assert meta["batch_size"] is None
    assert meta["sample_shape"] == [4]


def test_linear4_mse_hessian_is_half_everywhere(client: httpx.Client) -> None:
    body = ok(
        client.post(
            "/hessian",
            json={
                "model": "linear4",
                "inputs": tensor([4], [1.0] * 4),
                "objective": {"type": "mse", "target": 1},
            },
        )
    )
    hessian = result(body)
    assert hessian.shape == (4, 4)
    # mean((w.x + b - 1)^2) has Hessian 2 w w^T = 2 * 0.5 * 0.5 everywhere.
    np.testing.assert_allclose(hessian, np.full((4, 4), 0.5), rtol=0, atol=1e-6)
    assert body["metadata"]["zero"] is False
    assert body["metadata"]["objective"] == "mse"


def test_quadratic4_hessian_and_jacobian(client: httpx.Client) -> None:
    request = {"model": "quadratic4", "inputs": tensor([4], [2.0] * 4), "output_index": 2}
    hessian_body = ok(client.post("/hessian", json=request))
    np.testing.assert_array_equal(result(hessian_body), np.diag([0.0, 0.0, 4.0, 0.0]))
    np.testing.assert_array_equal(output(hessian_body), [0.0, 4.0, 8.0, 12.0])
    assert hessian_body["metadata"]["output_index"] == 2
    assert hessian_body["metadata"]["zero"] is False

    jacobian_body = ok(client.post("/jacobian", json=request))
    assert jacobian_body["outputs"][0]["name"] == "jacobian"
    np.testing.assert_array_equal(result(jacobian_body), [0.0, 0.0, 8.0, 0.0])


@cache
def reference_cnn_hessian() -> np.ndarray:
    """d^2 logit_2 / dx^2 of digits_cnn at the sample digit, in float64, 784 x 784."""
    model = zoo.build("digits_cnn")
    model.load_state_dict(load_file(str(BUNDLED_MODELS_DIR / "digits_cnn" / "weights.safetensors")))
    model = model.to(torch.float64).eval()
    model.requires_grad_(False)
    x = torch.tensor(digit(), dtype=torch.float64).reshape(1, 1, 28, 28)
    # The default (one backward pass per row) has no vmap warm-up: the cheapest first call.
    hessian = torch.autograd.functional.hessian(  # type: ignore[no-untyped-call]
        lambda z: model(z)[0, 2], x
    )
    array: np.ndarray = hessian.reshape(784, 784).numpy()
    return array


def relative_error(answer: np.ndarray, reference: np.ndarray) -> float:
    """max |answer - reference| / max |reference|, in float64."""
    diff = np.abs(answer.astype(np.float64) - reference).max()
    return float(diff / np.abs(reference).max())


@pytest.fixture(scope="module")
def cnn_batch_body(client: httpx.Client) -> dict[str, Any]:
    """/hessian of digits_cnn, output 2, on the sample digit sent as a batch of one."""
    return ok(
        client.post(
            "/hessian",
            json={
                "model": "digits_cnn",
                "inputs": tensor([1, 1, 28, 28], digit()),
                "output_index": 2,
                "encoding": "base64",
            },
        )
    )


def test_digits_cnn_hessian_matches_torch_autograd(
    cnn_batch_body: dict[str, Any], record_property: Any
) -> None:
    body = cnn_batch_body
    hessian = result(body)
    assert body["outputs"][0]["datatype"] == "FP32"
    assert hessian.shape == (1, 784, 784)
    assert body["metadata"]["batch_size"] == 1
    assert body["metadata"]["zero"] is False
    np.testing.assert_allclose(hessian[0], hessian[0].T, rtol=0, atol=1e-6)

    reference = reference_cnn_hessian()
    assert np.abs(reference).max() > 0.1  # a real curvature, not a vacuous comparison
    error = relative_error(hessian[0], reference)
    record_property("digits_cnn_fp32_relative_error", error)
    print(f"digits_cnn float32 vs float64 reference: max relative error {error:.3e}")
    assert error <= 1e-5

    logits = output(body)
    assert logits.shape == (1, 10)
    assert int(logits[0].argmax()) == 2  # the held-out digit is a 2, and the model says so


def test_digits_cnn_float64_matches_reference(client: httpx.Client) -> None:
    # FP64 input: an FP32 one would be rounded to float32 first (about 2e-8 off the reference).
    body = ok(
        client.post(
            "/hessian",
            json={
                "model": "digits_cnn",
                "inputs": tensor([1, 28, 28], digit(), "FP64"),
                "output_index": 2,
                "precision": "float64",
                "encoding": "base64",
            },
        )
    )
    assert [o["datatype"] for o in body["outputs"]] == ["FP64", "FP64"]
    assert body["metadata"]["precision"] == "float64"
    hessian = result(body)
    assert hessian.dtype == np.float64
    assert hessian.shape == (784, 784)
    assert relative_error(hessian, reference_cnn_hessian()) <= 1e-10


def test_digits_cnn_tensor_layout(client: httpx.Client, cnn_batch_body: dict[str, Any]) -> None:
    body = ok(
        client.post(
            "/hessian",
            json={
                "model": "digits_cnn",
                "inputs": tensor([1, 28, 28], digit()),
                "output_index": 2,
                "layout": "tensor",
                "encoding": "base64",
            },
        )
    )
    hessian = result(body)
    assert hessian.shape == (1, 28, 28, 1, 28, 28)
    assert body["metadata"]["layout"] == "tensor"
    assert body["metadata"]["batch_size"] is None
    assert output(body).shape == (10,)
    np.testing.assert_allclose(
        hessian.reshape(784, 784), result(cnn_batch_body)[0], rtol=0, atol=1e-6
    )


def test_mlp_relu_hessian_is_zero_almost_everywhere(client: httpx.Client) -> None:
    body = ok(
        client.post(
            "/hessian",
            json={"model": "mlp_relu", "inputs": tensor([1, 28, 28], digit()), "output_index": 0},
        )
    )
    hessian = result(body)
    assert hessian.shape == (784, 784)
    assert not hessian.any()
    assert output(body).shape == (10,)
    assert output(body).any()
    meta = body["metadata"]
    assert meta["zero"] is True
    assert any("zero almost everywhere" in note for note in meta["notes"]), meta["notes"]


# --- batches, encodings, precision --------------------------------------------------------


def three_inputs() -> np.ndarray:
    image = np.asarray(digit(), dtype=np.float32).reshape(1, 28, 28)
    noise = np.random.default_rng(0).random((1, 28, 28), dtype=np.float32)
    return np.stack([image, image[:, ::-1, :].copy(), noise])


def test_batch_gives_the_same_as_single_requests(client: httpx.Client) -> None:
    inputs = three_inputs()

    def request(shape: list[int], array: np.ndarray) -> dict[str, Any]:
        return {
            "model": "mlp_tanh",
            "inputs": tensor(shape, array.reshape(-1).tolist()),
            "output_index": [1, 4],
            "encoding": "base64",
        }

    batch = ok(client.post("/hessian", json=request([3, 1, 28, 28], inputs)))
    hessians = result(batch)
    assert hessians.shape == (3, 2, 784, 784)
    assert batch["metadata"]["batch_size"] == 3
    assert output(batch).shape == (3, 10)
    for i in range(3):
        single = ok(client.post("/hessian", json=request([1, 28, 28], inputs[i])))
        assert single["metadata"]["batch_size"] is None
        np.testing.assert_allclose(result(single), hessians[i], rtol=0, atol=1e-6)
        np.testing.assert_allclose(output(single), output(batch)[i], rtol=0, atol=1e-6)
    # Three different inputs, two different outputs: six different matrices.
    assert np.abs(hessians[0, 0] - hessians[1, 0]).max() > 1e-3
    assert np.abs(hessians[0, 0] - hessians[0, 1]).max() > 1e-3


def test_base64_and_json_encodings_are_bit_identical(client: httpx.Client) -> None:
    request = {"model": "mlp_tanh", "inputs": tensor([1, 28, 28], digit()), "output_index": 3}
    as_json = ok(client.post("/hessian", json={**request, "encoding": "json"}))
    as_base64 = ok(client.post("/hessian", json={**request, "encoding": "base64"}))
    for index in (0, 1):
        numbers, packed = as_json["outputs"][index], as_base64["outputs"][index]
        assert isinstance(numbers["data"], list)
        assert isinstance(packed["data"], str)
        assert numbers["shape"] == packed["shape"]
        assert numbers["datatype"] == packed["datatype"] == "FP32"
        from_json = np.asarray(numbers["data"], dtype=np.float64).astype("<f4")
        from_base64 = np.frombuffer(base64.b64decode(packed["data"]), dtype="<f4")
        # Every float32 is written as its shortest round-tripping decimal: same bits back.
        np.testing.assert_array_equal(from_json.view("<u4"), from_base64.view("<u4"))
    assert np.abs(result(as_base64)).max() > 0


def test_float64_precision(client: httpx.Client) -> None:
    body = ok(
        client.post(
            "/hessian",
            json={
                "model": "quadratic4",
                "inputs": tensor([4], [2.0] * 4),
                "output_index": 2,
                "precision": "float64",
                "encoding": "base64",
            },
        )
    )
    assert [o["datatype"] for o in body["outputs"]] == ["FP64", "FP64"]
    assert len(base64.b64decode(body["outputs"][0]["data"])) == 16 * 8
    np.testing.assert_array_equal(result(body), np.diag([0.0, 0.0, 4.0, 0.0]))
    np.testing.assert_array_equal(output(body), [0.0, 4.0, 8.0, 12.0])


# --- errors over real HTTP ----------------------------------------------------------------


def test_unknown_model_is_404(client: httpx.Client) -> None:
    response = client.post("/hessian", json={"model": "nope", "inputs": tensor([4], [1.0] * 4)})
    body = problem(response, 404, "model", "'nope'")
    assert body["field"] == "model"


def test_wrong_shape_is_422_naming_the_expected_shape(client: httpx.Client) -> None:
    response = client.post(
        "/hessian",
        json={"model": "digits_cnn", "inputs": tensor([1, 27, 28], [0.0] * 756), "output_index": 2},
    )
    body = problem(response, 422, "inputs[0].shape", "[1, 28, 28]", "[1, 27, 28]")
    assert body["field"] == "inputs[0].shape"


def test_data_length_mismatch_is_422(client: httpx.Client) -> None:
    response = client.post(
        "/hessian",
        json={"model": "quadratic4", "inputs": tensor([4], [1.0] * 3), "output_index": 2},
    )
    body = problem(response, 422, "inputs[0].data", "3", "4")
    assert body["field"] == "inputs[0].data"


def test_output_index_out_of_range_is_422(client: httpx.Client) -> None:
    response = client.post(
        "/hessian",
        json={"model": "digits_cnn", "inputs": tensor([1, 28, 28], digit()), "output_index": 10},
    )
    body = problem(response, 422, "output_index", "10")
    assert body["field"] == "output_index"


def test_nan_in_input_is_422(client: httpx.Client) -> None:
    raw = (
        b'{"model": "quadratic4", "output_index": 2, "inputs": [{"name": "x", "shape": [4], '
        b'"datatype": "FP32", "data": [1.0, NaN, 1.0, 1.0]}]}'
    )
    response = client.post("/hessian", content=raw, headers={"content-type": "application/json"})
    body = problem(response, 422, "inputs[0].data", "NaN")
    assert body["field"] == "inputs[0].data"


def test_malformed_base64_is_422(client: httpx.Client) -> None:
    response = client.post(
        "/hessian",
        json={"model": "quadratic4", "inputs": tensor([4], "!!not*base64"), "output_index": 2},
    )
    body = problem(response, 422, "inputs[0].data", "base64")
    assert body["field"] == "inputs[0].data"


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"this is not json", "application/json"),
        (b'{"model": "linear4", "inputs": [', "application/json"),
        (b"\xff\xfe\x00garbage", "application/json"),
        (b"model=linear4", "text/plain"),
    ],
)
def test_garbage_body_is_422_not_500(
    client: httpx.Client, content: bytes, content_type: str
) -> None:
    response = client.post("/hessian", content=content, headers={"content-type": content_type})
    body = problem(response, 422)
    assert body["errors"], body
    assert "JSON" in body["detail"] or "body" in body["detail"], body


def test_invalid_json_detail_names_the_body(client: httpx.Client) -> None:
    headers = {"content-type": "application/json"}
    response = client.post("/hessian", content=b"this is not json", headers=headers)
    body = problem(response, 422, "body")
    assert not body["detail"].startswith("[0]")


# --- limits (a second server, 200 kB bodies and 1 MB results) ------------------------------


def test_result_over_the_limit_is_413_before_any_work(limited_server_url: str) -> None:
    request = {"model": "digits_cnn", "inputs": tensor([1, 28, 28], digit()), "output_index": 2}
    with httpx.Client(base_url=limited_server_url, timeout=60.0, trust_env=False) as http:
        started = time.perf_counter()
        response = http.post("/hessian", json=request)
        elapsed = time.perf_counter() - started
        body = problem(response, 413, "/jacobian")
        assert body["estimated_bytes"] == 784 * 784 * 4
        assert body["limit_bytes"] == LIMITED_MAX_RESULT_BYTES
        assert elapsed < 1.0  # refused up front, not after computing 2.4 MB
        # The cheaper endpoint the message names does fit: 10 x 784 x 4 bytes.
        jacobian = ok(http.post("/jacobian", json={**request, "output_index": None}))
        assert result(jacobian).shape == (10, 784)


def oversized_body() -> bytes:
    data = [0.123456789] * 20_000  # about 260 kB of JSON
    raw = json.dumps(
        {"model": "quadratic4", "inputs": tensor([20_000], data), "output_index": 2}
    ).encode()
    assert len(raw) > LIMITED_MAX_BODY_BYTES
    return raw


def test_body_over_the_limit_is_413(limited_server_url: str) -> None:
    with httpx.Client(base_url=limited_server_url, timeout=60.0, trust_env=False) as http:
        headers = {"content-type": "application/json"}
        response = http.post("/hessian", content=oversized_body(), headers=headers)
        body = problem(response, 413, str(LIMITED_MAX_BODY_BYTES))
        assert body["limit_bytes"] == LIMITED_MAX_BODY_BYTES
        # A body under the limit still gets through.
        small = {"model": "quadratic4", "inputs": tensor([4], [2.0] * 4), "output_index": 2}
        np.testing.assert_array_equal(
            result(ok(http.post("/hessian", json=small))), np.diag([0.0, 0.0, 4.0, 0.0])
        )


def test_chunked_body_over_the_limit_is_413(limited_server_url: str) -> None:
    raw = oversized_body()

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while streaming
        for start in range(0, len(raw), 16_384):
            yield raw[start : start + 16_384]

    with httpx.Client(base_url=limited_server_url, timeout=60.0, trust_env=False) as http:
        headers = {"content-type": "application/json"}
        response = http.post("/hessian", content=chunks(), headers=headers)
        assert "content-length" not in response.request.headers
        body = problem(response, 413, str(LIMITED_MAX_BODY_BYTES))
        assert body["limit_bytes"] == LIMITED_MAX_BODY_BYTES


# --- responsiveness -----------------------------------------------------------------------


def test_liveness_answers_while_a_large_hessian_is_computed(
    client: httpx.Client, server_url: str
) -> None:
    request = {
        "model": "digits_cnn",
        "inputs": tensor([8, 1, 28, 28], digit() * 8),
        "output_index": 2,
        "encoding": "base64",
    }
    outcome: dict[str, Any] = {}

    def send() -> None:
        with httpx.Client(base_url=server_url, timeout=120.0, trust_env=False) as http:
            try:
                outcome["response"] = http.post("/hessian", json=request)
            finally:
                outcome["done"] = time.perf_counter()

    worker = threading.Thread(target=send, daemon=True)
    worker.start()
    time.sleep(0.1)  # let the request reach the server
    probes: list[tuple[float, float]] = []  # (latency, end time)
    while worker.is_alive() and len(probes) < 50:
        started = time.perf_counter()
        response = client.get("/health/live")
        ended = time.perf_counter()
        assert response.status_code == 200
        assert response.json()["status"] == "ok"
        probes.append((ended - started, ended))
        time.sleep(0.1)
    worker.join(timeout=120)
    assert not worker.is_alive(), "the batch-of-8 /hessian did not finish in 120 s"

    body = ok(outcome["response"])
    assert result(body).shape == (8, 784, 784)
    in_flight = [latency for latency, ended in probes if ended < outcome["done"]]
    print(
        f"/health/live while a batch of 8 was computed: {len(in_flight)} probes, max "
        f"{max(in_flight, default=0) * 1000:.1f} ms"
    )
    assert in_flight, "no /health/live probe completed while the /hessian was in flight"
    assert max(in_flight) < 1.0, f"/health/live latencies while busy: {in_flight}"
