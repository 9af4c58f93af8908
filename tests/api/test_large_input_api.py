"""The bundled 3x64x64 model over HTTP, in process, with the default limits.

``photo_digits_cnn`` has n = 12,288 inputs: its dense float32 Hessian (604 MB) is over
the default ``HESSIAN_MAX_RESULT_BYTES`` (512 MiB), so ``/hessian`` answers 413 and names
the matrix-free operations that would fit; the eigen route it names then serves the
same sample, checked against float64 ``torch.autograd`` Hessian-vector products of the
bundled weights (computed here, independent of the service's forward-over-reverse).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from hessian_service.config import BUNDLED_MODELS_DIR
from hessian_service.repository.zoo import build

MODEL = "photo_digits_cnn"
N = 3 * 64 * 64
DEFAULT_MAX_RESULT_BYTES = 512 * (1 << 20)
MATRIX_FREE = ("/hvp", "/hessian/diagonal", "/hessian/trace", "/hessian/eigen")
PROBLEM = "application/problem+json"


def _sample() -> np.ndarray:
    sample = json.loads((BUNDLED_MODELS_DIR / "photo_digits_sample.json").read_text())
    return np.asarray(sample["data"], dtype="<f4").reshape(sample["shape"])


def _body(**fields: Any) -> dict[str, Any]:
    data = base64.b64encode(_sample().tobytes()).decode()
    tensor = {"name": "x", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": data}
    return {"model": MODEL, "inputs": [tensor], "output_index": 2, **fields}


def _array(output: dict[str, Any]) -> np.ndarray:
    raw = base64.b64decode(output["data"])
    dtype = {"FP32": "<f4", "FP64": "<f8"}[output["datatype"]]
    return np.frombuffer(raw, dtype=dtype).reshape(output["shape"])


def test_the_model_is_listed_with_its_training_and_no_trial_hessian(client: TestClient) -> None:
    info = client.get(f"/models/{MODEL}").json()
    assert info["ready"] is True and info["input_shape"] == [3, 64, 64]
    assert info["output_shape"] == [10]
    training = info["training"]
    assert training["held_out_samples"] == 360 and training["held_out_accuracy"] >= 0.9
    # The load-time probe does not compute a 12,288 x 12,288 trial Hessian.
    notes = info["capabilities"]["notes"]
    assert any(note.startswith("Hessian probe skipped: 12288 x 12288") for note in notes)


def test_dense_hessian_is_a_413_that_names_the_matrix_free_operations(
    client: TestClient,
) -> None:
    response = client.post("/hessian", json=_body())
    assert response.status_code == 413, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["field"] == "inputs[0].shape"
    assert problem["setting"] == "HESSIAN_MAX_RESULT_BYTES"
    assert problem["estimated_bytes"] == N * N * 4  # 603,979,776: the float32 matrix
    assert problem["limit_bytes"] == DEFAULT_MAX_RESULT_BYTES
    for route in MATRIX_FREE:
        assert route in problem["detail"], (route, problem["detail"])
    assert "use float32" not in problem["detail"]  # it is float32 already
    routes = {alternative["route"]: alternative for alternative in problem["alternatives"]}
    assert set(MATRIX_FREE) <= set(routes)
    for route in MATRIX_FREE:
        assert routes[route]["estimated_bytes"] < DEFAULT_MAX_RESULT_BYTES, routes[route]


def test_the_named_eigen_route_serves_the_top_5(client: TestClient) -> None:
    response = client.post("/hessian/eigen", json=_body(k=5, encoding="base64"))
    assert response.status_code == 200, response.text
    body = response.json()
    outputs = {output["name"]: output for output in body["outputs"]}
    values = _array(outputs["eigenvalues"])[0].astype(np.float64)
    vectors = _array(outputs["eigenvectors"])[0].astype(np.float64)
    assert vectors.shape == (5, 3, 64, 64)
    assert body["metadata"]["converged"] is True and body["metadata"]["products"] > 0
    assert list(values) == sorted(values, reverse=True)

    model = build(MODEL)
    model.load_state_dict(load_file(str(BUNDLED_MODELS_DIR / MODEL / "weights.safetensors")))
    model = model.to(torch.float64).eval().requires_grad_(False)
    x = torch.from_numpy(_sample()[0].astype(np.float64))

    def logit(sample: torch.Tensor) -> torch.Tensor:
        value: torch.Tensor = model(sample.unsqueeze(0))[0, 2]
        return value

    top = float(np.abs(values).max())
    for value, vector in zip(values, vectors, strict=True):
        v = torch.from_numpy(vector.copy())
        hv = torch.autograd.functional.hvp(logit, x, v)[1]
        assert float((hv - value * v).norm()) / top < 1e-3  # float32 answer, float64 check
        assert abs(float((v * hv).sum()) - value) / top < 1e-4
    reported = _array(outputs["residuals"])[0]
    assert float(reported.max()) / top < 1e-3
