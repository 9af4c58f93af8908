"""/hessian's rows, packed layout and wire precision, against independent references.

Rows equal the rows of float64 ``torch.func.hessian`` (both strategies of
``engine.operators.rows``: products with basis vectors and the dense slice) to 1e-10
relative; the packed layout unpacks (server and client code alike) to exactly the
matrix layout's values in n (n + 1) / 2 entries (half the bytes, plus the diagonal); a
float16 / bfloat16 result equals torch's rounding of the float32 result bit for bit in
json, base64 and binary; every refusal names its field.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hessian_client import unpack
from hessian_client._wire import decode_response

from hessian_service.api.examples import digit_image
from hessian_service.config import Settings
from hessian_service.engine.operators.rows import hessian_rows
from hessian_service.errors import InvalidInput
from hessian_service.main import create_app
from hessian_service.wire import packing, precision

N = 784
TORCH_WIRE = {"FP16": torch.float16, "BF16": torch.bfloat16, "FP32": torch.float32}


def _body(model: str, **extra: Any) -> dict[str, Any]:
    x = {"name": "x", "shape": [1, 28, 28], "datatype": "FP32", "data": digit_image()}
    index = 3 if model == "digits_cnn" else 0
    return {"model": model, "inputs": [x], "output_index": index, **extra}


def _post(client: TestClient, **body: Any) -> tuple[dict[str, Any], dict[str, np.ndarray], int]:
    response = client.post("/hessian", json=body)
    assert response.status_code == 200, response.text
    decoded = decode_response(response.content, response.headers)
    return decoded.body, decoded.arrays, len(response.content)


def _raw_bits(obj: dict[str, Any], content_arrays: np.ndarray | None = None) -> torch.Tensor:
    """The wire values of a FP16/BF16 tensor object as torch's dtype (json: parsed as
    float64 numbers and rounded to it, which is exact for values of that precision)."""
    dtype = TORCH_WIRE[obj["datatype"]]
    data = obj["data"]
    if isinstance(data, str):
        raw = bytearray(base64.b64decode(data))
        return torch.frombuffer(raw, dtype=dtype)
    return torch.tensor(np.asarray(data, dtype=np.float64).reshape(-1)).to(dtype)


@pytest.mark.parametrize("model_name", ["digits_cnn", "mlp_tanh"])
@pytest.mark.parametrize("strategy", ["products", "dense"])
def test_rows_equal_the_dense_hessian_rows_in_float64(
    client: TestClient, model_name: str, strategy: str
) -> None:
    loaded = client.app.state.registry.get(model_name)  # type: ignore[attr-defined]
    module = loaded.for_dtype(torch.float64)
    x = torch.tensor(digit_image(), dtype=torch.float64).reshape(1, *loaded.manifest.input_shape)
    index = 3 if model_name == "digits_cnn" else 0

    def scalar(flat: torch.Tensor) -> torch.Tensor:
        return module(flat.reshape(x.shape)).reshape(-1)[index]

    dense = torch.func.hessian(scalar)(x.reshape(-1))  # [n, n], float64
    start, stop = 100, 117
    got = hessian_rows(module, x, start, stop, output_index=index, strategy=strategy)  # type: ignore[arg-type]
    assert got.selected.shape == (1, stop - start, N)
    expected = dense[start:stop]
    scale = float(expected.abs().max())
    assert scale > 0
    assert float((got.selected[0] - expected).abs().max()) <= 1e-10 * scale


def test_rows_over_http_in_float64_and_their_metadata(client: TestClient) -> None:
    body, arrays, _ = _post(
        client, **_body("mlp_tanh", rows={"start": 700, "stop": 784}, precision="float64")
    )
    _, full_arrays, _ = _post(client, **_body("mlp_tanh", precision="float64"))
    assert body["outputs"][0]["shape"] == [84, N]
    assert body["metadata"]["rows"] == {"start": 700, "stop": 784, "n": N}
    np.testing.assert_allclose(
        arrays["hessian"], full_arrays["hessian"][700:784], rtol=1e-10, atol=1e-14
    )
    tensor, _, _ = _post(
        client, **_body("digits_cnn", rows={"start": 0, "stop": 2}, layout="tensor")
    )
    assert tensor["outputs"][0]["shape"] == [2, 1, 28, 28]


@pytest.mark.parametrize("encoding", ["base64", "binary", "json"])
def test_packed_unpacks_to_the_matrix_exactly_in_half_the_bytes(
    client: TestClient, encoding: str
) -> None:
    body, arrays, _ = _post(client, **_body("digits_cnn", layout="packed", encoding=encoding))
    _, dense, _ = _post(client, **_body("digits_cnn", encoding=encoding))
    packed = arrays["hessian"]
    assert packed.shape == (packing.packed_length(N),)
    assert body["metadata"]["packing"] == {
        "order": "upper_row_major",
        "n": N,
        "offset": 0,
        "length": N * (N + 1) // 2,
        "complete": True,
    }
    # The upper triangle, mirrored: exactly the matrix's upper entries; its lower ones
    # differ from them only by float32 rounding (the engine's sums run in another order).
    matrix = dense["hessian"]
    mirrored = np.triu(matrix) + np.triu(matrix, 1).T
    assert np.array_equal(unpack(packed, N), mirrored)
    assert torch.equal(
        packing.unpack(torch.from_numpy(packed.copy()), N), torch.from_numpy(mirrored)
    )
    assert np.abs(matrix - matrix.T).max() <= 1e-6 * np.abs(matrix).max()
    if encoding == "binary":
        (obj,) = [o for o in body["outputs"] if o["name"] == "hessian"]
        assert obj["parameters"]["binary_data_size"] == N * (N + 1) // 2 * 4  # 1,230,880 bytes
    if encoding == "base64":
        (obj,) = [o for o in body["outputs"] if o["name"] == "hessian"]
        assert len(base64.b64decode(obj["data"])) == N * (N + 1) // 2 * 4


def test_packed_row_segments_concatenate_to_the_triangle(client: TestClient) -> None:
    pieces = []
    for start, stop in ((0, 300), (300, 784)):
        body, arrays, _ = _post(
            client,
            **_body(
                "digits_cnn",
                layout="packed",
                rows={"start": start, "stop": stop},
                encoding="base64",
            ),
        )
        assert body["metadata"]["packing"]["offset"] == packing.row_offset(N, start)
        assert body["metadata"]["packing"]["complete"] is False
        pieces.append(arrays["hessian"])
    _, dense, _ = _post(client, **_body("digits_cnn", encoding="base64"))
    matrix = dense["hessian"]
    assert np.array_equal(unpack(np.concatenate(pieces), N), np.triu(matrix) + np.triu(matrix, 1).T)


@pytest.mark.parametrize("wire", ["float16", "bfloat16"])
@pytest.mark.parametrize("encoding", ["json", "base64", "binary"])
def test_half_precision_is_torch_rounding_of_the_float32_result(
    client: TestClient, wire: str, encoding: str
) -> None:
    reference = client.post("/hessian", json=_body("mlp_tanh", encoding="base64")).json()
    (ref_obj,) = [o for o in reference["outputs"] if o["name"] == "hessian"]
    expected = _raw_bits(ref_obj).to(precision.RESULT_DTYPES[wire])  # torch's rounding
    response = client.post(
        "/hessian", json=_body("mlp_tanh", encoding=encoding, result_precision=wire)
    )
    assert response.status_code == 200, response.text
    datatype = {"float16": "FP16", "bfloat16": "BF16"}[wire]
    if encoding == "binary":
        length = int(response.headers["Inference-Header-Content-Length"])
        import orjson

        header = orjson.loads(response.content[:length])
        (obj,) = [o for o in header["outputs"] if o["name"] == "hessian"]
        assert obj["parameters"]["binary_data_size"] == N * N * 2
        raw = bytearray(response.content[length : length + N * N * 2])
        got = torch.frombuffer(raw, dtype=precision.RESULT_DTYPES[wire])
    else:
        (obj,) = [o for o in response.json()["outputs"] if o["name"] == "hessian"]
        got = _raw_bits(obj)
    assert obj["datatype"] == datatype
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))  # bit for bit
    decoded = decode_response(response.content, response.headers).arrays["hessian"]
    assert np.array_equal(decoded.astype(np.float32), expected.float().numpy().reshape(N, N))


def test_refusals_name_their_field(client: TestClient) -> None:
    cases = [
        ("/hessian", {"rows": {"start": 784, "stop": 785}}, "rows.start"),
        ("/hessian", {"rows": {"start": 5, "stop": 5}}, "rows.stop"),
        ("/hessian", {"rows": {"start": 0, "stop": 785}}, "rows.stop"),
        ("/jacobian", {"rows": {"start": 0, "stop": 1}}, "rows"),
        ("/jacobian", {"layout": "packed"}, "layout"),
        ("/hessian", {"result_precision": "float64"}, "result_precision"),
        ("/hessian", {"result_precision": "float16", "encoding": "png"}, "result_precision"),
    ]
    for route, extra, field in cases:
        response = client.post(route, json=_body("digits_cnn", **extra))
        assert response.status_code == 422, (extra, response.text)
        assert response.json()["field"] == field, (extra, response.json())


def test_float16_overflow_is_refused_naming_result_precision() -> None:
    with pytest.raises(InvalidInput) as raised:
        precision.round_for_wire(torch.tensor([1.0, -7.0e4]), "float16")
    assert raised.value.field == "result_precision"
    rounded, notes = precision.round_for_wire(torch.tensor([1.0, 1e-9]), "float16")
    assert rounded.tolist() == [1.0, 0.0] and "rounded to 0" in notes[0]
    assert precision.round_for_wire(torch.tensor([7.0e4]), "bfloat16")[0].item() == 70144.0


def test_the_size_limit_counts_the_rows_so_a_hessian_comes_in_pieces() -> None:
    limit = 300 * N * 4  # 300 rows of float32
    with TestClient(create_app(Settings(device="cpu", max_result_bytes=limit))) as small:
        whole = small.post("/hessian", json=_body("digits_cnn"))
        assert whole.status_code == 413
        assert '"rows"' in whole.json()["detail"] and "300 rows" in whole.json()["detail"]
        blocks = [
            small.post(
                "/hessian",
                json=_body(
                    "digits_cnn", rows={"start": a, "stop": min(a + 300, N)}, encoding="base64"
                ),
            )
            for a in range(0, N, 300)
        ]
        assert [b.status_code for b in blocks] == [200, 200, 200]
        over = small.post("/hessian", json=_body("digits_cnn", rows={"start": 0, "stop": 301}))
        assert over.status_code == 413 and over.json()["field"] == "rows"
        assert (
            small.post("/hessian", json=_body("digits_cnn", result_precision="float16")).status_code
            == 413
        )
        packed16 = small.post(
            "/hessian", json=_body("digits_cnn", layout="packed", result_precision="float16")
        )
        assert packed16.status_code == 200  # 307,720 x 2 bytes fit under 940,800
    with TestClient(create_app(Settings(device="cpu"))) as full:
        dense = decode_response(
            *(lambda r: (r.content, r.headers))(
                full.post("/hessian", json=_body("digits_cnn", encoding="base64"))
            )
        ).arrays["hessian"]
    got = np.concatenate([decode_response(b.content, b.headers).arrays["hessian"] for b in blocks])
    assert np.array_equal(got, dense)
    assert math.prod(got.shape) == N * N
