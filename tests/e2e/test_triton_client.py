"""Triton's own HTTP client (tritonclient.http) against a real server on 127.0.0.1.

The Open Inference Protocol routes must work with it unchanged: liveness, readiness,
server and model metadata, and ``infer`` on ``digits_cnn`` with the binary tensor
extension on and off, returning the logits of the model loaded here independently.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from safetensors.torch import load_file
from tritonclient.utils import InferenceServerException

from hessian_service.config import BUNDLED_MODELS_DIR
from hessian_service.repository import zoo

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def triton_client(server_url: str) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server_url.removeprefix("http://"))
    yield client
    client.close()


def local_logits(x: np.ndarray) -> np.ndarray:
    """digits_cnn's forward pass, loaded here from its weights (not through the server)."""
    model = zoo.build("digits_cnn")
    model.load_state_dict(load_file(str(BUNDLED_MODELS_DIR / "digits_cnn" / "weights.safetensors")))
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


def test_liveness_readiness_and_metadata(triton_client: triton.InferenceServerClient) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready("digits_cnn")
    assert triton_client.is_model_ready("digits_cnn", model_version="1")
    assert not triton_client.is_model_ready("no_such_model")
    assert not triton_client.is_model_ready("digits_cnn", model_version="7")
    server = triton_client.get_server_metadata()
    assert server["name"] == "hessian-service"
    assert "binary_tensor_data" in server["extensions"]
    metadata = triton_client.get_model_metadata("digits_cnn")
    assert metadata == {
        "name": "digits_cnn",
        "versions": ["1"],
        "platform": "pytorch",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}],
    }


@pytest.mark.parametrize("binary_data", [True, False])
def test_infer_gives_the_local_models_logits(
    triton_client: triton.InferenceServerClient, binary_data: bool
) -> None:
    x = np.random.default_rng(7).random((5, 1, 28, 28), dtype=np.float32)
    given = triton.InferInput("x", list(x.shape), "FP32")
    given.set_data_from_numpy(x, binary_data=binary_data)
    wanted = triton.InferRequestedOutput("output", binary_data=binary_data)
    result = triton_client.infer("digits_cnn", [given], outputs=[wanted], request_id="r1")
    response = result.get_response()
    assert response["model_name"] == "digits_cnn"
    assert response["id"] == "r1"
    (output,) = response["outputs"]
    assert ("parameters" in output) == binary_data  # binary_data_size only when asked
    logits = result.as_numpy("output")
    assert logits.shape == (5, 10)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, local_logits(x), rtol=1e-5, atol=1e-5)


def test_infer_without_requested_outputs_returns_binary_output(
    triton_client: triton.InferenceServerClient,
) -> None:
    """No outputs named: tritonclient asks for binary_data_output on the request."""
    x = np.random.default_rng(8).random((2, 1, 28, 28), dtype=np.float32)
    given = triton.InferInput("x", list(x.shape), "FP32")
    given.set_data_from_numpy(x)
    result = triton_client.infer("digits_cnn", [given], model_version="1")
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] == 2 * 10 * 4
    np.testing.assert_allclose(result.as_numpy("output"), local_logits(x), rtol=1e-5, atol=1e-5)


def test_errors_reach_tritonclient_with_their_message(
    triton_client: triton.InferenceServerClient,
) -> None:
    x = np.zeros((2, 28, 28), dtype=np.float32)
    given = triton.InferInput("x", list(x.shape), "FP32")
    given.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as wrong_shape:
        triton_client.infer("digits_cnn", [given])
    assert wrong_shape.value.status() == "400"
    assert "inputs[0].shape" in wrong_shape.value.message()
    with pytest.raises(InferenceServerException) as unknown:
        triton_client.infer("no_such_model", [given])
    assert unknown.value.status() == "404"
    assert "no_such_model" in unknown.value.message()


def test_a_body_over_the_limit_is_413_with_a_message_tritonclient_reads(
    limited_server_url: str,
) -> None:
    client = triton.InferenceServerClient(limited_server_url.removeprefix("http://"))
    x = np.zeros((100, 1, 28, 28), dtype=np.float32)  # 313,600 bytes: over the 200 kB limit
    given = triton.InferInput("x", list(x.shape), "FP32")
    given.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as too_large:
        client.infer("digits_cnn", [given])
    assert too_large.value.status() == "413"
    assert "over this server's limit of 200000 bytes" in too_large.value.message()
    client.close()
