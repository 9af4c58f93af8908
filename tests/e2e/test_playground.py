"""The playground page at / in headless Chromium, with no way off 127.0.0.1.

Drives Debian's chromium with Playwright's Python package, as test_docs_page.py does
(its flags and host rules: every name but 127.0.0.1 is "not found", so any CDN asset
fails). Every assertion is on what the page RENDERED, checked against the service's
own answers fetched here: the class shown against the ``/v2`` forward pass of the
pixels read back from the canvas, the heatmap's and the row image's pixels against
``wire.colormap`` of the Hessian from ``/hessian``, the number table against the
closed form of ``quadratic4``.

The README's screenshot, docs/images/playground.png, is written when it is missing or
when ``HESSIAN_UPDATE_SCREENSHOTS=1`` (its timings differ on every run, so it is not
rewritten by default).
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hessian_client._wire import decode_response
from PIL import Image

from hessian_service.wire import colormap
from tests.e2e.browser import CHROMIUM_FLAGS, OFFLINE_RULES, missing
from tests.e2e.conftest import ROOT

pytestmark = pytest.mark.e2e

SIDE = 28
N = SIDE * SIDE
VIEWPORT = {"width": 1480, "height": 1100}
SCREENSHOT = ROOT / "docs" / "images" / "playground.png"
SCREENSHOT_MAX_BYTES = 400_000
# A "7": across the top, then down to the lower left, in input pixels.
STROKE = [(6.0, 6.0), (21.0, 6.0), (17.0, 13.0), (11.0, 23.0)]

PIXELS_JS = """([id, points]) => {
  const context = document.getElementById(id).getContext("2d");
  return points.map(([x, y]) => Array.from(context.getImageData(x, y, 1, 1).data));
}"""
CANVAS_JS = """(id) => {
  const canvas = document.getElementById(id);
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  return [canvas.width, canvas.height, Array.from(data)];
}"""
PNG_JS = "(id) => document.getElementById(id).toDataURL('image/png')"
LARGEST_JS = """() => {
  const h = window.playground.hessian;
  let top = 0;
  for (let k = 1; k < h.length; k++) if (Math.abs(h[k]) > Math.abs(h[top])) top = k;
  return top;
}"""


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright package is not installed (pip install -e '.[dev]')")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=[*CHROMIUM_FLAGS[1:], OFFLINE_RULES]
        )
        try:
            yield launched
        finally:
            launched.close()


class Playground:
    """One page of the playground, with every request, failure and error it produced."""

    def __init__(self, browser: Any, server_url: str) -> None:
        self.server_url = server_url
        self.requests: list[str] = []
        self.posted: dict[str, list[dict[str, Any]]] = {"/jacobian": [], "/hessian": []}
        self.failures: list[str] = []
        self.errors: list[str] = []
        self.page = browser.new_page(viewport=VIEWPORT)
        self.page.set_default_timeout(30_000)
        self.page.on("request", self._request)
        self.page.on("requestfailed", lambda r: self.failures.append(f"{r.url}: {r.failure}"))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.goto(f"{server_url}/")
        self.page.wait_for_function("document.body.dataset.state === 'ready'")

    def _request(self, request: Any) -> None:
        self.requests.append(request.url)
        path = request.url.removeprefix(self.server_url)
        if request.method == "POST" and path in self.posted:
            self.posted[path].append(json.loads(request.post_data))

    def computed(self, runs: int, action: Any) -> None:
        """Do ``action`` (a click) and wait until the page has finished ``runs`` computations."""
        action()
        self.page.wait_for_function(
            f"document.body.dataset.runs === '{runs}' || document.body.dataset.state === 'error'"
        )
        assert self.page.inner_text("#status") == "done", self.page.inner_text("#status")

    def at_pixel(self, selector: str, column: float, row: float, size: int) -> tuple[float, float]:
        """Viewport coordinates of the centre of pixel (row, column) of a canvas of
        ``size`` x ``size`` pixels, however large it is shown."""
        box = self.page.locator(selector).bounding_box()
        return (
            box["x"] + (column + 0.5) * box["width"] / size,
            box["y"] + (row + 0.5) * box["height"] / size,
        )

    def canvas(self, canvas_id: str) -> np.ndarray:
        """A canvas's RGBA pixels, [height, width, 4] uint8, through getImageData."""
        width, height, data = self.page.evaluate(CANVAS_JS, canvas_id)
        return np.array(data, dtype=np.uint8).reshape(height, width, 4)

    def assert_stayed_on_its_origin(self) -> None:
        assert not self.failures, self.failures
        assert not self.errors, self.errors
        foreign = [url for url in self.requests if not url.startswith(self.server_url + "/")]
        assert not foreign, f"the page made requests off its own origin: {foreign}"


