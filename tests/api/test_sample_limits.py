"""The per-request limits follow what a request costs, not a fixed sample count.

A 2-64-64-64-1 tanh PINN (TorchScript, float64, in its own models folder) takes 4096
points per request: 2x2 Hessians, 128 KiB of result. The limits of the app here are set
so that each one is reached by a request the others let through:

- ``max_samples_per_request`` 10000: the ceiling, 422 above it;
- ``max_result_bytes`` 300 000: 10000 Hessians (320 000 bytes) are 413;
- ``max_work_per_request`` 4 000 000: 6000 Hessians are 6000 x 2 passes x 385 activation
  elements = 4 620 000, 413; 4096 are 3 153 920, served.

The 413s are sent with empty data: the sizes are judged from the declared shape, before
anything is decoded. Served values are checked against ``torch.func.hessian`` /
``jacrev`` of the eager module, to 1e-10 relative to the largest entry (float64).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from hessian_service.config import Settings
from hessian_service.main import create_app
from tests.device import TEST_DEVICE

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.save/load

CEILING = 10_000
RESULT_BYTES = 300_000
WORK = 4_000_000
HIDDEN = 64
# Operator outputs of one forward pass of one sample (engine.workload): three Linear and
# three tanh of 64 elements, the last Linear of 1.
ACTIVATIONS = 6 * HIDDEN + 1


def _pinn() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(2, HIDDEN), nn.Tanh()]
    for _ in range(2):
        layers += [nn.Linear(HIDDEN, HIDDEN), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(HIDDEN, 1)).double().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def pinn() -> nn.Module:
    return _pinn()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, pinn: nn.Module) -> Iterator[TestClient]:
    models = tmp_path_factory.mktemp("limits") / "models"
    folder = models / "pinn"
    folder.mkdir(parents=True)
    torch.jit.save(torch.jit.script(pinn), str(folder / "model.pt"))
    manifest = {
        "name": "pinn",
        "version": "1",
        "format": "torchscript",
        "input_shape": [2],
        "output_shape": [1],
        "dtype": "float64",
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    settings = Settings(
        device=TEST_DEVICE,
        models_dir=models,
        max_samples_per_request=CEILING,
        max_result_bytes=RESULT_BYTES,
        max_work_per_request=WORK,
        access_log=False,
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _body(x: np.ndarray | None, shape: list[int], **fields: Any) -> dict[str, Any]:
    data = "" if x is None else base64.b64encode(x.astype(np.float64).tobytes()).decode()
    tensor = {"name": "x", "shape": shape, "datatype": "FP64", "data": data}
    return {"model": "pinn", "inputs": [tensor], "precision": "float64", **fields}


def _decoded(response: Any) -> np.ndarray:
    assert response.status_code == 200, response.text[:2000]
    out = response.json()["outputs"][0]
    array = np.frombuffer(base64.b64decode(out["data"]), dtype=np.float64)
    return array.reshape(out["shape"])


def _relative(actual: np.ndarray, expected: np.ndarray) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def _problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text[:2000]
    assert response.headers["content-type"].startswith("application/problem+json")
    problem: dict[str, Any] = response.json()
    return problem


@pytest.mark.parametrize("batch", [1024, 4096])
def test_a_pinn_batch_of_thousands_of_points_is_served(
    client: TestClient, pinn: nn.Module, batch: int
) -> None:
    x = torch.rand(batch, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    body = _body(x.numpy(), [batch, 2], output_index=0, encoding="base64")
    hessians = _decoded(client.post("/hessian", json=body))
    scalar = lambda point: pinn(point.unsqueeze(0))[0, 0]  # noqa: E731
    reference = torch.func.vmap(torch.func.hessian(scalar))(x).numpy()
    assert _relative(hessians, reference) <= 1e-10
    jacobians = _decoded(client.post("/jacobian", json=body))
    assert _relative(jacobians, torch.func.vmap(torch.func.jacrev(scalar))(x).numpy()) <= 1e-10


def test_over_the_work_limit_is_413_naming_the_field_and_the_estimate(
    client: TestClient,
) -> None:
    problem = _problem(client.post("/hessian", json=_body(None, [6000, 2], output_index=0)), 413)
    assert problem["field"] == "inputs[0].shape"
    assert problem["estimated_work"] == 6000 * 2 * ACTIVATIONS
    assert problem["limit_work"] == WORK
    assert problem["setting"] == "HESSIAN_MAX_WORK_PER_REQUEST"
    assert "max_work_per_request" in problem["detail"]
    assert f"send at most {WORK // (2 * ACTIVATIONS)} samples" in problem["detail"]


def test_over_the_result_limit_is_413_naming_the_field_and_the_estimate(
    client: TestClient,
) -> None:
    problem = _problem(client.post("/hessian", json=_body(None, [CEILING, 2], output_index=0)), 413)
    assert problem["field"] == "inputs[0].shape"
    assert problem["estimated_bytes"] == CEILING * 2 * 2 * 8
    assert problem["limit_bytes"] == RESULT_BYTES
    assert problem["setting"] == "HESSIAN_MAX_RESULT_BYTES"


def test_over_the_sample_ceiling_is_422(client: TestClient) -> None:
    problem = _problem(
        client.post("/hessian", json=_body(None, [CEILING + 1, 2], output_index=0)), 422
    )
    assert problem["field"] == "inputs[0].shape"
    assert f"between 1 and {CEILING}, got {CEILING + 1}" in problem["detail"]


def test_default_limits_serve_4096_small_samples_and_keep_the_old_large_ones() -> None:
    """Default settings: 4096 quadratic4 Hessians are served (the old limit was 256
    samples); of digits_cnn's (784 inputs) the result limit takes the first cut (218 fit
    in 512 MiB), never the work limit, so nothing the old limit allowed is refused."""
    settings = Settings(device=TEST_DEVICE, access_log=False)
    with TestClient(create_app(settings)) as default_client:
        x = np.random.default_rng(0).normal(size=(4096, 4))
        body_small = _body(x, [4096, 4], output_index=2, encoding="base64")
        hessians = _decoded(
            default_client.post("/hessian", json={**body_small, "model": "quadratic4"})
        )
        expected = np.zeros((4096, 4, 4))
        expected[:, 2, 2] = 4.0  # output 2 is 2 * x_2^2
        assert np.array_equal(hessians, expected)
        body = {
            "model": "digits_cnn",
            "inputs": [{"name": "x", "shape": [218, 1, 28, 28], "datatype": "FP32", "data": ""}],
            "output_index": 0,
        }
        # passes every size check, so it reaches decoding: the empty data is the 422
        problem = _problem(default_client.post("/hessian", json=body), 422)
        assert problem["field"] == "inputs[0].data", problem
        body["inputs"][0]["shape"] = [219, 1, 28, 28]
        problem = _problem(default_client.post("/hessian", json=body), 413)
        assert problem["setting"] == "HESSIAN_MAX_RESULT_BYTES"
