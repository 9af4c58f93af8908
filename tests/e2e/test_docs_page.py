"""The Swagger UI at /docs, rendered by headless Chromium with no way off 127.0.0.1.

Chromium is Debian's package (``make browser`` installs it). Every run maps all host names
to "not found" (``--host-resolver-rules``), so a page that needs a CDN renders blank and
the operation blocks are missing. The click test drives the same binary with Playwright's
Python package (never ``playwright install``).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

pytestmark = pytest.mark.e2e

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
]
# Nothing resolves except 127.0.0.1 itself: an external asset can only fail to load.
OFFLINE_RULES = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"
HESSIAN_OP = "operations-derivatives-hessian"  # tag, then the operation id
JACOBIAN_OP = "operations-derivatives-jacobian"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _missing(what: str) -> NoReturn:
    message = f"{what}; `make browser` installs Debian's chromium (needs root)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} -- CI must run the browser tests")
    pytest.skip(message)


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        _missing("chromium is not on PATH")
    return path


def run_chromium(chromium: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        chromium,
        *CHROMIUM_FLAGS,
        OFFLINE_RULES,
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=15000",
        *args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, f"chromium exited with {done.returncode}:\n{done.stderr[-4000:]}"
    return done


def test_docs_html_references_only_same_origin_assets(server_url: str) -> None:
    with httpx.Client(base_url=server_url, timeout=30.0, trust_env=False) as http:
        page = http.get("/docs")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        html = page.text
        references = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
        references += re.findall(r"""\burl\s*:\s*["']([^"']+)["']""", html)
        assert any(r.endswith(".js") for r in references), references
        assert any(r.endswith(".css") for r in references), references
        assert "/openapi.json" in references
        for reference in references:
            parts = urlsplit(urljoin(server_url + "/docs", reference))
            assert f"{parts.scheme}://{parts.netloc}" == server_url, (
                f"/docs loads {reference!r} from another origin: it would fail offline"
            )
            asset = http.get(parts.path)
            assert asset.status_code == 200, reference
            assert len(asset.content) > 100, reference
        assert "cdn." not in html and "unpkg" not in html


def test_docs_page_renders_the_operations_offline(
    chromium: str, server_url: str, tmp_path: Path
) -> None:
    dom = run_chromium(chromium, tmp_path, "--dump-dom", f"{server_url}/docs").stdout
    for op, path in ((HESSIAN_OP, "/hessian"), (JACOBIAN_OP, "/jacobian")):
        block = re.search(rf'<div class="opblock opblock-post[^"]*" id="{op}">', dom)
        assert block, f"no Swagger UI block for POST {path} in the rendered page"
        assert f'data-path="{path}"' in dom[block.end() : block.end() + 2000]
    for path in ("/models", "/health/live", "/health/ready"):
        assert f'data-path="{path}"' in dom
    assert "hessian-service" in dom


def test_docs_page_screenshot(chromium: str, server_url: str, tmp_path: Path) -> None:
    shot = tmp_path / "docs.png"
    run_chromium(
        chromium, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", f"{server_url}/docs"
    )
    assert shot.is_file()
    png = shot.read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1280, 2000)
    # A blank page compresses to a few kB; the rendered operations list is far larger.
    assert len(png) > 20_000, f"screenshot is only {len(png)} bytes: a blank page?"


def test_try_it_out_executes_the_default_hessian_example(
    chromium: str, server_url: str, tmp_path: Path
) -> None:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install -e '.[dev]')")
    # A host name that is not "localhost", mapped to 127.0.0.1; everything else is not found.
    port = urlsplit(server_url).port
    origin = f"http://hessian.test:{port}"
    rules = "--host-resolver-rules=MAP hessian.test 127.0.0.1, MAP * ~NOTFOUND"
    requests: list[str] = []
    failures: list[str] = []
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium,
            headless=True,
            args=[*CHROMIUM_FLAGS[1:], rules],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 2000})
            page.set_default_timeout(60_000)
            page.on("request", lambda r: requests.append(r.url))
            page.on("requestfailed", lambda r: failures.append(f"{r.url}: {r.failure}"))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{origin}/docs")
            operation = page.locator(f"#{HESSIAN_OP}")
            operation.locator(".opblock-summary").click()
            operation.get_by_role("button", name="Try it out").click()
            operation.get_by_role("button", name="Execute").click()
            live = operation.locator(".live-responses-table tr.response")
            status = live.locator("td.response-col_status").first
            status.wait_for()
            code = status.inner_text().strip()
            shown = live.locator(".response-col_description .highlight-code pre").first
            text = shown.inner_text()
            page.screenshot(path=str(tmp_path / "try-it-out.png"))
        finally:
            browser.close()

    assert code == "200", text[:2000]
    body: dict[str, Any] = json.loads(text)
    hessian = body["outputs"][0]
    assert hessian["name"] == "hessian"
    assert hessian["shape"] == [1, 784, 784]
    assert hessian["datatype"] == "FP32"
    assert len(base64.b64decode(hessian["data"])) == 784 * 784 * 4
    assert body["metadata"]["output_index"] == 2
    assert body["metadata"]["batch_size"] == 1
    assert f"{origin}/hessian" in requests
    assert not failures, failures
    assert not errors, errors
    foreign = [url for url in requests if not url.startswith(origin + "/")]
    assert not foreign, f"the page made requests off its own origin: {foreign}"
