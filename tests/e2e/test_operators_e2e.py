"""The matrix-free operators against a real uvicorn server on 127.0.0.1, end to end.

Closed forms: ``sum(x * x * arange(4))`` (quadratic4 with the sum objective) has the
Hessian ``diag(0, 2, 4, 6)`` at every x, so ``H v = (0, 2, 4, 6) * v``, its trace is 12
and its top two eigenpairs are 6 and 4 along e_3 and e_2. The responses are read with
the client's decoder in the binary, base64 and json encodings. (The 413 that names the
operators is tested in process, tests/api/test_operator_routes.py: a second server
here would double this module's time.)
"""

from __future__ import annotations

import base64
from typing import Any

import httpx
import numpy as np
import pytest
from hessian_client._wire import decode_response

pytestmark = pytest.mark.e2e

CURVATURE = np.array([0.0, 2.0, 4.0, 6.0])  # the diagonal of sum(x*x*arange(4))'s Hessian


def _b64(array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array, dtype="<f8")
    data = base64.b64encode(array.tobytes()).decode("ascii")
    return {"name": "v", "shape": list(array.shape), "datatype": "FP64", "data": data}


def _quadratic(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {
        "model": "quadratic4",
        "inputs": [_b64(x)],
        "objective": {"type": "sum"},
        "precision": "float64",
        **extra,
    }


def test_hvp_trace_and_eigen_end_to_end(client: httpx.Client) -> None:
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((2, 4))
    vectors = rng.standard_normal((2, 3, 4))
    response = client.post("/hvp", json=_quadratic(xs, vectors=_b64(vectors), encoding="binary"))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    decoded = decode_response(response.content, response.headers)
    np.testing.assert_allclose(decoded.arrays["hvp"], vectors * CURVATURE, rtol=1e-12, atol=1e-14)
    assert decoded.body["metadata"]["products"] == 6
    assert decoded.body["metadata"]["batch_size"] == 2

    response = client.post("/hessian/trace", json=_quadratic(xs[0], encoding="base64"))
    assert response.status_code == 200, response.text
    trace = decode_response(response.content, response.headers)
    assert abs(float(trace.arrays["trace"]) - 12.0) <= 1e-12
    assert trace.body["metadata"]["exact"] is True

    response = client.post("/hessian/eigen", json=_quadratic(xs[0], k=2))
    assert response.status_code == 200, response.text
    eigen = decode_response(response.content, response.headers)
    np.testing.assert_allclose(eigen.arrays["eigenvalues"], [6.0, 4.0], rtol=1e-10)
    np.testing.assert_allclose(np.abs(eigen.arrays["eigenvectors"]), np.eye(4)[[3, 2]], atol=1e-8)
    assert eigen.body["metadata"]["converged"] is True
