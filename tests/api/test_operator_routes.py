"""/hvp, /jvp, /vjp, /hessian/diagonal, /hessian/trace and /hessian/eigen over HTTP, in process.

Every value is checked against an independent float64 reference computed here from the
bundled model itself: the dense ``torch.func.hessian`` and ``torch.func.jacrev`` of the
selected scalar (outputs), ``torch.linalg.eigh`` of that dense Hessian. Exact answers
must agree to 1e-10 relative (float64 end to end: the request's ``precision`` and FP64
tensors on the wire); estimates must lie within a few of their own standard errors.
Each route is exercised in the json, base64 and binary encodings (decoded by the
client's decoder, ``hessian_client._wire``), every refusal names its field, and a dense
``/hessian`` over a low ``HESSIAN_MAX_RESULT_BYTES`` gets a 413 that names the operators
that would fit, with estimates that are within the limits.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hessian_client._wire import decode_response

from hessian_service.api.examples import digit_image
from hessian_service.config import Settings
from hessian_service.main import create_app
from tests.device import TEST_DEVICE
from tests.unit.operators_helpers import bundled

PROBLEM = "application/problem+json"
ENCODINGS = ["json", "base64", "binary"]
INDEX = 3  # the selected logit of the 10-class digit models
EXACT = 1e-10  # relative tolerance of an exact float64 answer


def _fp64(array: np.ndarray, encoding: str) -> dict[str, Any]:
    """A float64 tensor object: base64 bytes for the base64 and binary encodings (the
    inputs' only byte form), JSON numbers (shortest repr: exact) otherwise."""
    array = np.ascontiguousarray(array, dtype="<f8")
    data: Any = (
        base64.b64encode(array.tobytes()).decode("ascii")
        if encoding != "json"
        else array.reshape(-1).tolist()
    )
    return {"name": "v", "shape": list(array.shape), "datatype": "FP64", "data": data}


class Reference:
    """One model at the digit, in float64: its output, Jacobian and the dense Hessian of
    logit ``INDEX``, computed with torch.func on the shipped weights loaded here (no
    service code: not the registry's loader either)."""

    def __init__(self, client: TestClient, name: str) -> None:
        loaded = client.app.state.registry.get(name)  # type: ignore[attr-defined]
        self.name = name
        self.shape = list(loaded.manifest.input_shape)
        module = bundled(name)
        x = torch.tensor(digit_image(), dtype=torch.float64).reshape(1, *self.shape)
        self.x = x.numpy().reshape(self.shape)

        def outputs(flat: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = module(flat.reshape(1, *self.shape))
            return out.reshape(-1)

        flat = x.reshape(-1)
        self.n = flat.numel()
        with torch.no_grad():
            self.output = outputs(flat).numpy()
        self.jacobian = torch.func.jacrev(outputs)(flat).detach().numpy()  # [10, n]
        self.hessian = (
            torch.func.hessian(lambda f: outputs(f)[INDEX])(flat).detach().numpy()
        )  # [n, n]

    def body(self, encoding: str, **extra: Any) -> dict[str, Any]:
        return {
            "model": self.name,
            "inputs": [_fp64(self.x, encoding)],
            "precision": "float64",
            "encoding": encoding,
            **extra,
        }


@pytest.fixture(scope="module")
def mlp(client: TestClient) -> Reference:
    return Reference(client, "mlp_tanh")


@pytest.fixture(scope="module")
def cnn(client: TestClient) -> Reference:
    return Reference(client, "digits_cnn")


def _post(
    client: TestClient, route: str, body: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    response = client.post(route, json=body)
    assert response.status_code == 200, response.text
    if body.get("encoding") == "binary":
        assert response.headers["content-type"] == "application/octet-stream"
    decoded = decode_response(response.content, response.headers)
    assert all(o["datatype"] == "FP64" for o in decoded.body["outputs"])
    return decoded.body, decoded.arrays


def _close(got: np.ndarray, expected: np.ndarray, rtol: float = EXACT) -> None:
    """Equal to ``rtol`` relative to the reference's largest entry."""
    assert got.shape == expected.shape
    scale = float(np.abs(expected).max())
    assert scale > 0
    assert float(np.abs(got - expected).max()) <= rtol * scale, float(np.abs(got - expected).max())


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_products_equal_the_dense_references(
    client: TestClient, mlp: Reference, encoding: str
) -> None:
    rng = np.random.default_rng(7)
    v = rng.standard_normal((3, *mlp.shape))
    body, arrays = _post(
        client, "/hvp", mlp.body(encoding, output_index=INDEX, vectors=_fp64(v, encoding))
    )
    _close(arrays["hvp"], (v.reshape(3, -1) @ mlp.hessian).reshape(3, *mlp.shape))
    _close(arrays["output"], mlp.output)
    metadata = body["metadata"]
    assert (metadata["products"], metadata["exact"], metadata["batch_size"]) == (3, True, None)

    _, arrays = _post(client, "/jvp", mlp.body(encoding, vectors=_fp64(v, encoding)))
    _close(arrays["jvp"], v.reshape(3, -1) @ mlp.jacobian.T)  # [m, 10]
    _, arrays = _post(
        client, "/jvp", mlp.body(encoding, output_index=[1, 4], vectors=_fp64(v, encoding))
    )
    _close(arrays["jvp"], v.reshape(3, -1) @ mlp.jacobian[[1, 4]].T)  # [m, k]

    u = rng.standard_normal((2, 10))
    _, arrays = _post(client, "/vjp", mlp.body(encoding, vectors=_fp64(u, encoding)))
    _close(arrays["vjp"], (u @ mlp.jacobian).reshape(2, *mlp.shape))


def test_batched_products_per_sample_and_shared(client: TestClient, mlp: Reference) -> None:
    """A batch [B, *in] takes [B, m, *in] vectors (each sample its own) or [m, *in] (the
    same for every sample); two copies of the digit give the reference twice."""
    xs = np.stack([mlp.x, mlp.x])
    rng = np.random.default_rng(3)
    own = rng.standard_normal((2, 2, *mlp.shape))
    body = {**mlp.body("base64"), "inputs": [_fp64(xs, "base64")]}
    reply, arrays = _post(
        client, "/hvp", {**body, "output_index": INDEX, "vectors": _fp64(own, "base64")}
    )
    expected = (own.reshape(4, -1) @ mlp.hessian).reshape(2, 2, *mlp.shape)
    _close(arrays["hvp"], expected)
    assert reply["metadata"]["products"] == 4 and reply["metadata"]["batch_size"] == 2
    shared = own[0]
    _, arrays = _post(
        client, "/hvp", {**body, "output_index": INDEX, "vectors": _fp64(shared, "base64")}
    )
    _close(arrays["hvp"], np.stack([expected[0], expected[0]]))


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_exact_diagonal_and_trace_equal_the_dense_hessian(
    client: TestClient, cnn: Reference, encoding: str
) -> None:
    body, arrays = _post(
        client, "/hessian/diagonal", cnn.body(encoding, output_index=INDEX, exact=True)
    )
    _close(arrays["diagonal"], np.diag(cnn.hessian).reshape(cnn.shape))
    assert body["metadata"]["exact"] is True and "standard_error" not in arrays
    assert body["metadata"]["products"] >= 1
    body, arrays = _post(
        client, "/hessian/trace", cnn.body(encoding, output_index=INDEX, exact=True)
    )
    assert arrays["trace"].shape == ()
    assert (
        abs(float(arrays["trace"]) - np.trace(cnn.hessian))
        <= EXACT * np.abs(np.diag(cnn.hessian)).sum()
    )
    assert body["metadata"]["exact"] is True


def test_estimates_report_exact_false_and_standard_errors(
    client: TestClient, cnn: Reference
) -> None:
    """A seeded estimate (deterministic): the trace lies within 4 of its own standard
    errors of the dense value, and at least 95% of the diagonal's entries within 4 of
    theirs (errors per entry, in the input's shape)."""
    body, arrays = _post(
        client,
        "/hessian/trace",
        cnn.body("json", output_index=INDEX, exact=False, max_products=90, seed=1),
    )
    metadata = body["metadata"]
    assert metadata["exact"] is False and metadata["products"] <= 90
    assert metadata["method"] == "hutch++"
    error = float(arrays["standard_error"])
    assert error > 0
    assert abs(float(arrays["trace"]) - np.trace(cnn.hessian)) <= 4 * error
    assert any("estimate" in note for note in metadata["notes"])

    body, arrays = _post(
        client,
        "/hessian/diagonal",
        cnn.body("base64", output_index=INDEX, exact=False, max_products=64),
    )
    assert body["metadata"]["exact"] is False and body["metadata"]["products"] <= 64
    errors = arrays["standard_error"]
    assert errors.shape == arrays["diagonal"].shape == tuple(cnn.shape)
    inside = (
        np.abs(arrays["diagonal"] - np.diag(cnn.hessian).reshape(cnn.shape)) <= 4 * errors + 1e-12
    )
    assert inside.mean() >= 0.95


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_eigenpairs_match_eigh_of_the_dense_hessian(
    client: TestClient, mlp: Reference, encoding: str
) -> None:
    values = np.linalg.eigvalsh(mlp.hessian)
    cases = [("largest", values[::-1][:3])]
    if encoding == "json":  # the order of |value| once: the encodings are covered above
        cases.append(("magnitude", values[np.argsort(-np.abs(values))][:3]))
    for which, expected in cases:
        body, arrays = _post(
            client,
            "/hessian/eigen",
            mlp.body(encoding, output_index=INDEX, k=3, which=which, tol=1e-9),
        )
        _close(arrays["eigenvalues"], expected, rtol=1e-6)
        found = arrays["eigenvectors"]
        assert found.shape == (3, *mlp.shape)
        flat = found.reshape(3, -1)
        residuals = np.linalg.norm(
            flat @ mlp.hessian - arrays["eigenvalues"][:, None] * flat, axis=1
        )
        np.testing.assert_allclose(arrays["residuals"], residuals, rtol=1e-3, atol=1e-9)
        assert float(residuals.max()) <= 1e-6 * float(np.abs(values).max())
        metadata = body["metadata"]
        assert metadata["converged"] is True and metadata["method"] == "lanczos"
        assert metadata["products"] > 3 and metadata["exact"] is False


def test_smallest_eigenpair_of_a_closed_form(client: TestClient) -> None:
    """sum(x*x*arange(4)) has Hessian diag(0, 2, 4, 6): its smallest eigenvalue is 0."""
    x = {"name": "x", "shape": [4], "datatype": "FP64", "data": [2.0, 2.0, 2.0, 2.0]}
    _, arrays = _post(
        client,
        "/hessian/eigen",
        {
            "model": "quadratic4",
            "inputs": [x],
            "objective": {"type": "sum"},
            "k": 2,
            "which": "smallest",
            "precision": "float64",
        },
    )
    np.testing.assert_allclose(arrays["eigenvalues"], [0.0, 2.0], atol=1e-10)
    np.testing.assert_allclose(np.abs(arrays["eigenvectors"]), np.eye(4)[:2], atol=1e-8)


QUADRATIC = {"model": "quadratic4", "inputs": [{"name": "x", "shape": [4], "data": [2.0] * 4}]}


@pytest.mark.parametrize(
    ("route", "extra", "field", "says"),
    [
        (
            "/hvp",
            {"output_index": 2, "vectors": {"shape": [1, 5], "data": [1.0] * 5}},
            "vectors.shape",
            "expected [m, 4]",
        ),
        (
            "/vjp",
            {"output_index": 1, "vectors": {"shape": [2, 4], "data": [1.0] * 8}},
            "vectors.shape",
            "one selected scalar",
        ),
        (
            "/hvp",
            {"output_index": 2, "vectors": {"shape": [257, 4], "data": [1.0] * 1028}},
            "vectors.shape",
            "HESSIAN_MAX_OPERATOR_VECTORS",
        ),
        (
            "/hvp",
            {"output_index": 2, "vectors": {"shape": [1, 4], "datatype": "INT32", "data": [1] * 4}},
            "vectors.datatype",
            "floating-point",
        ),
        (
            "/hvp",
            {"output_index": 2, "vectors": {"shape": [1, 4], "data": "AAAA"}},
            "vectors.data",
            "bytes",
        ),
        (
            "/hvp",
            {"output_index": [1, 2], "vectors": {"shape": [1, 4], "data": [1.0] * 4}},
            "output_index",
            "one int",
        ),
        ("/hessian/diagonal", {}, "output_index", "required"),
        (
            "/hessian/trace",
            {"output_index": 0, "max_products": 10**6},
            "max_products",
            "HESSIAN_MAX_OPERATOR_PRODUCTS",
        ),
        ("/hessian/eigen", {"output_index": 0, "k": 5}, "k", "4 inputs"),
        (
            "/hessian/eigen",
            {"output_index": 0, "k": 2, "tol": 1e-13},
            "tol",
            "HESSIAN_MIN_EIGEN_TOL",
        ),
        ("/hessian/eigen", {"output_index": 0, "which": "middle"}, "which", ""),
        ("/hessian/trace", {"output_index": 0, "encoding": "png"}, "encoding", ""),
        ("/hessian/trace", {"output_index": 9}, "output_index", "out of range"),
        (
            "/hessian/trace",
            {"output_index": 0, "objective": {"type": "sum"}},
            "output_index",
            "not both",
        ),
        (
            "/hessian/diagonal",
            {"output_index": 1, "exact": False, "max_products": 1},
            "max_products",
            "too few",
        ),
        (
            "/hessian/eigen",
            {"output_index": 1, "k": 3, "max_products": 3},
            "max_products",
            "too few",
        ),
    ],
)
def test_refusals_name_the_field(
    client: TestClient, route: str, extra: dict[str, Any], field: str, says: str
) -> None:
    response = client.post(route, json={**QUADRATIC, **extra})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["field"] == field, problem
    assert says in problem["detail"]


@pytest.fixture(scope="module")
def limited() -> Iterator[TestClient]:
    """A server whose results may be 1 MB and whose requests 500 products."""
    settings = Settings(device=TEST_DEVICE, max_result_bytes=1_000_000, max_operator_products=500)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_a_dense_hessian_too_large_names_the_operators_that_fit(limited: TestClient) -> None:
    image = {"name": "x", "shape": [1, 28, 28], "datatype": "FP32", "data": digit_image()}
    response = limited.post(
        "/hessian", json={"model": "digits_cnn", "inputs": [image], "output_index": 2}
    )
    assert response.status_code == 413 and response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["setting"] == "HESSIAN_MAX_RESULT_BYTES"
    assert problem["estimated_bytes"] == 784 * 784 * 4
    routes = [a["route"] for a in problem["alternatives"]]
    # The exact diagonal and trace take 784 products: over this server's 500.
    assert routes == ["/hvp", "/hessian/eigen", "/hessian"], problem
    for alternative in problem["alternatives"]:
        assert alternative["estimated_bytes"] <= 1_000_000
        assert alternative["estimated_products"] <= 500
        assert alternative["route"] in problem["detail"]
    rows = problem["alternatives"][-1]
    assert rows["estimated_products"] == 318 and '"stop": 318' in rows["ask"]
    # What the 413 proposed is then served.
    body = {"model": "digits_cnn", "inputs": [image], "output_index": 2}
    vector = {**image, "shape": [1, 1, 28, 28]}
    assert limited.post("/hvp", json={**body, "vectors": vector}).status_code == 200
    assert limited.post("/hessian/eigen", json=body).status_code == 200


def test_an_operator_over_its_product_limit_is_refused_before_work(limited: TestClient) -> None:
    image = {"name": "x", "shape": [1, 28, 28], "datatype": "FP32", "data": digit_image()}
    body = {"model": "digits_cnn", "inputs": [image], "output_index": 2, "exact": True}
    response = limited.post("/hessian/diagonal", json=body)
    assert response.status_code == 413, response.text
    problem = response.json()
    assert problem["field"] == "exact" and problem["setting"] == "HESSIAN_MAX_OPERATOR_PRODUCTS"
    assert problem["estimated_products"] == 784 and "exact: false" in problem["detail"]
    estimate = limited.post("/hessian/diagonal", json={**body, "exact": False, "max_products": 400})
    assert estimate.status_code == 200 and estimate.json()["metadata"]["exact"] is False


def test_eigen_stopped_by_max_products_says_so_with_true_residuals(
    client: TestClient, mlp: Reference
) -> None:
    """A budget of 8 products (4 Lanczos steps, then the 3 residual products, for k=3)
    ends the solve long before tol=1e-9: ``converged`` is false, the note says why, and
    the ``residuals`` are the true ``||H v - lambda v||`` of the pairs sent (recomputed
    here from the dense float64 Hessian), large enough to make ``false`` the honest
    answer. The pairs are still Ritz pairs: orthonormal vectors whose Rayleigh quotients
    are the values sent, each within its residual of an eigenvalue of H (for symmetric
    H some eigenvalue lies within ||H v - theta v|| of theta when ||v|| = 1)."""
    budget, k, tol = 8, 3, 1e-9
    body, arrays = _post(
        client,
        "/hessian/eigen",
        mlp.body("json", output_index=INDEX, k=k, tol=tol, max_products=budget),
    )
    metadata = body["metadata"]
    assert metadata["converged"] is False and metadata["method"] == "lanczos"
    assert 0 < metadata["products"] <= budget
    assert any("max_products" in note for note in metadata["notes"]), metadata["notes"]
    values, residuals = arrays["eigenvalues"], arrays["residuals"]
    flat = arrays["eigenvectors"].reshape(k, -1)
    assert values.shape == residuals.shape == (k,)
    np.testing.assert_allclose(flat @ flat.T, np.eye(k), atol=1e-10)
    np.testing.assert_allclose(
        np.einsum("kn,nm,km->k", flat, mlp.hessian, flat), values, atol=1e-10
    )
    true_residuals = np.linalg.norm(flat @ mlp.hessian - values[:, None] * flat, axis=1)
    np.testing.assert_allclose(residuals, true_residuals, rtol=1e-6, atol=1e-12)
    spectrum = np.linalg.eigvalsh(mlp.hessian)
    assert float(residuals.max()) > 1e3 * tol * float(np.abs(values).max())  # far from tol
    distance = np.abs(values[:, None] - spectrum[None, :]).min(axis=1)
    assert (distance <= true_residuals * (1 + 1e-9) + 1e-12).all(), (distance, true_residuals)