def sent_input(body: dict[str, Any]) -> np.ndarray:
    """The FP32 input of a derivative request the page sent, as an array."""
    (tensor,) = body["inputs"]
    assert tensor["datatype"] == "FP32" and body["encoding"] == "binary"
    return np.frombuffer(base64.b64decode(tensor["data"]), dtype="<f4")


def hessian_of(server_url: str, model: str, x: np.ndarray, index: int) -> tuple[np.ndarray, str]:
    """The Hessian of output ``index`` at ``x``, fetched here (binary), and its method."""
    body = {
        "model": model,
        "inputs": [
            {
                "name": "x",
                "shape": [1, SIDE, SIDE] if x.size == N else [x.size],
                "datatype": "FP32",
                "data": base64.b64encode(x.astype("<f4").tobytes()).decode(),
            }
        ],
        "output_index": index,
        "encoding": "binary",
    }
    with httpx.Client(base_url=server_url, timeout=60.0, trust_env=False) as http:
        response = http.post("/hessian", json=body)
    assert response.status_code == 200, response.text
    decoded = decode_response(response.content, response.headers)
    return decoded.arrays["hessian"], decoded.body["metadata"]["method"]


def forward_pass(server_url: str, x: np.ndarray) -> np.ndarray:
    """digits_cnn's logits at ``x`` from the Open Inference Protocol's infer."""
    data = x.astype(np.float32).ravel().tolist()
    body = {
        "inputs": [{"name": "x", "shape": [1, 1, SIDE, SIDE], "datatype": "FP32", "data": data}]
    }
    with httpx.Client(base_url=server_url, timeout=60.0, trust_env=False) as http:
        response = http.post("/v2/models/digits_cnn/infer", json=body)
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    return np.asarray(output["data"], dtype=np.float32).reshape(-1)


def draw(playground: Playground, stroke: list[tuple[float, float]]) -> None:
    """One stroke on the digit canvas with the mouse: down, moves, up."""
    mouse = playground.page.mouse
    mouse.move(*playground.at_pixel("#digit", *stroke[0], SIDE))
    mouse.down()
    for point in stroke[1:]:
        mouse.move(*playground.at_pixel("#digit", *point, SIDE), steps=12)
    mouse.up()


