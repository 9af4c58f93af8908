"""Contract details of the HTTP API, in process: what an outside review found missing.

405 carries ``Allow``; unmatched ``/v2`` paths answer the protocol's ``{"error": ...}``;
every problem+json carries a top-level ``field``; JSON booleans are not numbers; a model
reference ``name@`` is refused; the OpenAPI document says what is sent (v2 health with no
body, the problem schema on every error, operation ids a generated client can use).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hessian_service.errors import InvalidInput, NotReady, Overloaded
from hessian_service.errors import problem_of as body_of
from hessian_service.wire.codec import check_numbers

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


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v2/health/live", {"live": True}), ("/v2/health/ready", {"ready": True})],
)
def test_v2_health_answers_with_the_status_and_kserves_body(
    client: TestClient, path: str, body: dict[str, bool]
) -> None:
    """tritonclient reads the status; KServe's client the body's field."""
    response = client.get(path)
    assert response.status_code == 200 and response.json() == body
    assert response.headers["content-type"] == "application/json"
    operation = client.get("/openapi.json").json()["paths"][path]["get"]
    assert "application/json" in operation["responses"]["200"]["content"], operation


EXPECTED_OPERATION_IDS = {
    ("post", "/hessian"): "hessian",
    ("post", "/jacobian"): "jacobian",
    ("post", "/hvp"): "hvp",
    ("post", "/jvp"): "jvp",
    ("post", "/vjp"): "vjp",
    ("post", "/hessian/diagonal"): "hessian_diagonal",
    ("post", "/hessian/trace"): "hessian_trace",
    ("post", "/hessian/eigen"): "hessian_eigen",
    ("get", "/jobs"): "list_jobs",
    ("post", "/jobs"): "submit_job",
    ("get", "/jobs/{job_id}"): "get_job",
    ("delete", "/jobs/{job_id}"): "cancel_job",
    ("get", "/jobs/{job_id}/result"): "get_job_result",
    ("get", "/models"): "list_models",
    ("get", "/models/{name}"): "get_model",
    ("post", "/models"): "register_model",
    ("delete", "/models/{name}"): "delete_model",
    ("get", "/health/live"): "health_live",
    ("get", "/health/ready"): "health_ready",
    ("get", "/metrics"): "metrics",
    ("get", "/v2"): "v2_server_metadata",
    ("get", "/v2/health/live"): "v2_health_live",
    ("get", "/v2/health/ready"): "v2_health_ready",
    ("get", "/v2/models/{name}"): "v2_model_metadata",
    ("get", "/v2/models/{name}/versions/{version}"): "v2_model_version_metadata",
    ("get", "/v2/models/{name}/ready"): "v2_model_ready",
    ("get", "/v2/models/{name}/versions/{version}/ready"): "v2_model_version_ready",
    ("post", "/v2/models/{name}/infer"): "v2_model_infer",
    ("post", "/v2/models/{name}/versions/{version}/infer"): "v2_model_version_infer",
    ("get", "/Info"): "umbridge_info",
    ("post", "/ModelInfo"): "umbridge_model_info",
    ("post", "/InputSizes"): "umbridge_input_sizes",
    ("post", "/OutputSizes"): "umbridge_output_sizes",
    ("post", "/Evaluate"): "umbridge_evaluate",
    ("post", "/Gradient"): "umbridge_gradient",
    ("post", "/ApplyJacobian"): "umbridge_apply_jacobian",
    ("post", "/ApplyHessian"): "umbridge_apply_hessian",
}
# What each operation can answer besides 2xx: the document must declare at least these.
EXPECTED_ERRORS = {
    "hessian": {400, 404, 413, 422, 503, 504, 507},
    "jacobian": {400, 404, 413, 422, 503, 504, 507},
    **{
        name: {400, 404, 413, 422, 503, 504, 507}
        for name in ("hvp", "jvp", "vjp", "hessian_diagonal", "hessian_trace", "hessian_eigen")
    },
    "submit_job": {404, 413, 422, 503},
    "get_job": {404},
    "cancel_job": {404},
    "get_job_result": {404, 409, 422},
    "get_model": {404, 422},
    "register_model": {400, 401, 403, 409, 413, 422},
    "delete_model": {401, 403, 404, 422},
    "health_ready": {503},
    "v2_health_ready": {503},
    "v2_model_metadata": {400, 404},
    "v2_model_infer": {400, 404, 413},
    **{name: {400} for name in ("umbridge_model_info", "umbridge_input_sizes")},
    **{
        f"umbridge_{name}": {400, 413, 503, 504}
        for name in ("evaluate", "gradient", "apply_jacobian", "apply_hessian")
    },
}


def _operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method, path): operation
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
    }


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(_refs(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(item) for item in node))
    return set()


def test_openapi_operation_ids_a_generated_client_can_use(client: TestClient) -> None:
    operations = _operations(client.get("/openapi.json").json())
    assert {key: op.get("operationId") for key, op in operations.items()} == (
        EXPECTED_OPERATION_IDS
    )


def test_every_documented_error_references_the_problem_schema(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert {"type", "title", "status", "detail", "field", "errors"} <= set(
        schemas["Problem"]["properties"]
    )
    assert "field" in schemas["Problem"]["required"]
    assert "HTTPValidationError" not in str(spec)  # FastAPI's default 422 is never sent
    for ref in _refs(spec):  # every reference resolves in the document
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    for (method, path), operation in _operations(spec).items():
        errors = {  # "4XX": OpenAPI's range of client errors (a failed job's own status)
            (400 if s == "4XX" else int(s)): r
            for s, r in operation["responses"].items()
            if s == "4XX" or int(s) >= 400
        }
        wanted = EXPECTED_ERRORS.get(operation["operationId"], set())
        assert wanted <= set(errors), (method, path, sorted(errors))
        for status, response in errors.items():
            content = response.get("content", {})
            if path.startswith("/v2"):
                assert "#/components/schemas/ErrorBody" in _refs(content), (path, status)
            elif operation["operationId"].startswith("umbridge_"):  # the protocol's shape
                assert "#/components/schemas/ErrorResponse" in _refs(content), (path, status)
            else:
                assert set(content) == {PROBLEM}, (method, path, status)
                schema = content[PROBLEM]["schema"]
                assert schema == {"$ref": "#/components/schemas/Problem"}, (path, status)


@pytest.mark.parametrize(
    ("shape", "data"),
    [
        ([4], [True, False, True, False]),
        ([4], [1.0, True, 3.0, 4.0]),  # numpy would cast it to 1.0 silently
        ([4], [0, 1, 2, True]),
        ([2, 4], [[1.0, 2.0, 3.0, 4.0], [False, 4.0, 3.0, 2.0]]),
    ],
)
def test_json_booleans_are_not_numbers(
    client: TestClient, shape: list[int], data: list[Any]
) -> None:
    request = {"model": "quadratic4", "inputs": [{**X4, "shape": shape, "data": data}]}
    body = problem_of(client.post("/jacobian", json=request), 422)
    assert body["field"] == "inputs[0].data" and "boolean" in body["detail"], body


def test_booleans_elsewhere_are_not_numbers_either(client: TestClient) -> None:
    base = {"model": "quadratic4", "inputs": [X4]}
    cases = [
        ({"objective": {"type": "mse", "target": [1.0, True, 0.0, 0.0]}}, "objective.target"),
        ({"objective": {"type": "mse", "target": True}}, "objective.target"),
        ({"objective": {"type": "cross_entropy", "target": True}}, "objective.target"),
        ({"objective": {"type": "log_softmax", "index": False}}, "objective.index"),
        ({"inputs": [{**X4, "shape": [True, 4]}]}, "inputs[0].shape[0]"),
        ({"inputs": [{**X4, "shape": ["4"]}]}, "inputs[0].shape[0]"),
    ]
    for change, field in cases:
        body = problem_of(client.post("/hessian", json={**base, **change}), 422)
        assert body["field"] == field, (change, body)
    v2 = client.post(
        "/v2/models/quadratic4/infer",
        json={"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [True] * 4}]},
    )
    assert v2.status_code == 400 and "inputs[0].data" in v2.json()["error"], v2.text


def test_a_million_numbers_are_checked_for_booleans_in_milliseconds() -> None:
    numbers = [float(i) for i in range(1_000_000)]
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        check_numbers(numbers, "inputs[0].data")
        timings.append(time.perf_counter() - start)
    assert min(timings) < 0.1, timings  # about 20 ms on one core; parsing takes longer
    with pytest.raises(InvalidInput, match="boolean") as caught:
        check_numbers([*numbers[:-1], True], "inputs[0].data")
    assert caught.value.field == "inputs[0].data"


def test_bool_datatype_still_takes_booleans(client: TestClient) -> None:
    request = {
        "model": "quadratic4",
        "inputs": [{"name": "x", "shape": [4], "datatype": "BOOL", "data": [True, False] * 2}],
    }
    response = client.post("/jacobian", json=request)
    assert response.status_code == 200, response.text
    jacobian = response.json()["outputs"][0]["data"]
    assert jacobian == [0.0] * 5 + [0.0] * 5 + [4.0] + [0.0] * 5  # diag(2 * arange(4) * x)


@pytest.mark.parametrize("model", ["quadratic4@", "@1", "quadratic4@1@1", "../quadratic4", ""])
def test_a_model_reference_must_be_name_or_name_at_version(client: TestClient, model: str) -> None:
    request = {"model": model, "inputs": [X4], "output_index": 1}
    body = problem_of(client.post("/hessian", json=request), 422)
    assert body["field"] == "model", body
    assert client.post("/hessian", json={**request, "model": "quadratic4@1"}).status_code == 200


def test_paths_refuse_an_empty_version_too(client: TestClient) -> None:
    body = problem_of(client.get("/models/quadratic4@"), 422)
    assert body["field"] == "name"
    assert client.get("/models/quadratic4@1").status_code == 200
    for path in ("/v2/models/quadratic4@", "/v2/models/quadratic4@/ready"):
        response = client.get(path)
        assert response.status_code == 400 and response.json()["error"].startswith("name:")
    infer = client.post("/v2/models/quadratic4@/infer", json={"inputs": []})
    assert infer.status_code == 400 and infer.json()["error"].startswith("name:")
