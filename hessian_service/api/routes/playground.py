"""The playground page at ``/``: draw a digit, see its class probabilities, Jacobian and
Hessian as pictures.

The page is plain HTML, CSS and two ES modules shipped in the package
(``api/static/playground/``), so it works with no internet and no build step. It talks
to the service's own endpoints (``/models``, ``/jacobian``, ``/hessian`` with the binary
encoding); the two JSON documents here give it what those endpoints do not:

- ``/playground/colormap.json``: ``wire.colormap``'s table and rule, so the page colours
  a value exactly as the PNG heatmaps do;
- ``/playground/samples.json``: the bundled held-out digit(s) of the models folder.

None of these routes is in the OpenAPI document: they serve a page, not the API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

from hessian_service.api.examples import DIGIT_SAMPLE_FILE, digit_sample
from hessian_service.errors import NotFound
from hessian_service.wire import colormap

STATIC_DIR = Path(__file__).resolve().parents[1] / "static" / "playground"
ASSET_PREFIX = "/playground/static"
# The only files served from STATIC_DIR, and their types (an ES module must be served as
# JavaScript, or the browser refuses to run it). A fixed list: no path ever reaches the
# file system from the URL.
ASSETS = {
    "playground.js": "text/javascript",
    "service.js": "text/javascript",
    "style.css": "text/css",
}
# The page and its modules change with the package; browsers revalidate (ETag) each load.
NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=FileResponse)
async def page() -> FileResponse:
    """The playground page."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=NO_CACHE)


@router.get(ASSET_PREFIX + "/{name}", response_class=FileResponse)
async def asset(name: str) -> FileResponse:
    """One of the page's own assets (``ASSETS``)."""
    if name not in ASSETS:
        raise NotFound(
            f"no playground asset {name!r}; the assets are {', '.join(sorted(ASSETS))}",
            field="path",
        )
    return FileResponse(STATIC_DIR / name, media_type=ASSETS[name], headers=NO_CACHE)


@router.get("/playground/colormap.json")
async def colormap_table() -> JSONResponse:
    """The diverging colour map the page colours every matrix with (``wire.colormap``)."""
    return JSONResponse(colormap.as_json())


def bundled_samples(models_dir: Path) -> list[dict[str, Any]]:
    """The held-out digits shipped beside the models, one sample each ``[1, 28, 28]``
    (none when the models folder has no sample file)."""
    sample = digit_sample(models_dir)
    if sample is None:
        return []
    name = Path(DIGIT_SAMPLE_FILE).stem
    shape = sample["shape"][-3:]
    return [{"name": name, "label": sample["label"], "shape": shape, "data": sample["data"]}]


@router.get("/playground/samples.json")
def samples(request: Request) -> dict[str, list[dict[str, Any]]]:
    """The digits the page's "load sample digit" button offers (read in a worker thread)."""
    return {"samples": bundled_samples(request.app.state.settings.models_dir)}
