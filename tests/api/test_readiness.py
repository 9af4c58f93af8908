"""Readiness means models can serve: an empty or all-broken models folder is not ready.

Each case is a real app (in process) on its own models folder, built from the bundled
``quadratic4`` and from broken copies of it (a manifest that is not JSON, weights that
are not safetensors). ``/health/live`` stays 200 throughout: the process is up.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hessian_service.config import BUNDLED_MODELS_DIR, Settings
from hessian_service.main import create_app
from tests.device import TEST_DEVICE

PROBLEM = "application/problem+json"


def good(root: Path, name: str = "quadratic4") -> None:
    shutil.copytree(BUNDLED_MODELS_DIR / "quadratic4", root / name)


def corrupt_manifest(root: Path, name: str = "bad_manifest") -> None:
    good(root, name)
    (root / name / "manifest.json").write_text('{"name": "bad_manifest", "version": ')


def corrupt_weights(root: Path, name: str = "bad_weights") -> None:
    good(root, name)
    (root / name / "manifest.json").write_text(
        (root / name / "manifest.json").read_text().replace('"quadratic4"', f'"{name}"')
    )
    (root / name / "weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not}")


@contextmanager
def app_on(root: Path, requires: str = "any") -> Iterator[TestClient]:
    settings = Settings(
        device=TEST_DEVICE,
        models_dir=root,
        ready_requires=requires,  # type: ignore[arg-type]
        upload_dir=root.parent / "uploads",
        access_log=False,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def not_ready(client: TestClient, *failed: str) -> dict[str, Any]:
    response = client.get("/health/ready")
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == 503 and body["title"] == "Not ready" and "field" in body
    assert sorted(entry["name"] for entry in body["failed"]) == sorted(failed)
    assert all(entry["error"] for entry in body["failed"])
    for name in failed:
        assert name in body["detail"]
    v2 = client.get("/v2/health/ready")
    assert v2.status_code == 503 and v2.headers["content-type"] == "application/json"
    assert set(v2.json()) == {"error"} and v2.json()["error"] == body["detail"]
    live = client.get("/health/live")
    assert live.status_code == 200 and live.json()["status"] == "ok"
    assert client.get("/v2/health/live").status_code == 200
    return body


def ready(client: TestClient, loaded: int, failed: int) -> None:
    response = client.get("/health/ready")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ok", "models_loaded": loaded, "models_failed": failed}
    assert client.get("/v2/health/ready").status_code == 200


@pytest.mark.parametrize("requires", ["any", "all"])
def test_an_empty_models_folder_is_not_ready(tmp_path: Path, requires: str) -> None:
    (tmp_path / "models").mkdir()
    with app_on(tmp_path / "models", requires) as client:
        body = not_ready(client)
        assert body["models_loaded"] == 0 and "no model can serve" in body["detail"]


@pytest.mark.parametrize("requires", ["any", "all"])
def test_only_broken_model_folders_is_not_ready_and_says_why(tmp_path: Path, requires: str) -> None:
    root = tmp_path / "models"
    root.mkdir()
    corrupt_manifest(root)
    corrupt_weights(root)
    with app_on(root, requires) as client:
        body = not_ready(client, "bad_manifest", "bad_weights")
        assert body["models_loaded"] == 0 and body["models_failed"] == 2
        errors = {entry["name"]: entry["error"] for entry in body["failed"]}
        assert "ValidationError" in errors["bad_manifest"]  # the manifest is not JSON
        assert "safetensors" in errors["bad_weights"]  # the weights are not safetensors


def test_one_good_and_one_broken_is_ready_when_any_model_will_do(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    good(root)
    corrupt_weights(root)
    with app_on(root, "any") as client:
        ready(client, loaded=1, failed=1)
        response = client.post(
            "/hessian",
            json={
                "model": "quadratic4",
                "inputs": [{"name": "x", "shape": [4], "data": [1.0, 2.0, 3.0, 4.0]}],
                "output_index": 3,
            },
        )
        assert response.status_code == 200
        assert response.json()["outputs"][0]["data"][-1] == 6.0  # d2(3 x3^2)/dx3^2


def test_one_good_and_one_broken_is_not_ready_when_all_are_required(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    good(root)
    corrupt_manifest(root)
    with app_on(root, "all") as client:
        body = not_ready(client, "bad_manifest")
        assert body["models_loaded"] == 1 and "HESSIAN_READY_REQUIRES=all" in body["detail"]


def test_all_good_is_ready_when_all_are_required(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    good(root)
    with app_on(root, "all") as client:
        ready(client, loaded=1, failed=0)


def test_the_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HESSIAN_READY_REQUIRES", "all")
    assert Settings().ready_requires == "all"
    monkeypatch.setenv("HESSIAN_READY_REQUIRES", "some")
    with pytest.raises(ValueError, match="ready_requires"):
        Settings()
