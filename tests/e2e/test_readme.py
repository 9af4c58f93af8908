"""The README's code blocks run as written, against a real server.

Blocks aimed at the quick-start address have it replaced by the test server's address;
the engine block runs in process. Each block's own assertions and printed results are
checked, so a README that drifts from behaviour fails here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
QUICK_START_URL = "http://127.0.0.1:8000"
pytestmark = pytest.mark.e2e


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


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
    code = blocks("python")[index].replace(QUICK_START_URL, server_url)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr
    prints = [line for line in code.splitlines() if line.startswith("print(")]
    printed = result.stdout.splitlines()
    assert len(printed) == len(prints)
    for line, output in zip(prints, printed, strict=True):
        if "#" in line:  # the comment is what the README promises this line prints
            assert output.strip() == line.split("#", 1)[1].strip(), (line, output)
