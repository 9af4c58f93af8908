"""Open Inference Protocol v2 routes and the binary framing, in process (the real app).

Every malformed binary body -- header length, byte counts that disagree with the body or
with shape x datatype -- is a 400 in the protocol's ``{"error": ...}`` form that names
the field; a well-formed one gives the same logits as the JSON form.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

HEADER = "Inference-Header-Content-Length"
INFER = "/v2/models/digits_cnn/infer"


def framed(header: dict[str, Any], *tails: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + b"".join(tails), {HEADER: str(len(text))}


def binary_input(x: np.ndarray, size: int | None = None, datatype: str = "FP32") -> dict[str, Any]:
    return {
        "name": "x",
        "shape": list(x.shape),
        "datatype": datatype,
        "parameters": {"binary_data_size": x.nbytes if size is None else size},
    }


def error(response: Any, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    for word in words:
        assert word in body["error"], body
    message: str = body["error"]
    return message


def test_binary_and_json_inputs_give_the_same_logits(client: TestClient) -> None:
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    as_json = client.post(
        INFER,
        json={
            "inputs": [
                {
                    "name": "x",
                    "shape": [3, 1, 28, 28],
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        },
    )
    assert as_json.status_code == 200, as_json.text
    assert HEADER not in as_json.headers
    (json_output,) = as_json.json()["outputs"]
    body, headers = framed(
        {
            "inputs": [binary_input(x)],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        },
        x.tobytes(),
    )
    as_binary = client.post(INFER, content=body, headers=headers)
    assert as_binary.status_code == 200, as_binary.text
    assert as_binary.headers["content-type"] == "application/octet-stream"
    length = int(as_binary.headers[HEADER])
    header = json.loads(as_binary.content[:length])
    (binary_output,) = header["outputs"]
    assert binary_output["parameters"] == {"binary_data_size": 3 * 10 * 4}
    assert "data" not in binary_output
    logits = np.frombuffer(as_binary.content[length:], dtype="<f4").reshape(3, 10)
    assert np.array_equal(logits, np.asarray(json_output["data"], dtype=np.float32).reshape(3, 10))


def test_fp64_input_is_accepted_and_cast(client: TestClient) -> None:
    x = np.random.default_rng(1).random((2, 1, 28, 28))
    body, headers = framed({"inputs": [binary_input(x, datatype="FP64")]}, x.tobytes())
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == 200, response.text
    same32 = x.astype(np.float32)
    body32, headers32 = framed({"inputs": [binary_input(same32)]}, same32.tobytes())
    assert response.json() == client.post(INFER, content=body32, headers=headers32).json()


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("size_over_body", ["inputs[0].parameters.binary_data_size", "only 3136 bytes"]),
        ("bytes_left_over", [HEADER, "add up to 3136"]),
        ("size_not_shape", ["inputs[0].parameters.binary_data_size", "3132 bytes", "3136"]),
        ("negative_size", ["inputs[0].parameters.binary_data_size", "integer >= 0"]),
        ("data_and_size", ["inputs[0].data", "remove data"]),
        ("nan", ["inputs[0].parameters.binary_data_size", "NaN"]),
    ],
)
def test_binary_size_errors_name_the_field(client: TestClient, case: str, words: list[str]) -> None:
    x = np.zeros((1, 1, 28, 28), dtype=np.float32)
    tail = x.tobytes()
    tensor = binary_input(x)
    if case == "size_over_body":
        tensor["parameters"]["binary_data_size"] = 4000
    elif case == "bytes_left_over":
        tail += b"\0" * 8
    elif case == "size_not_shape":
        tensor["parameters"]["binary_data_size"] = 3132
        tail = tail[:3132]
    elif case == "negative_size":
        tensor["parameters"]["binary_data_size"] = -1
    elif case == "data_and_size":
        tensor["data"] = [0.0] * 784
    elif case == "nan":
        tail = np.full((1, 1, 28, 28), np.nan, dtype=np.float32).tobytes()
    body, headers = framed({"inputs": [tensor]}, tail)
    error(client.post(INFER, content=body, headers=headers), 400, *words)


@pytest.mark.parametrize("length", ["abc", "0", "999999"])
def test_bad_header_length_is_400(client: TestClient, length: str) -> None:
    response = client.post(INFER, content=b'{"inputs": []}', headers={HEADER: length})
    error(response, 400, HEADER)


@pytest.mark.parametrize(
    ("tensor", "outputs", "words"),
    [
        ({"name": "image"}, None, ["inputs[0].name", "'x'"]),
        ({"datatype": "BYTES"}, None, ["inputs[0].datatype", "BYTES tensors are not supported"]),
        ({"datatype": "INT32"}, None, ["inputs[0].datatype", "FP32"]),
        ({"shape": [1, 28, 28]}, None, ["inputs[0].shape", "[B, 1, 28, 28]"]),
        ({"shape": [0, 1, 28, 28], "data": []}, None, ["inputs[0].shape", "between 1 and"]),
        ({"data": None}, None, ["inputs[0].data", "missing"]),
        ({"data": [1.0, 2.0]}, None, ["inputs[0].data", "784"]),
        ({}, [{"name": "probabilities"}], ["outputs[0].name", "'output'"]),
        ({"extra": 1}, None, ["inputs[0].extra"]),
    ],
)
def test_request_errors_are_400_naming_the_field(
    client: TestClient, tensor: dict[str, Any], outputs: Any, words: list[str]
) -> None:
    given = {"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}
    given.update(tensor)
    if given.get("data") is None:
        given.pop("data")
    request: dict[str, Any] = {"inputs": [given]}
    if outputs is not None:
        request["outputs"] = outputs
    error(client.post(INFER, json=request), 400, *words)


def test_invalid_json_and_unknown_models(client: TestClient) -> None:
    error(client.post(INFER, content=b"{not json"), 400, "body: invalid JSON")
    error(client.post(INFER, content=b"[1, 2]"), 400, "expected a JSON object")
    error(client.post("/v2/models/nope/infer", json={"inputs": []}), 404, "'nope'")
    error(client.get("/v2/models/nope"), 404, "'nope'")
    error(client.get("/v2/models/digits_cnn/versions/2"), 404, "no version '2'", "versions: 1")
    error(client.get("/v2/models/nope/ready"), 404)
    assert client.get("/v2/models/digits_cnn/versions/1/ready").json() == {
        "name": "digits_cnn",
        "ready": True,
    }


def test_health_and_server_metadata(client: TestClient) -> None:
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2").json() == {
        "name": "hessian-service",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data"],
    }


def test_hessian_binary_encoding_carries_the_base64_bytes(client: TestClient) -> None:
    request = {
        "model": "quadratic4",
        "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [1, 2, 3, 4] * 2}],
        "output_index": [1, 2],
        "precision": "float64",
    }
    as_base64 = client.post("/hessian", json={**request, "encoding": "base64"}).json()
    response = client.post("/hessian", json={**request, "encoding": "binary"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers[HEADER])
    header = json.loads(response.content[:length])
    assert header["metadata"] == as_base64["metadata"] | {
        "compute_ms": header["metadata"]["compute_ms"]
    }
    tail = response.content[length:]
    offset = 0
    for got, want in zip(header["outputs"], as_base64["outputs"], strict=True):
        size = got["parameters"]["binary_data_size"]
        assert {k: got[k] for k in ("name", "shape", "datatype")} == {
            k: want[k] for k in ("name", "shape", "datatype")
        }
        assert tail[offset : offset + size] == base64.b64decode(want["data"])
        offset += size
    assert offset == len(tail)
    hessian = np.frombuffer(tail[: 2 * 2 * 16 * 8], dtype="<f8").reshape(2, 2, 4, 4)
    assert np.array_equal(hessian[0, 0], np.diag([0.0, 2.0, 0.0, 0.0]))
    assert np.array_equal(hessian[1, 1], np.diag([0.0, 0.0, 4.0, 0.0]))


def test_openapi_documents_binary_encoding_and_v2(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    encoding = spec["components"]["schemas"]["DerivativeRequest"]["properties"]["encoding"]
    assert encoding["enum"] == ["json", "base64", "binary", "png"]
    assert (
        "application/octet-stream"
        in spec["paths"]["/hessian"]["post"]["responses"]["200"]["content"]
    )
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]
    body = infer["requestBody"]["content"]
    assert "$defs" not in json.dumps(body)  # inlined: resolvable in the document
    assert body["application/json"]["schema"]["properties"]["inputs"]["items"]["properties"][
        "parameters"
    ]
    for path in ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}/ready"):
        assert path in spec["paths"]
