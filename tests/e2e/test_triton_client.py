"""Triton's own HTTP client (tritonclient.http) against a real server on 127.0.0.1.

The Open Inference Protocol routes must work with it unchanged: liveness, readiness,
server and model metadata, and ``infer`` on ``digits_cnn`` with the binary tensor
extension on and off, returning the logits of the model loaded here independently; and
the derivative outputs (``jacobian``, ``hessian``, ``hvp``, ``hessian_diagonal``,
``hessian_trace``), equal bit for bit to what ``/jacobian``, ``/hessian`` and the
operator endpoints answer for the same input.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
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
        # hvp's second input, vectors, is not listed: tools that send every listed input
        # (perf_analyzer) would send it with every request.
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
        "outputs": [
            {"name": "output", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "jacobian", "datatype": "FP32", "shape": [-1, 10, 784]},
            {"name": "hessian", "datatype": "FP32", "shape": [-1, 784, 784]},
            {"name": "hvp", "datatype": "FP32", "shape": [-1, -1, 1, 28, 28]},
            {"name": "hessian_diagonal", "datatype": "FP32", "shape": [-1, 1, 28, 28]},
            {"name": "hessian_trace", "datatype": "FP32", "shape": [-1]},
        ],
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


def service_tensor(client: httpx.Client, path: str, body: dict[str, Any], name: str) -> np.ndarray:
    """The tensor ``name`` of a ``/hessian``-style response, from its base64 bytes."""
    response = client.post(path, json={**body, "encoding": "base64"})
    assert response.status_code == 200, response.text
    (tensor,) = [t for t in response.json()["outputs"] if t["name"] == name]
    assert tensor["datatype"] == "FP32"
    raw = np.frombuffer(base64.b64decode(tensor["data"]), dtype=np.float32)
    return raw.reshape(tensor["shape"])


def base64_input(x: np.ndarray) -> dict[str, Any]:
    data = base64.b64encode(x.tobytes()).decode()
    return {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": data}


def triton_infer(
    triton_client: triton.InferenceServerClient,
    x: np.ndarray,
    names: list[str],
    binary_data: bool,
    parameters: dict[str, Any] | None = None,
    vectors: np.ndarray | None = None,
) -> triton.InferResult:
    given = triton.InferInput("x", list(x.shape), "FP32")
    given.set_data_from_numpy(x, binary_data=binary_data)
    inputs = [given]
    if vectors is not None:
        second = triton.InferInput("vectors", list(vectors.shape), "FP32")
        second.set_data_from_numpy(vectors, binary_data=binary_data)
        inputs.append(second)
    outputs = [triton.InferRequestedOutput(name, binary_data=binary_data) for name in names]
    return triton_client.infer("digits_cnn", inputs, outputs=outputs, parameters=parameters)


@pytest.mark.parametrize("binary_data", [True, False])
def test_hessian_and_jacobian_equal_the_services_bit_for_bit(
    triton_client: triton.InferenceServerClient, client: httpx.Client, binary_data: bool
) -> None:
    x = np.random.default_rng(9).random((3, 1, 28, 28), dtype=np.float32)
    body = {"model": "digits_cnn", "inputs": [base64_input(x)]}
    result = triton_infer(triton_client, x, ["output", "jacobian"], binary_data)
    jacobian = result.as_numpy("jacobian")
    assert jacobian.shape == (3, 10, 784) and jacobian.dtype == np.float32
    want = service_tensor(client, "/jacobian", body, "jacobian")
    assert jacobian.tobytes() == want.tobytes()  # bit for bit
    np.testing.assert_allclose(result.as_numpy("output"), local_logits(x), rtol=1e-5, atol=1e-5)

    result = triton_infer(triton_client, x, ["hessian"], binary_data, {"output_index": 2})
    hessian = result.as_numpy("hessian")
    assert hessian.shape == (3, 784, 784) and hessian.dtype == np.float32
    want = service_tensor(client, "/hessian", {**body, "output_index": 2}, "hessian")
    assert hessian.tobytes() == want.tobytes()
    assert np.abs(hessian).max() > 1e-3  # a curved model: zeros would not pass
    assert result.get_response()["outputs"][0]["name"] == "hessian"

    objective = {"type": "cross_entropy", "target": [1, 4, 7]}
    result = triton_infer(triton_client, x, ["hessian"], binary_data, {"objective": objective})
    want = service_tensor(client, "/hessian", {**body, "objective": objective}, "hessian")
    assert result.as_numpy("hessian").tobytes() == want.tobytes()


def test_operator_outputs_equal_the_operator_endpoints(
    triton_client: triton.InferenceServerClient, client: httpx.Client
) -> None:
    rng = np.random.default_rng(10)
    x = rng.random((2, 1, 28, 28), dtype=np.float32)
    vectors = rng.standard_normal((3, 1, 28, 28), dtype=np.float32)
    body = {"model": "digits_cnn", "inputs": [base64_input(x)], "output_index": 5}
    names = ["hvp", "hessian_diagonal", "hessian_trace"]
    result = triton_infer(triton_client, x, names, True, {"output_index": 5}, vectors)
    vector_object = {**base64_input(vectors), "name": "vectors"}
    hvp = service_tensor(client, "/hvp", {**body, "vectors": vector_object}, "hvp")
    assert hvp.shape == (2, 3, 1, 28, 28)
    assert result.as_numpy("hvp").tobytes() == hvp.tobytes()
    diagonal = service_tensor(client, "/hessian/diagonal", body, "diagonal")
    assert result.as_numpy("hessian_diagonal").tobytes() == diagonal.tobytes()
    trace = service_tensor(client, "/hessian/trace", body, "trace")
    assert result.as_numpy("hessian_trace").tobytes() == trace.tobytes()
    # And against the dense Hessian: H v and tr H of the same model (float32 sums).
    hessian = service_tensor(client, "/hessian", body, "hessian")
    want = np.einsum("bij,mj->bmi", hessian, vectors.reshape(3, -1)).reshape(hvp.shape)
    np.testing.assert_allclose(hvp, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(trace, np.trace(hessian, axis1=1, axis2=2), rtol=1e-4, atol=1e-5)


def test_derivative_requests_that_cannot_be_served_are_400_naming_the_field(
    triton_client: triton.InferenceServerClient,
) -> None:
    x = np.zeros((1, 1, 28, 28), dtype=np.float32)
    cases: list[tuple[list[str], dict[str, Any] | None, str]] = [
        (["hessian"], None, "outputs[0] (hessian): output_index"),  # ten outputs: which?
        (["gradient"], None, "outputs[0].name"),
        (["output"], {"output_index": 2}, "parameters.output_index"),
        (["hessian"], {"output_index": 99}, "outputs[0] (hessian)"),
        (["hessian"], {"encoding": "png"}, "parameters.encoding"),
        (["hvp"], {"output_index": 1}, "vectors"),
        (["hessian"], {"output_index": 1, "max_products": 5}, "parameters.max_products"),
        # checked before any is computed: the jacobian is fine, the hessian is not
        (["jacobian", "hessian"], None, "outputs[1] (hessian): output_index"),
    ]
    for names, parameters, field in cases:
        with pytest.raises(InferenceServerException) as refused:
            triton_infer(triton_client, x, names, True, parameters)
        assert refused.value.status() == "400", (names, parameters)
        assert field in refused.value.message(), (names, refused.value.message())


def test_tritonclients_own_parameters_and_mixed_outputs_are_served(
    triton_client: triton.InferenceServerClient, client: httpx.Client
) -> None:
    """tritonclient's timeout/priority land in parameters: accepted, not read. A
    request-level field goes to the outputs whose body takes it (exact: the trace)."""
    x = np.random.default_rng(12).random((1, 1, 28, 28), dtype=np.float32)
    given = triton.InferInput("x", list(x.shape), "FP32")
    given.set_data_from_numpy(x)
    result = triton_client.infer("digits_cnn", [given], timeout=5_000_000, priority=1)
    np.testing.assert_allclose(result.as_numpy("output"), local_logits(x), rtol=1e-5, atol=1e-5)
    names = ["hessian", "hessian_trace"]
    wanted = [triton.InferRequestedOutput(name) for name in names]
    parameters = {"output_index": 1, "exact": True}
    result = triton_client.infer(
        "digits_cnn", [given], outputs=wanted, parameters=parameters, timeout=5_000_000
    )
    body = {"model": "digits_cnn", "inputs": [base64_input(x)], "output_index": 1}
    hessian = service_tensor(client, "/hessian", body, "hessian")
    assert result.as_numpy("hessian").tobytes() == hessian.tobytes()
    trace = service_tensor(client, "/hessian/trace", {**body, "exact": True}, "trace")
    assert result.as_numpy("hessian_trace").tobytes() == trace.tobytes()
    np.testing.assert_allclose(trace, np.trace(hessian, axis1=1, axis2=2), rtol=1e-4, atol=1e-5)


def test_an_outputs_own_parameter_at_fault_is_named_so(client: httpx.Client) -> None:
    x = {"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}
    body = {
        "inputs": [x],
        "parameters": {"output_index": 1},
        "outputs": [{"name": "hessian", "parameters": {"layout": "diagonal"}}],
    }
    response = client.post("/v2/models/digits_cnn/infer", json=body)
    assert response.status_code == 400
    assert response.json()["error"].startswith("outputs[0].parameters.layout:"), response.text
