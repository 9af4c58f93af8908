"""``encoding: "png"`` (and ``Accept: image/png``) on /hessian and /jacobian, in process.

Every picture is checked pixel by pixel against the numbers: the same request with
``encoding: "binary"`` gives the matrix, ``wire.colormap.colours`` colours it, and the
nearest-neighbour rule the service documents (pixel p of P shows entry
floor((2p + 1) * entries / (2P))) says which entry each pixel must show. The rule is
written out here, not imported, so that a change to the server's scaling is caught.
"""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from hessian_service.api.examples import digit_image
from hessian_service.wire import colormap

PROBLEM = "application/problem+json"
HEADER = "Inference-Header-Content-Length"
README_IMAGE = Path(__file__).resolve().parents[2] / "docs" / "images" / "hessian_png.png"
README_IMAGE_LIMIT_BYTES = 300_000
DIGIT = {"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": digit_image()}
X4 = {"name": "x", "shape": [4], "datatype": "FP32", "data": [2.0, 2.0, 2.0, 2.0]}
CLASS_2 = {"model": "digits_cnn", "inputs": [DIGIT], "output_index": 2}


def binary_matrix(client: TestClient, route: str, body: dict[str, Any]) -> np.ndarray:
    """The first output of ``body`` asked for with the binary encoding, as float64,
    without the batch axis of a batch of one (the bundled digit is [1, 1, 28, 28])."""
    response = client.post(route, json={**body, "encoding": "binary"})
    assert response.status_code == 200, response.text
    length = int(response.headers[HEADER])
    header = json.loads(response.content[:length])
    first = header["outputs"][0]
    assert first["datatype"] == "FP32"
    count = first["parameters"]["binary_data_size"] // 4
    values = struct.unpack(f"<{count}f", response.content[length : length + 4 * count])
    shape = first["shape"]
    batch_of_one = header["metadata"]["batch_size"] == 1
    return np.asarray(values, dtype=np.float64).reshape(shape[1:] if batch_of_one else shape)


