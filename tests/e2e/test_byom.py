"""Bring your own model, end to end: a real uvicorn server with HESSIAN_ADMIN_TOKEN set.

Models the service has never seen (their classes exist only in ``tests/byom.py``) are
uploaded through ``POST /models`` as TorchScript and torch.export archives; their
Hessians over HTTP are compared with ``torch.func.hessian`` on the original module.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save
from torch import nn

from hessian_service.config import BUNDLED_MODELS_DIR
from hessian_service.engine import Algorithm, compute_hessian
from tests.byom import (
    Branchy,
    Float32Only,
    ReluMLP,
    SoftMLP,
    TinyConv,
    export_bytes,
    raw_pickle,
    seeded,
    torch_save_zip,
    torchscript_bytes,
)
from tests.e2e.conftest import running_server
from tests.e2e.test_server import decode, digit, problem, tensor

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_UPLOAD_BYTES = 3_000_000


@pytest.fixture(scope="module")
def upload_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("uploads")


@pytest.fixture(scope="module")
def admin(upload_dir: Path) -> Iterator[httpx.Client]:
    """A client of a server with the management API on, storing uploads in upload_dir."""
    with (
        running_server(
            HESSIAN_ADMIN_TOKEN=TOKEN,
            HESSIAN_UPLOAD_DIR=str(upload_dir),
            HESSIAN_MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES),
        ) as url,
        httpx.Client(base_url=url, timeout=120.0, trust_env=False) as http,
    ):
        yield http


def register(
    http: httpx.Client, manifest: dict[str, Any], data: bytes, **params: str
) -> httpx.Response:
    return http.post(
        "/models",
        headers=AUTH,
        params=params,
        data={"manifest": json.dumps(manifest)},
        files={"file": ("upload.bin", data, "application/octet-stream")},
    )


def hessian_over_http(
    http: httpx.Client, model: str, x: torch.Tensor, index: int
) -> tuple[np.ndarray, dict[str, Any]]:
    body = {
        "model": model,
        "inputs": tensor(list(x.shape), base64.b64encode(x.numpy().tobytes()).decode()),
        "output_index": index,
        "encoding": "base64",
    }
    response = http.post("/hessian", json=body)
    assert response.status_code == 200, response.text[:2000]
    result = response.json()
    return decode(result["outputs"][0]), result


def local_hessians(module: nn.Module, x: torch.Tensor, index: int) -> np.ndarray:
    """``torch.func.hessian`` of the original module, per sample, as ``[B, n, n]``."""
    n = x[0].numel()

    def scalar(flat: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = module(flat.reshape(1, *x.shape[1:])).reshape(-1)[index]
        return out

    return (
        torch.stack([torch.func.hessian(scalar)(s.reshape(-1)).reshape(n, n) for s in x])
        .detach()
        .numpy()
    )


def in_process_method(module: nn.Module, x: torch.Tensor, index: int) -> Algorithm:
    """What ``engine.compute_hessian`` runs for the original module in process."""
    return compute_hessian(module, x, output_index=index).method


def assert_matches(ours: np.ndarray, reference: np.ndarray) -> None:
    """1e-6 relative (float32): in norm, and entry by entry against the largest entry."""
    assert ours.shape == reference.shape
    scale = float(np.abs(reference).max())
    assert scale > 0
    relative = float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))
    assert relative <= 1e-6, relative
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6 * scale)


UPLOADS = {
    # name: (architecture, format, per-sample shape, archive builder)
    "script_softmlp": (
        SoftMLP,
        "torchscript",
        [6],
        lambda m: torchscript_bytes(m),
    ),
    "export_tinyconv": (
        TinyConv,
        "export",
        [1, 6, 6],
        lambda m: export_bytes(m, torch.randn(2, 1, 6, 6), dynamic_batch=True),
    ),
    "export_softmlp_batch1": (
        SoftMLP,
        "export",
        [6],
        lambda m: export_bytes(m, torch.randn(1, 6), dynamic_batch=False),
    ),
}


@pytest.mark.parametrize("name", list(UPLOADS))
def test_uploaded_models_give_torch_func_hessians(admin: httpx.Client, name: str) -> None:
    architecture, fmt, shape, build = UPLOADS[name]
    original = seeded(architecture(), seed=3)
    manifest = {"name": name, "version": "1", "format": fmt, "input_shape": shape}
    response = register(admin, manifest, build(original))
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"/models/{name}@1"
    info = response.json()
    report = info["capabilities"]
    assert (info["format"], info["source"], info["latest"]) == (fmt, "upload", True)
    assert report["vmap"] is True
    assert report["batch"] == ("one" if name.endswith("batch1") else "any")
    assert report["parameters"] == sum(p.numel() for p in original.parameters())
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(7))
    # Served with method auto, on the path the original module takes in process.
    assert report["hessian_method"] == "auto", report["notes"]
    assert report["engine_path"] == in_process_method(original, x, 0).path, report["notes"]
    for index in (0, 2):
        ours, body = hessian_over_http(admin, name, x, index)
        assert body["model_version"] == "1"
        assert body["metadata"]["method"] == in_process_method(original, x, index)
        assert_matches(ours, local_hessians(original, x, index))
    assert admin.delete(f"/models/{name}", headers=AUTH).status_code == 200


def test_a_model_vmap_cannot_run_is_served_by_the_row_loop(admin: httpx.Client) -> None:
    original = seeded(Branchy(), seed=4)
    manifest = {"name": "branchy", "version": "1", "format": "torchscript", "input_shape": [4]}
    response = register(admin, manifest, torchscript_bytes(original))
    assert response.status_code == 201, response.text
    assert response.json()["capabilities"]["engine_path"] == "autograd"
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(8))
    ours, body = hessian_over_http(admin, "branchy", x, 1)
    assert body["metadata"]["method"] == "autograd:row-loop"
    assert_matches(ours, local_hessians(original, x, 1))
    assert admin.delete("/models/branchy", headers=AUTH).status_code == 200


def test_an_uploaded_relu_net_is_reported_zero_almost_everywhere(admin: httpx.Client) -> None:
    relu = seeded(ReluMLP(), seed=13)
    archive = export_bytes(relu, torch.randn(2, 5), dynamic_batch=True)
    manifest = {"name": "relu_upload", "version": "1", "format": "export", "input_shape": [5]}
    report = register(admin, manifest, archive).json()["capabilities"]
    assert (report["curvature"], report["hessian_zero"]) == (
        "piecewise_linear",
        "almost_everywhere",
    )
    body = admin.post(
        "/hessian",
        json={"model": "relu_upload", "inputs": tensor([5], [0.3] * 5), "output_index": 0},
    ).json()
    assert not decode(body["outputs"][0]).any()
    assert any("zero almost everywhere" in note for note in body["metadata"]["notes"])
    assert admin.delete("/models/relu_upload", headers=AUTH).status_code == 200


def test_a_precision_the_model_cannot_run_is_422(admin: httpx.Client) -> None:
    manifest = {"name": "f32", "version": "1", "format": "torchscript", "input_shape": [4]}
    response = register(admin, manifest, torchscript_bytes(Float32Only()))
    assert response.json()["capabilities"]["precisions"] == ["float32"]
    request = {"model": "f32", "inputs": tensor([4], [0.1] * 4), "output_index": 1}
    assert admin.post("/hessian", json=request).status_code == 200
    body = problem(admin.post("/hessian", json={**request, "precision": "float64"}), 422)
    assert body["field"] == "precision"
    assert admin.delete("/models/f32", headers=AUTH).status_code == 200


# --- the token ----------------------------------------------------------------------------


def _minimal_upload(http: httpx.Client, headers: dict[str, str]) -> httpx.Response:
    manifest = {"name": "nope", "version": "1", "format": "torchscript", "input_shape": [6]}
    return http.post(
        "/models",
        headers=headers,
        data={"manifest": json.dumps(manifest)},
        files={"file": ("m.pt", torchscript_bytes(seeded(SoftMLP())))},
    )


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"}],
    ids=["missing", "wrong", "not-bearer"],
)
def test_management_without_the_token_is_401(admin: httpx.Client, headers: dict[str, str]) -> None:
    for response in (
        _minimal_upload(admin, headers),
        admin.delete("/models/quadratic4", headers=headers),
    ):
        problem(response, 401, "Authorization")
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert admin.get("/models/quadratic4").status_code == 200  # not deleted
    assert admin.get("/models/nope").status_code == 404  # not registered


def test_management_is_403_when_no_token_is_configured(client: httpx.Client) -> None:
    problem(_minimal_upload(client, AUTH), 403, "HESSIAN_ADMIN_TOKEN")
    problem(client.delete("/models/quadratic4", headers=AUTH), 403, "HESSIAN_ADMIN_TOKEN")
    assert client.get("/models/quadratic4").status_code == 200


# --- refused uploads ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["zoo", "torchscript", "export"])
@pytest.mark.parametrize("payload", [raw_pickle, torch_save_zip], ids=["pickle", "torch.save"])
def test_pickle_uploads_are_refused_and_never_run(
    admin: httpx.Client, upload_dir: Path, tmp_path: Path, fmt: str, payload: Any
) -> None:
    marker = tmp_path / "the-payload-ran"
    manifest: dict[str, Any] = {"name": "evil", "version": "1", "format": fmt}
    manifest["input_shape"] = [4]
    if fmt == "zoo":
        manifest["architecture"] = "linear4"
    response = register(admin, manifest, payload(marker))
    problem(response, 422, "refused")
    assert response.json()["field"] == "file"
    assert not marker.exists()
    assert admin.get("/models/evil").status_code == 404
    assert "evil" not in {m["name"] for m in admin.get("/models").json()["models"]}
    assert not [p for p in upload_dir.iterdir() if p.name.startswith("evil")]


def test_uploads_over_the_size_limit_are_413(admin: httpx.Client) -> None:
    manifest = {"name": "big", "version": "1", "format": "torchscript", "input_shape": [4]}
    response = register(admin, manifest, b"\0" * (MAX_UPLOAD_BYTES + 1))
    problem(response, 413, str(MAX_UPLOAD_BYTES))
    assert admin.get("/models/big").status_code == 404


@pytest.mark.parametrize(
    ("manifest", "field"),
    [
        ({"name": "../up", "version": "1", "format": "export", "input_shape": [2]}, "name"),
        ({"name": "a", "version": "1", "format": "onnx", "input_shape": [2]}, "format"),
        ({"name": "a", "version": "1", "format": "zoo", "input_shape": [2]}, "manifest"),
        (
            {"name": "a", "version": "1", "format": "export", "input_shape": [2], "file": "x"},
            "manifest.file",
        ),
    ],
    ids=["traversal", "format", "zoo-without-architecture", "file"],
)
def test_bad_manifests_are_422(
    admin: httpx.Client, upload_dir: Path, manifest: dict[str, Any], field: str
) -> None:
    response = register(admin, manifest, b"PK\x03\x04")
    body = problem(response, 422)
    assert field in body["field"]
    assert not (upload_dir.parent / "up").exists()


def test_missing_or_broken_parts_are_422(admin: httpx.Client) -> None:
    body = problem(admin.post("/models", headers=AUTH, data={"manifest": "{not json"}), 422)
    assert body["field"] == "manifest"
    manifest = {"name": "a", "version": "1", "format": "export", "input_shape": [2]}
    no_file = admin.post("/models", headers=AUTH, data={"manifest": json.dumps(manifest)})
    assert problem(no_file, 422, "file")["field"] == "file"
    as_json = admin.post("/models", headers=AUTH, json=manifest)
    assert problem(as_json, 422, "manifest")["field"] == "manifest"


def test_a_bundled_name_and_version_is_not_overwritten_by_accident(admin: httpx.Client) -> None:
    weights = save({"weight": torch.full((1, 4), 9.0), "bias": torch.zeros(1)})
    manifest = {"name": "linear4", "version": "1", "architecture": "linear4", "input_shape": [4]}
    problem(register(admin, manifest, weights), 409, "already loaded")
    jacobian = admin.post("/jacobian", json={"model": "linear4", "inputs": tensor([4], [1] * 4)})
    assert decode(jacobian.json()["outputs"][0]).tolist() == [[0.5] * 4]


# --- versions, live registration and removal ----------------------------------------------


def _linear_weights(value: float) -> bytes:
    return save({"weight": torch.full((1, 4), value), "bias": torch.zeros(1)})


def _jacobian(http: httpx.Client, model: str) -> tuple[list[float], str]:
    response = http.post("/jacobian", json={"model": model, "inputs": tensor([4], [1] * 4)})
    assert response.status_code == 200, response.text
    body = response.json()
    return decode(body["outputs"][0]).ravel().tolist(), body["model_version"]


def test_versions_side_by_side(admin: httpx.Client) -> None:
    for version, value in (("2", 2.0), ("10", 10.0), ("9", 9.0)):
        manifest = {
            "name": "lin",
            "version": version,
            "format": "zoo",
            "architecture": "linear4",
            "input_shape": [4],
        }
        assert register(admin, manifest, _linear_weights(value)).status_code == 201
    assert _jacobian(admin, "lin") == ([10.0] * 4, "10")  # latest: 10 > 9 > 2
    assert _jacobian(admin, "lin@9") == ([9.0] * 4, "9")
    listed = [m for m in admin.get("/models").json()["models"] if m["name"] == "lin"]
    assert [(m["version"], m["latest"]) for m in listed] == [
        ("2", False),
        ("9", False),
        ("10", True),
    ]
    assert admin.delete("/models/lin@10", headers=AUTH).status_code == 200
    assert _jacobian(admin, "lin") == ([9.0] * 4, "9")
    removed = admin.delete("/models/lin", headers=AUTH).json()["models"]
    assert [m["version"] for m in removed] == ["2", "9"]
    problem(admin.get("/models/lin"), 404, "lin")


def test_register_query_delete_under_concurrent_traffic(admin: httpx.Client) -> None:
    statuses: list[int] = []
    wrong: list[str] = []
    stop = threading.Event()
    expected = np.diag([0.0, 0.0, 4.0, 0.0])  # quadratic4, output 2: 2 * x2^2

    def traffic() -> None:
        with httpx.Client(base_url=str(admin.base_url), timeout=60, trust_env=False) as http:
            while not stop.is_set() or len(statuses) < 20:
                body = {"model": "quadratic4", "inputs": tensor([4], [1.0] * 4)}
                try:
                    response = http.post("/hessian", json={**body, "output_index": 2})
                except httpx.HTTPError as error:  # counted as a failed request
                    wrong.append(repr(error))
                    statuses.append(0)
                    continue
                statuses.append(response.status_code)
                if response.status_code == 200:
                    got = decode(response.json()["outputs"][0])
                    if not np.array_equal(got, expected):
                        wrong.append(str(got))

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        original = seeded(SoftMLP(), seed=5)
        manifest = {"name": "live", "version": "1", "format": "torchscript", "input_shape": [6]}
        assert register(admin, manifest, torchscript_bytes(original)).status_code == 201
        report = admin.get("/models/live").json()["capabilities"]
        x = torch.randn(2, 6, generator=torch.Generator().manual_seed(9))
        assert report["engine_path"] == in_process_method(original, x, 0).path, report["notes"]
        ours, _ = hessian_over_http(admin, "live", x, 0)
        assert_matches(ours, local_hessians(original, x, 0))
        assert admin.delete("/models/live", headers=AUTH).status_code == 200
        problem(admin.get("/models/live"), 404, "live")
        problem(admin.post("/hessian", json={"model": "live", "inputs": tensor([6], [0] * 6)}), 404)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert not wrong
    assert len(statuses) >= 20
    assert set(statuses) == {200}, statuses


def test_a_running_request_finishes_on_the_model_it_started_with(admin: httpx.Client) -> None:
    """Delete a model while a slow request (the autograd row loop) is computing on it."""
    original = seeded(Branchy(inputs=256), seed=6)
    manifest = {"name": "slow", "version": "1", "format": "torchscript", "input_shape": [256]}
    assert register(admin, manifest, torchscript_bytes(original)).status_code == 201
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(10))
    outcome: dict[str, Any] = {}

    def slow_request() -> None:
        outcome["result"] = hessian_over_http(admin, "slow", x, 0)[0]
        outcome["finished"] = time.monotonic()

    worker = threading.Thread(target=slow_request)
    worker.start()
    time.sleep(0.5)  # the request has resolved its model and is computing
    assert admin.delete("/models/slow", headers=AUTH).status_code == 200
    deleted = time.monotonic()
    worker.join(timeout=120)
    assert outcome["finished"] > deleted, "the request ended before the delete: too fast"
    assert_matches(outcome["result"], local_hessians(original, x, 0))
    problem(admin.get("/models/slow"), 404)


def test_uploads_persist_across_restarts(
    admin: httpx.Client, upload_dir: Path, tmp_path: Path
) -> None:
    original = seeded(TinyConv(), seed=11)
    manifest = {"name": "kept", "version": "3", "format": "export", "input_shape": [1, 6, 6]}
    archive = export_bytes(original, torch.randn(2, 1, 6, 6), dynamic_batch=True)
    assert register(admin, manifest, archive).status_code == 201
    assert (upload_dir / "kept@3" / "model.pt2").is_file()
    x = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(12))
    with (
        # No bundled models in the restarted server: it starts faster.
        running_server(HESSIAN_UPLOAD_DIR=str(upload_dir), HESSIAN_MODELS_DIR=str(tmp_path)) as url,
        httpx.Client(base_url=url, timeout=120.0, trust_env=False) as restarted,
    ):
        info = restarted.get("/models/kept@3").json()
        path = in_process_method(original, x, 3).path
        assert (info["source"], info["capabilities"]["engine_path"]) == ("upload", path)
        ours, _ = hessian_over_http(restarted, "kept", x, 3)
        assert_matches(ours, local_hessians(original, x, 3))
    assert admin.delete("/models/kept", headers=AUTH).status_code == 200
    assert not (upload_dir / "kept@3").exists()


# --- the capability report of the bundled models ------------------------------------------


def test_capability_reports_of_bundled_models(client: httpx.Client) -> None:
    relu = client.get("/models/mlp_relu").json()
    assert relu["capabilities"]["hessian_zero"] == "almost_everywhere"
    assert relu["capabilities"]["curvature"] == "piecewise_linear"
    cnn = client.get("/models/digits_cnn").json()["capabilities"]
    assert (cnn["engine_path"], cnn["hessian_method"]) == ("structured", "auto")
    assert (cnn["vmap"], cnn["forward_mode"], cnn["random_ops"]) == (True, True, False)
    assert cnn["parameters"] == 8 * 9 + 8 + 16 * 8 * 9 + 16 + 16 * 14 * 14 * 10 + 10
    assert cnn["parameter_bytes"] == 4 * cnn["parameters"]
    body = {"model": "digits_cnn", "inputs": tensor([1, 28, 28], digit()), "output_index": 2}
    hessian = client.post("/hessian", json=body).json()
    assert hessian["metadata"]["method"] == "structured"  # the report's path is the one used
    assert client.get("/models/linear4").json()["capabilities"]["hessian_zero"] == "everywhere"


def test_a_model_folder_that_fails_is_listed_and_the_others_load(tmp_path: Path) -> None:
    """A models dir with one good folder and two bad ones (a pickle posing as TorchScript,
    a manifest naming an unknown architecture): the server starts, serves the good one,
    lists the bad ones with their errors, and the pickle never ran."""
    models = tmp_path / "models"
    good = models / "quadratic4"
    good.mkdir(parents=True)
    bundled = BUNDLED_MODELS_DIR / "quadratic4"
    for name in ("manifest.json", "weights.safetensors"):
        (good / name).write_bytes((bundled / name).read_bytes())
    marker = tmp_path / "the-payload-ran"
    evil = models / "evil"
    evil.mkdir()
    (evil / "model.pt").write_bytes(torch_save_zip(marker))
    manifest = {"name": "evil", "version": "1", "format": "torchscript", "input_shape": [4]}
    (evil / "manifest.json").write_text(json.dumps(manifest))
    unknown = models / "unknown"
    unknown.mkdir()
    manifest = {"name": "unknown", "version": "1", "architecture": "nope", "input_shape": [4]}
    (unknown / "manifest.json").write_text(json.dumps(manifest))
    (unknown / "weights.safetensors").write_bytes(save({"weight": torch.zeros(1)}))
    with (
        running_server(HESSIAN_MODELS_DIR=str(models)) as url,
        httpx.Client(base_url=url, timeout=60.0, trust_env=False) as http,
    ):
        listed = {m["name"]: m for m in http.get("/models").json()["models"]}
        assert listed["quadratic4"]["ready"] is True
        assert listed["evil"]["ready"] is False
        assert "refused" in listed["evil"]["error"]
        assert listed["unknown"]["ready"] is False
        assert "unknown architecture 'nope'" in listed["unknown"]["error"]
        problem(http.post("/hessian", json={"model": "evil", "inputs": tensor([4], [0] * 4)}), 404)
        request = {"model": "quadratic4", "inputs": tensor([4], [1] * 4), "output_index": 3}
        assert decode(http.post("/hessian", json=request).json()["outputs"][0])[3, 3] == 6.0
    assert not marker.exists()
