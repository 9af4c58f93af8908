"""The README's code blocks run as written, against a real server.

Blocks aimed at the quick-start address have it replaced by the test server's address;
the engine block runs in process. Each block's own assertions and printed results are
checked, so a README that drifts from behaviour fails here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.e2e.conftest import running_server

README = Path(__file__).resolve().parents[2] / "README.md"
QUICK_START_URL = "http://127.0.0.1:8000"
# Blocks that use the model-management API run against a server with a token.
ADMIN_MARK = "HESSIAN_ADMIN_TOKEN"
ADMIN_TOKEN = "readme-example-token"
pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


# Blocks that use KServe's client run in the venv `make test` makes for it (kserve pins
# protobuf<7, which the [ray] extra's dependencies do not allow in the main venv).
KSERVE_MARK = "from kserve import"
KSERVE_PYTHON = README.parent / ".venv-kserve" / "bin" / "python"


def blocks(language: str, *, admin: bool = False, kserve: bool = False) -> list[str]:
    found = re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)
    return [
        block
        for block in found
        if (ADMIN_MARK in block) == admin and (KSERVE_MARK in block) == kserve
    ]


@pytest.fixture(scope="module")
def admin_url() -> Iterator[str]:
    with running_server(HESSIAN_ADMIN_TOKEN=ADMIN_TOKEN) as url:
        yield url


def _run_python(
    code: str,
    env: dict[str, str] | None = None,
    python: str = sys.executable,
    nested_prints: bool = False,
) -> None:
    """Run ``code``; each ``print(`` line (at the block's top level, or anywhere with
    ``nested_prints``: a block whose prints are in a function called once) printed one
    line, and a commented one printed what its comment says."""
    result = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, timeout=180, env=env
    )
    assert result.returncode == 0, result.stderr
    lines = [line.strip() if nested_prints else line for line in code.splitlines()]
    prints = [line for line in lines if line.startswith("print(")]
    printed = result.stdout.splitlines()
    assert len(printed) == len(prints)
    for line, output in zip(prints, printed, strict=True):
        if "#" in line:  # the comment is what the README promises this line prints
            assert output.strip() == line.split("#", 1)[1].strip(), (line, output)


def test_quick_start_names_the_two_make_commands() -> None:
    (quick_start, *_) = blocks("bash")
    commands = [line.split("#")[0].strip() for line in quick_start.splitlines()]
    assert commands == ["make serve", "make test"]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci


def test_curl_example(server_url: str) -> None:
    (curl,) = [b for b in blocks("bash") if b.lstrip().startswith("curl")]
    result = subprocess.run(
        ["bash", "-c", curl.replace(QUICK_START_URL, server_url)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    body = json.loads(result.stdout)
    hessian = body["outputs"][0]
    assert hessian["shape"] == [4, 4]
    assert hessian["data"] == [0.0] * 10 + [4.0] + [0.0] * 5


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_examples(server_url: str, index: int) -> None:
    _run_python(blocks("python")[index].replace(QUICK_START_URL, server_url))


@pytest.mark.skipif(not KSERVE_PYTHON.exists(), reason="no .venv-kserve: `make test` creates it")
@pytest.mark.parametrize("index", range(len(blocks("python", kserve=True))))
def test_kserve_examples(server_url: str, index: int) -> None:
    code = blocks("python", kserve=True)[index].replace(QUICK_START_URL, server_url)
    _run_python(code, python=str(KSERVE_PYTHON), nested_prints=True)


@pytest.mark.parametrize("index", range(len(blocks("python", admin=True))))
def test_model_management_examples(admin_url: str, index: int) -> None:
    code = blocks("python", admin=True)[index].replace(QUICK_START_URL, admin_url)
    _run_python(code, env={**os.environ, ADMIN_MARK: ADMIN_TOKEN})


def test_model_management_curl_example(admin_url: str, tmp_path: Path) -> None:
    (curl,) = blocks("bash", admin=True)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    torch.jit.save(torch.jit.script(model.eval()), str(tmp_path / "my_net.pt"))
    result = subprocess.run(
        ["bash", "-c", curl.replace(QUICK_START_URL, admin_url)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=tmp_path,
        env={**os.environ, ADMIN_MARK: ADMIN_TOKEN},
    )
    info = json.loads(result.stdout)
    assert (info["name"], info["version"], info["format"]) == ("my_net", "2", "torchscript")
    assert info["capabilities"]["engine_path"] == "graph"
    assert info["capabilities"]["parameters"] == 3 * 4 + 4 + 4 * 2 + 2


def test_png_example_writes_the_heatmap(server_url: str, tmp_path: Path) -> None:
    """The README's PNG block (run from a checkout's root) writes a 512 px heatmap."""
    from PIL import Image

    (block,) = [b for b in blocks("bash") if "'encoding': 'png'" in b]
    sample = Path("hessian_service/repository/models/digits_sample.json")
    (tmp_path / sample.parent).mkdir(parents=True)
    (tmp_path / sample).symlink_to(README.parent / sample)
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.replace(QUICK_START_URL, server_url)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    headers = result.stdout.lower()
    assert "content-type: image/png" in headers and "x-matrix-shape: 784x784" in headers
    with Image.open(tmp_path / "h.png") as image:
        assert (image.format, image.size) == ("PNG", (512, 512))
