"""The playground's routes, in process, no browser: the page at / references only its own
assets, which are served with the types a browser needs; its colour map is
``wire.colormap``'s; its sample is a 784-pixel digit. The page in Chromium:
tests/e2e/test_playground.py.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urljoin, urlsplit

from fastapi.testclient import TestClient

from hessian_service.config import BUNDLED_MODELS_DIR
from hessian_service.wire import colormap

ORIGIN = "http://testserver"


def references(html: str) -> list[str]:
    found = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    return [r for r in found if not r.startswith("data:")]  # the empty favicon


def test_the_page_is_html_that_loads_only_its_own_assets(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    assert '<canvas id="digit"' in html and '<canvas id="heatmap"' in html
    assert 'id="compute"' in html and 'id="predicted"' in html
    wanted = {
        "/playground/static/style.css": "text/css",
        "/playground/static/playground.js": "text/javascript",
        "/docs": "text/html",
    }
    assert set(references(html)) == set(wanted)
    for reference in references(html):
        parts = urlsplit(urljoin(ORIGIN + "/", reference))
        assert f"{parts.scheme}://{parts.netloc}" == ORIGIN, reference
        asset = client.get(parts.path)
        assert asset.status_code == 200, reference
        assert asset.headers["content-type"].startswith(wanted[reference]), reference
    # The second module, imported by the first, by a relative path.
    module = client.get("/playground/static/playground.js").text
    assert 'from "./service.js"' in module
    service = client.get("/playground/static/service.js")
    assert service.status_code == 200
    assert service.headers["content-type"].startswith("text/javascript")
    assert "Inference-Header-Content-Length" in service.text
    for text in (html, module, service.text):
        assert not re.search(r"https?://", text.replace("http://www.w3.org", "")), text[:200]


def test_only_the_listed_assets_are_served(client: TestClient) -> None:
    listed = client.get("/playground/static/index.html")
    assert listed.status_code == 404
    assert listed.json()["field"] == "path"
    assert "the assets are playground.js, service.js, style.css" in listed.json()["detail"]
    # A path never reaches the file system: {name} is one segment from a fixed list.
    for path in ("/playground/static/..%2Fmain.py", "/playground/static/../../main.py"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json()["field"] == "path"


def test_the_page_is_not_in_the_api_document(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [path for path in paths if path == "/" or path.startswith("/playground")]


def test_the_colour_map_is_the_wire_table(client: TestClient) -> None:
    response = client.get("/playground/colormap.json")
    assert response.status_code == 200
    table = response.json()
    assert table == json.loads(json.dumps(colormap.as_json()))
    assert len(table["rgb"]) == colormap.STEPS == 257
    assert table["rgb"][table["centre"]] == colormap.TABLE[colormap.CENTRE].tolist()


def test_the_samples_hold_the_bundled_held_out_digit(client: TestClient) -> None:
    response = client.get("/playground/samples.json")
    assert response.status_code == 200
    (sample,) = response.json()["samples"]
    bundled = json.loads((BUNDLED_MODELS_DIR / "digits_sample.json").read_text())
    assert sample["shape"] == [1, 28, 28]
    assert len(sample["data"]) == 784 and sample["data"] == bundled["data"]
    assert all(0.0 <= v <= 1.0 for v in sample["data"]) and max(sample["data"]) > 0.5
    assert sample["label"] == bundled["label"] == 2