def picture(response: Any, size: tuple[int, int]) -> np.ndarray:
    """The response as a decoded PNG of ``size`` (width, height): its RGB pixels."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG"
    assert image.mode == "RGB"
    assert image.size == size
    return np.asarray(image)


def expected_pixels(
    matrix: np.ndarray, height: int, width: int, limit: float | None = None
) -> np.ndarray:
    """The colour map of ``matrix`` at the entry each pixel shows (every pixel)."""
    rows, cols = matrix.shape
    at_row = (2 * np.arange(height) + 1) * rows // (2 * height)
    at_col = (2 * np.arange(width) + 1) * cols // (2 * width)
    return colormap.colours(matrix, limit)[np.ix_(at_row, at_col)]


def mismatches(got: np.ndarray, want: np.ndarray) -> int:
    return int(np.count_nonzero((got != want).any(axis=-1)))


@pytest.mark.parametrize(("image_size", "pixels"), [(None, 784), (512, 512), (1000, 1000)])
def test_hessian_png_pixels_are_the_colour_map_of_the_matrix(
    client: TestClient, image_size: int | None, pixels: int
) -> None:
    hessian = binary_matrix(client, "/hessian", CLASS_2)
    assert hessian.shape == (784, 784)
    sized = {} if image_size is None else {"image_size": image_size}
    response = client.post("/hessian", json={**CLASS_2, "encoding": "png", **sized})
    got = picture(response, (pixels, pixels))
    assert mismatches(got, expected_pixels(hessian, pixels, pixels)) == 0
    assert float(response.headers["x-value-limit"]) == np.abs(hessian).max() > 0
    assert response.headers["x-matrix-shape"] == "784x784"
    assert response.headers["x-derivative-method"] == "structured"
    assert response.headers["x-non-finite-entries"] == "0"
    assert float(response.headers["x-compute-time-ms"]) > 0
    # Blue and red both appear: the picture is not washed out to white.
    assert (got[..., 2] > got[..., 0] + 60).any() and (got[..., 0] > got[..., 2] + 60).any()


def test_readme_heatmap_is_written_and_is_the_service_s_picture(client: TestClient) -> None:
    """docs/images/hessian_png.png, shown in the README: the digits_cnn class-2 Hessian
    at the bundled digit, one pixel per entry; written when missing (or asked for)."""
    hessian = binary_matrix(client, "/hessian", CLASS_2)
    response = client.post("/hessian", json={**CLASS_2, "encoding": "png"})
    got = picture(response, (784, 784))
    assert mismatches(got, expected_pixels(hessian, 784, 784)) == 0
    assert len(response.content) < README_IMAGE_LIMIT_BYTES
    if not README_IMAGE.is_file() or os.environ.get("HESSIAN_UPDATE_SCREENSHOTS") == "1":
        README_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        README_IMAGE.write_bytes(response.content)
    # The committed picture is the service's: a change to the colours or the scaling that
    # leaves it stale fails here (HESSIAN_UPDATE_SCREENSHOTS=1 rewrites it).
    with Image.open(README_IMAGE) as committed:
        assert np.array_equal(np.asarray(committed.convert("RGB")), got)


def test_image_limit_sets_the_colour_range(client: TestClient) -> None:
    hessian = binary_matrix(client, "/hessian", CLASS_2)
    limit = float(np.abs(hessian).max()) / 8
    response = client.post(
        "/hessian", json={**CLASS_2, "encoding": "png", "image_size": 392, "image_limit": limit}
    )
    got = picture(response, (392, 392))
    assert float(response.headers["x-value-limit"]) == limit
    assert mismatches(got, expected_pixels(hessian, 392, 392, limit)) == 0
    assert mismatches(got, expected_pixels(hessian, 392, 392)) > 1000  # a different picture
    saturated = tuple(colormap.TABLE[-1])
    assert (got == saturated).all(axis=-1).any()  # values above the limit clip to the end


def test_jacobian_row_of_an_image_model_is_the_saliency_image(client: TestClient) -> None:
    gradient = binary_matrix(client, "/jacobian", CLASS_2)
    assert gradient.shape == (784,)
    image = gradient.reshape(28, 28)
    response = client.post("/jacobian", json={**CLASS_2, "encoding": "png", "image_size": 280})
    got = picture(response, (280, 280))
    assert mismatches(got, expected_pixels(image, 280, 280)) == 0
    assert np.array_equal(got[::10, ::10], colormap.colours(image))  # 10x10 blocks
    assert response.headers["x-matrix-shape"] == "28x28"
    assert float(response.headers["x-value-limit"]) == np.abs(gradient).max()


def test_jacobian_of_every_output_is_its_rows(client: TestClient) -> None:
    body = {"model": "digits_cnn", "inputs": [DIGIT]}
    jacobian = binary_matrix(client, "/jacobian", body)
    assert jacobian.shape == (10, 784)
    response = client.post("/jacobian", json={**body, "encoding": "png", "image_size": 1568})
    got = picture(response, (1568, 20))  # the aspect ratio kept: 2 x 2 pixels an entry
    assert mismatches(got, expected_pixels(jacobian, 20, 1568)) == 0
    assert response.headers["x-matrix-shape"] == "10x784"


def test_small_results_are_drawn_in_blocks(client: TestClient) -> None:
    """A 4x4 Hessian is drawn 256 px by default (64 px an entry); the 1 x 4 gradient of
    a model whose input is not an image is a strip."""
    body = {"model": "quadratic4", "inputs": [X4], "output_index": 2}
    response = client.post("/hessian", json={**body, "encoding": "png"})
    got = picture(response, (256, 256))
    expected = np.zeros((4, 4))
    expected[2, 2] = 4.0  # diag(0, 0, 4, 0)
    assert mismatches(got, expected_pixels(expected, 256, 256)) == 0
    assert tuple(got[128 + 32, 128 + 32]) == tuple(colormap.TABLE[-1])  # the 4: darkest red
    assert tuple(got[0, 0]) == tuple(colormap.TABLE[colormap.CENTRE])  # zero: white
    assert response.headers["x-value-limit"] == "4.0"
    assert response.headers["x-matrix-shape"] == "4x4"

    strip = client.post("/jacobian", json={**body, "encoding": "png"})
    got = picture(strip, (256, 64))
    assert mismatches(got, expected_pixels(np.array([[0.0, 0.0, 8.0, 0.0]]), 64, 256)) == 0
    assert strip.headers["x-matrix-shape"] == "1x4"


@pytest.mark.parametrize(
    ("accept", "body_encoding", "media_type"),
    [
        ("image/png", None, "image/png"),
        ("image/*", None, "image/png"),
        ("application/json;q=0.5, image/png", None, "image/png"),
        ("*/*", None, "application/json"),
        ("application/json, image/png", None, "application/json"),  # a tie: the default
        ("image/png;q=0, */*", None, "application/json"),
        # The body's encoding is explicit and wins over Accept.
        ("image/png", "json", "application/json"),
        ("image/png", "binary", "application/octet-stream"),
        ("application/json", "png", "image/png"),
    ],
)
def test_accept_image_png_selects_png_when_the_body_sets_no_encoding(
    client: TestClient, accept: str, body_encoding: str | None, media_type: str
) -> None:
    body = {"model": "quadratic4", "inputs": [X4], "output_index": 2}
    if body_encoding is not None:
        body["encoding"] = body_encoding
    response = client.post("/hessian", json=body, headers={"Accept": accept})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == media_type
    assert response.headers["vary"] == "Accept"
    if media_type == "image/png":
        picture(response, (256, 256))
    elif media_type == "application/json":
        assert np.reshape(response.json()["outputs"][0]["data"], (4, 4))[2, 2] == 4.0


def test_accept_image_png_on_jacobian(client: TestClient) -> None:
    response = client.post("/jacobian", json=CLASS_2, headers={"Accept": "image/png"})
    picture(response, (280, 280))  # one gradient row of a 28x28 image, 10 x 10 px an entry
    assert response.headers["x-matrix-shape"] == "28x28"


BATCH_OF_2 = {"name": "x", "shape": [2, 1, 28, 28], "data": digit_image() * 2}


@pytest.mark.parametrize(
    ("route", "body", "field", "words"),
    [
        ("/hessian", {**CLASS_2, "inputs": [BATCH_OF_2]}, "inputs[0].shape", ["one sample", "2"]),
        ("/jacobian", {**CLASS_2, "inputs": [BATCH_OF_2]}, "inputs[0].shape", ["one sample"]),
        ("/hessian", {**CLASS_2, "output_index": [2, 3]}, "output_index", ["one int", "list"]),
        ("/hessian", {**CLASS_2, "image_size": 15}, "image_size", ["16"]),
        ("/hessian", {**CLASS_2, "image_size": 2049}, "image_size", ["2048"]),
        ("/jacobian", {**CLASS_2, "image_size": True}, "image_size", ["integer"]),
        ("/hessian", {**CLASS_2, "image_limit": 0}, "image_limit", ["greater than 0"]),
        ("/hessian", {**CLASS_2, "layout": "tensor"}, "layout", ["matrix"]),
        ("/hessian", {**CLASS_2, "encoding": "json", "image_size": 64}, "image_size", ["png"]),
        ("/jacobian", {**CLASS_2, "encoding": "base64", "image_limit": 1}, "image_limit", ["png"]),
    ],
)
def test_png_errors_are_problems_naming_the_field(
    client: TestClient, route: str, body: dict[str, Any], field: str, words: list[str]
) -> None:
    body = {"encoding": "png", **body}
    response = client.post(route, json=body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["field"] == field
    for word in words:
        assert word in problem["detail"], problem["detail"]


def test_a_batch_of_one_sample_is_drawn(client: TestClient) -> None:
    """The bundled digit is [1, 1, 28, 28], a batch of 1 of the [1, 28, 28] input: drawn."""
    response = client.post("/hessian", json={**CLASS_2, "encoding": "png", "image_size": 64})
    picture(response, (64, 64))


def test_openapi_documents_the_png_response(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/hessian", "/jacobian"):
        operation = spec["paths"][path]["post"]
        ok = operation["responses"]["200"]
        assert ok["content"]["image/png"] == {"schema": {"type": "string", "format": "binary"}}
        for header in ("X-Value-Limit", "X-Matrix-Shape", "X-Derivative-Method"):
            assert header in ok["headers"], header
        examples = operation["requestBody"]["content"]["application/json"]["examples"]
        default = next(iter(examples.values()))
        assert default["value"]["encoding"] == "png"
        assert default["value"]["model"] == "digits_cnn"
    request = spec["components"]["schemas"]["DerivativeRequest"]["properties"]
    assert "png" in request["encoding"]["enum"]
    assert "X-Value-Limit" in request["encoding"]["description"]
    assert request["image_size"]["anyOf"][0] == {"type": "integer", "minimum": 16, "maximum": 2048}
