"""The bad-input catalogue (``tests/catalogue.py``), in process: ~340 rows, each a 4xx
naming its field, and a correct answer to a normal request after them.

The derivative, /v2 and model-path rows run on the session's app (default settings, the
bundled models). The management rows run on a second app with an admin token, and the
size rows on one with small body limits: both on a models folder of ``quadratic4`` only.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from hessian_service.config import BUNDLED_MODELS_DIR, Settings
from hessian_service.main import create_app
from tests import catalogue
from tests.catalogue import ADMIN_TOKEN, QUAD, Row, check
from tests.device import TEST_DEVICE

SMALL_BODY = 200_000
SMALL_JSON_NUMBERS = 50_000
ROWS = catalogue.derivative_rows() + catalogue.v2_rows() + catalogue.model_path_rows()
ADMIN_ROWS = catalogue.admin_rows()
SIZE_ROWS = catalogue.size_rows(SMALL_BODY, SMALL_JSON_NUMBERS)


def quadratic4_hessians(x: list[float]) -> np.ndarray:
    """Closed form: output i is i * x_i^2, so its Hessian is 2 i at (i, i), else zero."""
    return np.stack([np.diag(np.eye(4)[i] * 2 * i) for i in range(len(x))])


def assert_serves_correctly(client: Any) -> None:
    """A normal request after the catalogue: the closed-form Hessians and Jacobian."""
    x = [1.5, -2.0, 0.25, 3.0]
    request = {
        "model": QUAD,
        "inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": x}],
        "output_index": [0, 1, 2, 3],
        "precision": "float64",
    }
    response = client.post("/hessian", json=request)
    assert response.status_code == 200, response.text
    (hessian,) = [o for o in response.json()["outputs"] if o["name"] == "hessian"]
    got = np.asarray(hessian["data"]).reshape(hessian["shape"])
    assert np.array_equal(got, quadratic4_hessians(x))
    jacobian = client.post("/jacobian", json={**request, "output_index": None})
    assert jacobian.status_code == 200, jacobian.text
    rows = np.asarray(jacobian.json()["outputs"][0]["data"]).reshape(4, 4)
    assert np.array_equal(rows, np.diag(2 * np.arange(4) * np.asarray(x)))


@pytest.fixture(scope="module")
def small_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("catalogue") / "models"
    root.mkdir()
    shutil.copytree(BUNDLED_MODELS_DIR / QUAD, root / QUAD)
    return root


@pytest.fixture(scope="module")
def admin_client(small_models: Path) -> Iterator[TestClient]:
    settings = Settings(
        device=TEST_DEVICE,
        models_dir=small_models,
        upload_dir=small_models.parent / "uploads",
        admin_token=ADMIN_TOKEN,  # type: ignore[arg-type]
        max_body_bytes=SMALL_BODY,
        max_json_number_bytes=SMALL_JSON_NUMBERS,
        access_log=False,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def test_the_catalogue_is_large_and_its_ids_unique() -> None:
    ids = [row.id for row in ROWS + ADMIN_ROWS + SIZE_ROWS]
    assert len(ids) == len(set(ids)) and len(ids) >= 300
    fields = {row.field for row in ROWS}
    for name in ("model", "inputs", "inputs[0].shape", "inputs[0].datatype", "inputs[0].data"):
        assert name in fields  # every field of the request is in it
    for name in ("output_index", "objective", "encoding", "layout", "precision", "body"):
        assert name in fields


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input(client: TestClient, row: Row) -> None:
    check(client, row)


@pytest.mark.parametrize("row", ADMIN_ROWS + SIZE_ROWS, ids=[r.id for r in ADMIN_ROWS + SIZE_ROWS])
def test_bad_management_and_size_input(admin_client: TestClient, row: Row) -> None:
    check(admin_client, row)


def test_after_the_catalogue_the_answers_are_still_right(
    client: TestClient, admin_client: TestClient
) -> None:
    assert_serves_correctly(client)
    assert_serves_correctly(admin_client)
    listed = {m["name"] for m in admin_client.get("/models").json()["models"]}
    assert listed == {QUAD}  # no refused upload was registered, none was deleted