def test_a_drawn_digit_shows_the_forward_pass_class_and_the_hessian_in_the_colour_map(
    browser: Any, server_url: str
) -> None:
    playground = Playground(browser, server_url)
    page = playground.page
    # Every ready model whose dense Hessian the page can draw, and not photo_digits_cnn
    # (12,288 inputs: a 604 MB Hessian, served by the matrix-free routes instead).
    listed = page.eval_on_selector_all("#model option", "options => options.map(o => o.value)")
    assert "digits_cnn" in listed and "quadratic4" in listed
    assert "photo_digits_cnn" not in listed
    page.select_option("#model", "digits_cnn")
    draw(playground, STROKE)
    playground.computed(1, lambda: page.click("#compute"))

    # The 28 x 28 pixels read back from the canvas are what the page sent, both times.
    rgba = playground.canvas("digit")
    assert rgba.shape == (SIDE, SIDE, 4)
    assert (rgba[..., 3] == 255).all() and (rgba[..., 0] == rgba[..., 2]).all()
    x = (rgba[..., 0].astype(np.float64) / 255).astype(np.float32).ravel()
    assert 20 < x.sum() < 400 and (x == 0).sum() > 300, "the stroke did not draw a digit"
    for path in ("/jacobian", "/hessian"):
        (body,) = playground.posted[path]
        assert np.array_equal(sent_input(body), x), f"{path} was not sent the canvas's pixels"

    # The class shown is the argmax of the /v2 forward pass on those pixels.
    logits = forward_pass(server_url, x)
    predicted = int(np.argmax(logits))
    assert int(page.inner_text("#predicted")) == predicted
    probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    shown = [
        float(v) for v in page.eval_on_selector_all(".bar", "b => b.map(e => e.dataset.value)")
    ]
    np.testing.assert_allclose(shown, probabilities, atol=1e-5)
    assert page.inner_text(".bar.chosen .label") == f"class {predicted}"
    assert playground.posted["/hessian"][0]["output_index"] == predicted

    # The heatmap: every pixel is the colour map of the matching entry of /hessian.
    hessian, method = hessian_of(server_url, "digits_cnn", x, predicted)
    assert hessian.shape == (N, N)
    limit = colormap.symmetric_limit(hessian)
    expected = colormap.colours(hessian, limit)
    assert page.evaluate("window.playground.limit") == limit
    assert float(page.inner_text("#scale-max")) == pytest.approx(limit, rel=1e-3)
    assert float(page.inner_text("#scale-min")) == pytest.approx(-limit, rel=1e-3)
    top = np.unravel_index(np.argmax(np.abs(hessian)), hessian.shape)
    lowest = np.unravel_index(np.argmin(hessian), hessian.shape)
    zeros = np.argwhere(hessian == 0)
    assert len(zeros) > 0
    rng = np.random.default_rng(0)
    picks = [top, lowest, tuple(zeros[0]), tuple(zeros[-1])]
    picks += [tuple(p) for p in rng.integers(0, N, size=(12, 2))]
    nonzero = np.argwhere(hessian != 0)
    picks += [tuple(p) for p in nonzero[rng.choice(len(nonzero), 8, replace=False)]]
    pixels = page.evaluate(PIXELS_JS, ["heatmap", [[int(j), int(i)] for i, j in picks]])
    for (i, j), rgba_ij in zip(picks, pixels, strict=True):
        assert rgba_ij == [*expected[i, j].tolist(), 255], (i, j, float(hessian[i, j]))
    assert expected[top].tolist() in (colormap.TABLE[0].tolist(), colormap.TABLE[-1].tolist())
    assert expected[tuple(zeros[0])].tolist() == colormap.TABLE[colormap.CENTRE].tolist()
    # ... and all 614,656 of them (the canvas as a lossless PNG).
    png = base64.b64decode(page.evaluate(PNG_JS, "heatmap").split(",", 1)[1])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), expected)

    # Hovering reads an entry.
    i, j = (int(v) for v in top)
    page.mouse.move(*playground.at_pixel("#heatmap", j, i, N))
    readout = page.locator("#hover-readout")
    assert (readout.get_attribute("data-i"), readout.get_attribute("data-j")) == (str(i), str(j))
    assert float(readout.get_attribute("data-value")) == float(hessian[i, j])
    assert f"row {i}, column {j}" in readout.inner_text()
    # Clicking heatmap pixel (j, i) shows row i in the row's own limit: a row whose
    # largest |entry| is well below the matrix's, clicked off its diagonal.
    row_limits = np.abs(hessian).max(axis=1)
    i = int(np.argsort(row_limits)[N // 2])
    j = int(np.argsort(np.abs(hessian[i]))[-2])
    assert i != j and 0 < row_limits[i] < limit / 2
    page.mouse.click(*playground.at_pixel("#heatmap", j, i, N))
    assert page.get_attribute("#row-label", "data-row") == str(i)
    assert f"row {i}" in page.inner_text("#row-label")
    row = hessian[i]
    row_colours = colormap.colours(row, colormap.symmetric_limit(row)).reshape(SIDE, SIDE, 3)
    assert np.array_equal(playground.canvas("row")[..., :3], row_colours)
    assert float(page.get_attribute("#row-scale", "data-limit")) == colormap.symmetric_limit(row)

    # A pixel (r, c) of the digit's Jacobian image shows row 28 r + c.
    r, c = divmod(int(lowest[0]), SIDE)
    page.mouse.click(*playground.at_pixel("#saliency", c, r, SIDE))
    assert page.get_attribute("#row-label", "data-row") == str(int(lowest[0]))

    # The server's time and method, as the page shows them.
    timing = page.locator("#time-hessian")
    assert timing.get_attribute("data-method") == method == "structured"
    assert float(timing.get_attribute("data-compute-ms")) > 0
    assert "round trip" in timing.inner_text() and "method structured" in timing.inner_text()
    playground.assert_stayed_on_its_origin()
    page.close()


def test_a_vector_model_shows_its_hessian_as_numbers(browser: Any, server_url: str) -> None:
    playground = Playground(browser, server_url)
    page = playground.page
    page.select_option("#model", "quadratic4")
    assert page.is_hidden("#digit") and page.is_hidden("#row-panel")
    page.fill("#numbers", "2, 2, 2, 2")
    playground.computed(1, lambda: page.click("#compute"))
    # f(x) = x * x * arange(4) at x = 2: outputs 4 k.
    outputs = page.eval_on_selector_all(".bar", "b => b.map(e => Number(e.dataset.value))")
    assert outputs == [0.0, 4.0, 8.0, 12.0]
    playground.computed(2, lambda: page.click(".bar[data-index='2']"))
    assert playground.posted["/hessian"][-1]["output_index"] == 2
    cells = page.eval_on_selector_all(
        "#matrix-table td", "cs => cs.map(c => [+c.dataset.i, +c.dataset.j, +c.dataset.value])"
    )
    table = np.zeros((4, 4))
    for i, j, value in cells:
        table[int(i), int(j)] = value
    assert len(cells) == 16
    assert np.array_equal(table, np.diag([0.0, 0.0, 4.0, 0.0]))  # d2(2 x2^2)/dx2^2 = 4
    assert page.inner_text("#matrix-table td[data-i='2'][data-j='2']") == "4"
    assert page.inner_text("#matrix-table td[data-i='1'][data-j='2']") == "0"
    heatmap = playground.canvas("heatmap")[..., :3]
    assert heatmap.shape == (4, 4, 3)
    assert np.array_equal(heatmap, colormap.colours(table))
    assert heatmap[2, 2].tolist() == colormap.TABLE[-1].tolist()
    playground.assert_stayed_on_its_origin()
    page.close()


def test_the_sample_digit_is_classified_and_screenshot_for_the_readme(
    browser: Any, server_url: str, tmp_path: Path
) -> None:
    playground = Playground(browser, server_url)
    page = playground.page
    with httpx.Client(base_url=server_url, timeout=30.0, trust_env=False) as http:
        (sample,) = http.get("/playground/samples.json").json()["samples"]
    page.click("#sample")
    playground.computed(1, lambda: page.click("#compute"))
    assert int(page.inner_text("#predicted")) == sample["label"]
    sent = sent_input(playground.posted["/jacobian"][0])
    grey = np.round(np.clip(np.asarray(sample["data"]), 0, 1) * 255)
    assert np.array_equal(sent, (grey / 255).astype(np.float32))
    i, j = divmod(page.evaluate(LARGEST_JS), N)
    page.mouse.click(*playground.at_pixel("#heatmap", j, i, N))
    page.mouse.move(*playground.at_pixel("#heatmap", j + 3, i, N))
    assert page.get_attribute("#row-label", "data-row") == str(i)

    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot))
    png = shot.read_bytes()
    image = Image.open(io.BytesIO(png))
    assert image.size == (VIEWPORT["width"], VIEWPORT["height"])
    assert len(png) < SCREENSHOT_MAX_BYTES, f"{len(png)} bytes: too large for the README"
    # The page's blue and red are in it: the heatmap and the scale bar rendered.
    colours = {tuple(c) for c in np.asarray(image.convert("RGB")).reshape(-1, 3)}
    assert {tuple(colormap.TABLE[0]), tuple(colormap.TABLE[-1])} <= colours
    if not SCREENSHOT.exists() or os.environ.get("HESSIAN_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.write_bytes(png)
    playground.assert_stayed_on_its_origin()
    page.close()
