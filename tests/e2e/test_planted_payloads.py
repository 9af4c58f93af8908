"""Planted payloads against a real server: nothing runs, and the server keeps serving.

Each archive below passed the scanner of the first release (which stopped at a pickle's
first STOP and read whole members into memory) and, loaded, would have run its payload
or native code. Uploaded with the admin token, or left in HESSIAN_MODELS_DIR for start-up,
each is refused, its payload's marker file never appears, and the quadratic model still
answers its closed-form Hessian afterwards. Uploads are also checked in a child process:
a first forward pass that never ends, or that allocates past the child's memory limit,
is refused in time while the server answers.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from torch import nn

from hessian_service.config import BUNDLED_MODELS_DIR
from tests.byom import torchscript_bytes
from tests.e2e.conftest import running_server
from tests.e2e.test_byom import AUTH, TOKEN, register
from tests.e2e.test_server import decode, problem, tensor
from tests.unit.test_archives import _framing_attacks

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

ATTACKS = list(_framing_attacks(Path("unused")).keys())
CHECK_TIMEOUT_S = 12
CHECK_MEMORY_BYTES = 2 << 30


def _quadratic_still_serves(http: httpx.Client) -> None:
    """quadratic4's Hessian at x = 1: its closed form has 6 at [3, 3] (see its manifest)."""
    request = {"model": "quadratic4", "inputs": tensor([4], [1] * 4), "output_index": 3}
    response = http.post("/hessian", json=request)
    assert response.status_code == 200, response.text
    assert decode(response.json()["outputs"][0])[3, 3] == 6.0


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with (
        running_server(
            HESSIAN_ADMIN_TOKEN=TOKEN,
            HESSIAN_UPLOAD_DIR=str(tmp_path_factory.mktemp("uploads")),
            HESSIAN_UPLOAD_CHECK_TIMEOUT_S=str(CHECK_TIMEOUT_S),
            HESSIAN_UPLOAD_CHECK_MEMORY_BYTES=str(CHECK_MEMORY_BYTES),
        ) as url,
        httpx.Client(base_url=url, timeout=120.0, trust_env=False) as http,
    ):
        yield http


def _manifest(name: str, fmt: str, input_shape: list[int]) -> dict[str, Any]:
    return {"name": name, "version": "1", "format": fmt, "input_shape": input_shape}


@pytest.mark.parametrize("label", ATTACKS)
def test_planted_payload_uploads_are_refused_and_never_run(
    admin: httpx.Client, tmp_path: Path, label: str
) -> None:
    marker = tmp_path / "the-payload-ran"
    fmt, data, message = _framing_attacks(marker)[label]
    response = register(admin, _manifest("planted", fmt, [6]), data)
    body = problem(response, 422, message)
    assert body["field"] == "file"
    assert not marker.exists()
    assert admin.get("/models/planted").status_code == 404
    _quadratic_still_serves(admin)


def test_planted_payloads_in_the_models_folder_never_run(tmp_path: Path) -> None:
    models = tmp_path / "models"
    good = models / "quadratic4"
    good.mkdir(parents=True)
    for name in ("manifest.json", "weights.safetensors"):
        (good / name).write_bytes((BUNDLED_MODELS_DIR / "quadratic4" / name).read_bytes())
    marker = tmp_path / "the-payload-ran"
    for index, (fmt, data, _) in enumerate(_framing_attacks(marker).values()):
        folder = models / f"planted{index}"
        folder.mkdir()
        file = "model.pt" if fmt == "torchscript" else "model.pt2"
        (folder / file).write_bytes(data)
        (folder / "manifest.json").write_text(json.dumps(_manifest(folder.name, fmt, [6])))
    with (
        running_server(HESSIAN_MODELS_DIR=str(models)) as url,
        httpx.Client(base_url=url, timeout=60.0, trust_env=False) as http,
    ):
        listed = {m["name"]: m for m in http.get("/models").json()["models"]}
        planted = {name: m for name, m in listed.items() if name.startswith("planted")}
        assert len(planted) == len(ATTACKS)
        for name, model in planted.items():
            assert model["ready"] is False, name
            assert "refused" in model["error"], (name, model["error"])
        _quadratic_still_serves(http)
    assert not marker.exists()


class Forever(nn.Module):
    """A forward pass that never returns: the sum of a zero input only grows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        while bool(y.sum() > -1.0):
            y = y + 1.0
        return y


class Hog(nn.Module):
    """A forward pass that allocates 3 GiB, past the checking process's 2 GiB."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = torch.ones(805306368)
        return x + big[0]


def test_a_first_forward_that_never_ends_is_refused_in_time(admin: httpx.Client) -> None:
    """The child is killed at the timeout; /health/live answers all along."""
    slowest_probe = 0.0
    done = threading.Event()

    def probe_liveness() -> None:
        nonlocal slowest_probe
        while not done.is_set():
            start = time.perf_counter()
            assert admin.get("/health/live").status_code == 200
            slowest_probe = max(slowest_probe, time.perf_counter() - start)
            time.sleep(0.05)

    prober = threading.Thread(target=probe_liveness)
    prober.start()
    start = time.perf_counter()
    try:
        response = register(
            admin, _manifest("forever", "torchscript", [4]), torchscript_bytes(Forever())
        )
    finally:
        done.set()
        prober.join()
    elapsed = time.perf_counter() - start
    problem(response, 422, f"took over {CHECK_TIMEOUT_S} s")
    assert CHECK_TIMEOUT_S <= elapsed < CHECK_TIMEOUT_S + 15
    assert slowest_probe < 0.5
    assert admin.get("/models/forever", headers=AUTH).status_code == 404
    _quadratic_still_serves(admin)


def test_a_first_forward_past_the_memory_limit_is_refused(admin: httpx.Client) -> None:
    response = register(admin, _manifest("hog", "torchscript", [4]), torchscript_bytes(Hog()))
    problem(response, 422, f"limit of {CHECK_MEMORY_BYTES} bytes of memory")
    _quadratic_still_serves(admin)
