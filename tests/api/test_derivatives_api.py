"""The HTTP contract of /jacobian, /hessian, /models and /health, in process.

Values are checked against the engine's independent references elsewhere; here they are
checked against closed forms and against each other (batch vs single, json vs base64).
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from hessian_service.api.examples import digit_image

PROBLEM = "application/problem+json"


def tensor(shape: list[int], data: list[float] | str, datatype: str = "FP32") -> dict[str, Any]:
    return {"name": "x", "shape": shape, "datatype": datatype, "data": data}


def matrix(body: dict[str, Any], name: str = "hessian") -> np.ndarray:
    (obj,) = [o for o in body["outputs"] if o["name"] == name]
    dtype = {"FP32": "<f4", "FP64": "<f8"}[obj["datatype"]]
    data = obj["data"]
    array = (
        np.frombuffer(base64.b64decode(data), dtype=dtype)
        if isinstance(data, str)
        else np.asarray(data, dtype=dtype)
    )
    return array.reshape(obj["shape"])


def post(client: TestClient, route: str, **body: Any) -> dict[str, Any]:
    response = client.post(route, json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_jacobian_layouts_and_selections(client: TestClient) -> None:
    x = tensor([4], [2.0, 2.0, 2.0, 2.0])
    full = post(client, "/jacobian", model="quadratic4", inputs=[x])
    assert np.array_equal(matrix(full, "jacobian"), np.diag([0.0, 4.0, 8.0, 12.0]))
    row = post(client, "/jacobian", model="quadratic4", inputs=[x], output_index=2)
    assert np.array_equal(matrix(row, "jacobian"), [0.0, 0.0, 8.0, 0.0])
    rows = post(client, "/jacobian", model="quadratic4", inputs=[x], output_index=[3, 1])
    assert np.array_equal(matrix(rows, "jacobian"), [[0, 0, 0, 12.0], [0, 4.0, 0, 0]])
    image = tensor([1, 28, 28], digit_image())
    cnn = post(client, "/jacobian", model="digits_cnn", inputs=[image], layout="tensor")
    assert cnn["outputs"][0]["shape"] == [10, 1, 28, 28]
    assert cnn["metadata"]["method"] == "structured"


def test_hessian_output_index_list_and_tensor_layout(client: TestClient) -> None:
    x = tensor([1, 4], [2.0, 2.0, 2.0, 2.0])
    body = post(client, "/hessian", model="quadratic4", inputs=[x], output_index=[1, 3])
    assert body["metadata"]["batch_size"] == 1
    expected = np.stack([np.diag([0, 2.0, 0, 0]), np.diag([0, 0, 0, 6.0])])
    assert np.array_equal(matrix(body), expected[None])
    tensor_layout = post(
        client, "/hessian", model="quadratic4", inputs=[x], output_index=[1, 3], layout="tensor"
    )
    assert tensor_layout["outputs"][0]["shape"] == [1, 2, 4, 4]


@pytest.mark.parametrize(
    ("objective", "expected"),
    [
        ({"type": "sum"}, np.zeros((4, 4))),
        ({"type": "mse", "target": 1}, np.full((4, 4), 0.5)),
        ({"type": "mse", "target": [1.0]}, np.full((4, 4), 0.5)),
        ({"type": "mse", "target": tensor([1], [3.0])}, np.full((4, 4), 0.5)),
    ],
)
def test_linear4_objectives(client: TestClient, objective: dict[str, Any], expected: Any) -> None:
    body = post(
        client, "/hessian", model="linear4", inputs=[tensor([4], [1.0] * 4)], objective=objective
    )
    assert np.allclose(matrix(body), expected, atol=1e-6, rtol=0)
    assert body["metadata"]["objective"] == objective["type"]


def test_cross_entropy_per_sample_targets(client: TestClient) -> None:
    image = digit_image()
    batch = tensor([2, 1, 28, 28], image + image)
    body = post(
        client,
        "/hessian",
        model="mlp_tanh",
        inputs=[batch],
        objective={"type": "cross_entropy", "target": [2, 7]},
    )
    per_sample = [
        matrix(
            post(
                client,
                "/hessian",
                model="mlp_tanh",
                inputs=[tensor([1, 28, 28], image)],
                objective={"type": "cross_entropy", "target": c},
            )
        )
        for c in (2, 7)
    ]
    assert np.allclose(matrix(body)[0], per_sample[0], rtol=1e-5, atol=1e-6)
    assert np.allclose(matrix(body)[1], per_sample[1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(per_sample[0], per_sample[1])


def test_relu_model_with_objective_explains_its_curvature(client: TestClient) -> None:
    image = tensor([1, 28, 28], digit_image())
    raw = post(client, "/hessian", model="mlp_relu", inputs=[image], output_index=0)
    assert raw["metadata"]["zero"] is True
    assert "zero almost everywhere" in raw["metadata"]["notes"][0]
    loss = post(
        client,
        "/hessian",
        model="mlp_relu",
        inputs=[image],
        objective={"type": "log_softmax", "index": 2},
    )
    assert loss["metadata"]["zero"] is False
    assert "J^T H_objective J" in loss["metadata"]["notes"][0]


def _problem(client: TestClient, route: str, body: Any, status: int) -> dict[str, Any]:
    response = client.post(route, json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status and problem["title"] and problem["detail"]
    return problem


GOOD = {"model": "digits_cnn", "inputs": [tensor([1, 28, 28], [0.0] * 784)], "output_index": 2}


@pytest.mark.parametrize(
    ("change", "status", "needle"),
    [
        ({"model": "nope"}, 404, "model 'nope' is not loaded"),
        ({"inputs": [tensor([28, 28], [0.0] * 784)]}, 422, "expected [1, 28, 28] (one sample)"),
        (
            {"inputs": [tensor([1, 28, 28], [0.0] * 783)]},
            422,
            "holds 783 numbers; shape expects 784",
        ),
        ({"inputs": [tensor([1, 28, 28], "@@@")]}, 422, "malformed base64"),
        ({"inputs": [tensor([1, 28, 28], [0.0] * 784, "STR")]}, 422, "inputs[0].datatype"),
        ({"output_index": 10}, 422, "output_index: 10 is out of range; the model has 10 outputs"),
        ({"output_index": -1}, 422, "output_index: -1 is out of range"),
        ({"output_index": None}, 422, "output_index: required for /hessian"),
        ({"output_index": []}, 422, "a list must hold 1 to 64 indices"),
        ({"output_index": True}, 422, "output_index"),
        ({"objective": {"type": "sum"}}, 422, "give output_index or objective, not both"),
        (
            {"output_index": None, "objective": {"type": "log_softmax", "index": 10}},
            422,
            "objective.index",
        ),
        (
            {"output_index": None, "objective": {"type": "cross_entropy", "target": [1, 2]}},
            422,
            "objective.target",
        ),
        (
            {"output_index": None, "objective": {"type": "mse", "target": [1, 2]}},
            422,
            "objective.target",
        ),
        ({"output_index": None, "objective": {"type": "huber"}}, 422, "objective"),
        ({"layout": "sideways"}, 422, "layout"),
        ({"precision": "float16"}, 422, "precision"),
        ({"surprise": 1}, 422, "surprise"),
        ({"inputs": [tensor([65537, 1, 28, 28], "")]}, 422, "between 1 and 65536, got 65537"),
        # 300 Hessians of 784 inputs: 738 MB, over the 512 MiB result limit, before decoding
        ({"inputs": [tensor([300, 1, 28, 28], "")]}, 413, "inputs[0].shape: the hessian would"),
    ],
)
def test_bad_input_is_a_4xx_problem_naming_the_field(
    client: TestClient, change: dict[str, Any], status: int, needle: str
) -> None:
    problem = _problem(client, "/hessian", {**GOOD, **change}, status)
    assert needle in problem["detail"], problem


def test_nan_in_json_body_is_422(client: TestClient) -> None:
    raw = (
        '{"model": "quadratic4", "output_index": 0, '
        '"inputs": [{"shape": [4], "datatype": "FP32", "data": [1, NaN, 1, 1]}]}'
    )
    response = client.post("/hessian", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422 and "NaN or Inf" in response.json()["detail"]


def test_non_json_body_is_422(client: TestClient) -> None:
    response = client.post(
        "/hessian", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM


def test_unknown_route_is_a_problem(client: TestClient) -> None:
    response = client.get("/nowhere")
    assert response.status_code == 404 and response.headers["content-type"] == PROBLEM


def test_models_and_health(client: TestClient) -> None:
    assert client.get("/health/live").json()["status"] == "ok"
    ready = client.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["models_loaded"] == 6
    listed = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert set(listed) == {
        "linear4",
        "quadratic4",
        "mlp_tanh",
        "mlp_relu",
        "digits_cnn",
        "photo_digits_cnn",
    }
    assert listed["linear4"]["curvature"] == "affine"
    assert listed["mlp_relu"]["curvature"] == "piecewise_linear"
    cnn = client.get("/models/digits_cnn").json()
    assert cnn["input_shape"] == [1, 28, 28] and cnn["training"]["held_out_accuracy"] >= 0.95
    assert client.get("/models/nope").status_code == 404


def test_every_openapi_example_succeeds_as_it_stands(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    count = 0
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            content = operation.get("requestBody", {}).get("content", {})
            for example in content.get("application/json", {}).get("examples", {}).values():
                response = client.request(method, path, json=example["value"])
                accepted = 202 if path == "/jobs" else 200  # a job is accepted, then run
                assert response.status_code == accepted, (path, example["summary"], response.text)
                count += 1
    assert count >= 6


def test_docs_assets_are_served_by_the_app(client: TestClient) -> None:
    page = client.get("/docs").text
    assert "cdn" not in page.lower()
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        (url,) = {
            part.split('"')[0] for part in page.split("'") + page.split('"') if part.endswith(asset)
        }
        assert url.startswith("/"), url
        assert client.get(url).status_code == 200
