"""Contract details of the HTTP API, in process: what an outside review found missing.

405 carries ``Allow``; unmatched ``/v2`` paths answer the protocol's ``{"error": ...}``;
every problem+json carries a top-level ``field``; JSON booleans are not numbers; a model
reference ``name@`` is refused; the OpenAPI document says what is sent (v2 health with no
body, the problem schema on every error, operation ids a generated client can use).
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.errors import NotReady, Overloaded
from app.errors import problem_of as body_of

PROBLEM = "application/problem+json"
X4 = {"name": "x", "shape": [4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}


def problem_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    assert "field" in body, body
    return body


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/health/live", "GET"),
        ("DELETE", "/health/ready", "GET"),
        ("GET", "/hessian", "POST"),
        ("PUT", "/jacobian", "POST"),
        ("PATCH", "/models", "GET, POST"),
        ("PUT", "/models/quadratic4", "GET, DELETE"),
    ],
)
def test_405_names_the_allowed_methods_in_allow(
    client: TestClient, method: str, path: str, allowed: str
) -> None:
    response = client.request(method, path)
    body = problem_of(response, 405)
    assert sorted(response.headers["allow"].split(", ")) == sorted(allowed.split(", "))
    assert body["field"] == "method" and allowed.split(", ")[0] in body["detail"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v2/nowhere", 404),
        ("GET", "/v2/models/quadratic4/versions//ready", 404),
        ("POST", "/v2/models/quadratic4/outputs", 404),
        ("POST", "/v2/health/live", 405),
        ("DELETE", "/v2", 405),
        ("GET", "/v2/models/quadratic4/infer", 405),
    ],
)
def test_unmatched_v2_paths_answer_the_protocol_error(
    client: TestClient, method: str, path: str, status: int
) -> None:
    response = client.request(method, path)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and path in body["error"]
    if status == 405:
        assert response.headers["allow"]


def test_outside_v2_an_unmatched_path_stays_a_problem(client: TestClient) -> None:
    body = problem_of(client.get("/v2x"), 404)
    assert body["field"] == "path" and "/v2x" in body["detail"]


@pytest.mark.parametrize(
    ("change", "status", "field"),
    [
        ({"objective": {"type": "cross_entropy", "target": -1}}, 422, "objective.target"),
        ({"objective": {"type": "cross_entropy", "target": [0, -2]}}, 422, "objective.target"),
        ({"objective": {"type": "log_softmax", "index": -1}}, 422, "objective.index"),
        ({"objective": {"type": "mse", "target": "x"}}, 422, "objective.target"),
        ({"output_index": "2"}, 422, "output_index"),
        ({"inputs": [{**X4, "shape": [-4]}]}, 422, "inputs[0].shape[0]"),
        ({"inputs": [{"name": "x", "data": [1.0] * 4}]}, 422, "inputs[0].shape"),
        ({"layout": "sideways"}, 422, "layout"),
        ({"surprise": 1}, 422, "surprise"),
        ({"model": "nope"}, 404, "model"),
        ({"output_index": 9}, 422, "output_index"),
    ],
)
def test_every_problem_names_its_field_at_the_top(
    client: TestClient, change: dict[str, Any], status: int, field: str
) -> None:
    request = {"model": "quadratic4", "inputs": [X4], "output_index": 1, **change}
    if "objective" in change:
        request.pop("output_index")
    body = problem_of(client.post("/hessian", json=request), status)
    assert body["field"] == field, body
    if status == 422 and "errors" in body:  # request validation: the first error's field
        assert body["errors"][0]["field"] == field
        if change.get("objective", {}).get("target") == [0, -2]:  # and the list member's
            assert "objective.target[1]" in [error["field"] for error in body["errors"]]


def test_errors_without_a_field_carry_field_null(client: TestClient) -> None:
    assert body_of(Overloaded("queue full"))["field"] is None
    assert body_of(NotReady("loading"))["field"] is None
    not_utf8 = client.post(
        "/hessian", content=b"\xff\xfe{", headers={"content-type": "application/json"}
    )
    assert problem_of(not_utf8, not_utf8.status_code)["field"] == "body"
    assert not_utf8.status_code in (400, 422)
