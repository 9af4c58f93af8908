"""Uploaded models take the engine path the same module takes in process (issue 19).

Architectures of the seeded table (``bench/architectures.py``) are served by one real
uvicorn server as TorchScript (``torch.jit.trace``) and as ``torch.export`` archives with a
dynamic batch dimension, in float64. For each, one float64 ``/hessian`` request must report
in ``metadata.method`` what ``engine.compute_hessian`` reports for the original Python
module on the same input, and its values must equal that in-process result (1e-12
relative: the same algorithm on the same graph, up to rounding) and ``torch.func.hessian``
of the original module, an independent reference, to 1e-10 relative:
``max|ours - ref| <= tol * max|ref|``.

The tutorial CNN, which flattens with ``x.view(x.size(0), -1)`` (an ``aten::sym_size`` in
the exported graph), goes through ``POST /models`` in both formats, child-process check
included; before the probe was fixed its export took the autograd row loop, and every
upload was served "generic". The rest of the table is loaded from ``HESSIAN_MODELS_DIR``
at start-up: the same loaders, probe and serving as an upload, without the upload's
child-process check (about 2 s each, 10 s on a busy machine), which keeps this file
within a minute. Known differences are xfails (``KNOWN``) that fail once the methods
agree, so that a fix shows up until its entry is removed.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.architectures import Architecture, by_name
from hessian_service.engine import Algorithm, Objective, ObjectiveKind, compute_hessian
from hessian_service.repository.loaders import DEFAULT_FILES
from tests.byom import export_bytes
from tests.e2e.conftest import ROOT, running_server
from tests.e2e.test_server import decode, tensor

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]

TOKEN = "uploaded-paths-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
AGREES_IN_PROCESS = 1e-12
AGREES_WITH_TORCH_FUNC = 1e-10
FORMATS = ("torchscript", "export")

# Sent through POST /models in both formats.
UPLOADED = ("tutorial_cnn",)
# Loaded from the models folder, in both formats: an nn.Sequential (structured in process),
# a residual and a normalised MLP, attention, a recurrent head.
FROM_FOLDER = (
    "sequential_subclass",
    "residual_mlp",
    "layernorm_gelu_mlp",
    "multihead_attention",
    "gru_head",
)

_TRACED_ATTENTION = (
    "a trace in eval mode records torch's fused attention fast path "
    "(aten::_native_multi_head_attention), which no graph rule knows: the generic path "
    "serves it (traced with the fast path off, its head_dim arithmetic becomes tensor ops "
    "read back with int(), which make_fx cannot capture)"
)
# (architecture, format) -> why its served method differs from the in-process one today.
KNOWN: dict[tuple[str, str], str] = {
    ("multihead_attention", "torchscript"): _TRACED_ATTENTION,
}


@dataclass(frozen=True)
class Upload:
    """One architecture in one archive format, and how the server gets it."""

    arch: Architecture
    fmt: str
    posted: bool  # through POST /models (else from the models folder at start-up)

    @property
    def name(self) -> str:
        suffix = "ts" if self.fmt == "torchscript" else "pt2"
        return f"{self.arch.name}.{'posted.' if self.posted else ''}{suffix}"

    def original(self) -> nn.Module:
        """The seeded module, in float64 (built anew: nothing the engine cached on it)."""
        return self.arch.build().double()

    def archive(self) -> bytes:
        """The archive a user would make: traced, or exported with a dynamic batch."""
        module = self.original()
        generator = torch.Generator().manual_seed(0)
        example = torch.randn(2, *self.arch.sample_shape, dtype=torch.float64, generator=generator)
        if self.fmt == "export":
            return export_bytes(module, example, dynamic_batch=True)
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.trace(module, example), buffer)
        return buffer.getvalue()

    def manifest(self) -> dict[str, Any]:
        shape = list(self.arch.sample_shape)
        return {
            "name": self.name,
            "version": "1",
            "format": self.fmt,
            "input_shape": shape,
            "dtype": "float64",
        }


UPLOADS = [
    Upload(by_name(name), fmt, posted=name in UPLOADED)
    for name in UPLOADED + FROM_FOLDER
    for fmt in FORMATS
]


def _in_folder(models: Path, upload: Upload) -> None:
    folder = models / upload.name
    folder.mkdir()
    (folder / DEFAULT_FILES[upload.fmt]).write_bytes(upload.archive())
    (folder / "manifest.json").write_text(json.dumps(upload.manifest()))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """One server, the management API on, its models folder holding the FROM_FOLDER
    archives (no bundled models)."""
    models = tmp_path_factory.mktemp("models")
    for upload in UPLOADS:
        if not upload.posted:
            _in_folder(models, upload)
    with (
        running_server(
            HESSIAN_ADMIN_TOKEN=TOKEN,
            HESSIAN_MODELS_DIR=str(models),
            HESSIAN_UPLOAD_DIR=str(tmp_path_factory.mktemp("uploads")),
        ) as url,
        httpx.Client(base_url=url, timeout=120.0, trust_env=False) as http,
    ):
        yield http


def _post(http: httpx.Client, upload: Upload, archive: bytes) -> httpx.Response:
    return http.post(
        "/models",
        headers=AUTH,
        data={"manifest": json.dumps(upload.manifest())},
        files={"file": ("upload.bin", archive, "application/octet-stream")},
    )


@pytest.fixture(scope="module")
def registered(server: httpx.Client) -> dict[str, httpx.Response]:
    """Each model's description: the POST /models answer (201) of a posted one, the
    GET /models/{name} answer (200) of one from the folder."""
    # Built here, one after the other: torch.export and torch.jit.trace running at once in
    # two threads see each other's backend flags (the trace's own check then fails).
    posted = {upload: upload.archive() for upload in UPLOADS if upload.posted}
    with ThreadPoolExecutor(len(posted)) as pool:  # their child-process checks overlap
        sent = pool.map(lambda item: _post(server, *item), posted.items())
        answers = dict(zip(posted, sent, strict=True))
    return {
        upload.name: answers[upload] if upload.posted else server.get(f"/models/{upload.name}")
        for upload in UPLOADS
    }


def _objective(arch: Architecture) -> Objective | None:
    if arch.objective is None:
        return None
    return Objective(ObjectiveKind.CROSS_ENTROPY, target=torch.tensor(arch.target))


def _scalar(arch: Architecture, module: nn.Module) -> Any:
    """One sample's flat input -> the scalar the table differentiates."""

    def scalar(flat: torch.Tensor) -> torch.Tensor:
        out = module(flat.reshape(1, *arch.sample_shape)).reshape(-1)
        if arch.objective is None:
            assert arch.output_index is not None
            return out[arch.output_index]
        return -torch.log_softmax(out, dim=0)[arch.target]

    return scalar


def _torch_func_reference(arch: Architecture, module: nn.Module, x: torch.Tensor) -> np.ndarray:
    """``torch.func.hessian`` per sample (the math attention kernel: CPU flash attention has
    no second derivative); recurrent layers, which torch.func cannot vmap, take
    ``torch.autograd.functional.hessian`` (plain double backward)."""
    scalar = _scalar(arch, module)
    with sdpa_kernel(SDPBackend.MATH):
        if arch.family == "recurrent":
            rows = [torch.autograd.functional.hessian(scalar, s.reshape(-1)) for s in x]
        else:
            rows = [torch.func.hessian(scalar)(s.reshape(-1)) for s in x]
    return torch.stack(rows).detach().numpy()


def _relative(ours: np.ndarray, reference: np.ndarray) -> float:
    assert ours.shape == reference.shape
    return float(np.abs(ours - reference).max() / max(np.abs(reference).max(), 1e-300))


def _hessian_over_http(
    http: httpx.Client, upload: Upload, x: torch.Tensor
) -> tuple[np.ndarray, dict[str, Any]]:
    arch = upload.arch
    body: dict[str, Any] = {
        "model": upload.name,
        "inputs": tensor(
            list(x.shape), base64.b64encode(x.numpy().tobytes()).decode(), datatype="FP64"
        ),
        "encoding": "base64",
        "precision": "float64",
    }
    if arch.objective is None:
        body["output_index"] = arch.output_index
    else:
        body["objective"] = {"type": arch.objective, "target": arch.target}
    response = http.post("/hessian", json=body)
    assert response.status_code == 200, response.text[:2000]
    result: dict[str, Any] = response.json()
    return decode(result["outputs"][0]), result


@pytest.mark.parametrize("upload", UPLOADS, ids=[u.name for u in UPLOADS])
def test_an_upload_is_served_like_the_module_in_process(
    server: httpx.Client, registered: dict[str, httpx.Response], upload: Upload
) -> None:
    response = registered[upload.name]
    assert response.status_code == (201 if upload.posted else 200), response.text[:2000]
    report = response.json()["capabilities"]
    arch = upload.arch
    generator = torch.Generator().manual_seed(19)
    x = torch.randn(arch.batch, *arch.sample_shape, dtype=torch.float64, generator=generator)
    ours, body = _hessian_over_http(server, upload, x)

    original = upload.original()
    in_process = compute_hessian(
        original,
        x,
        output_index=arch.output_index if arch.objective is None else None,
        objective=_objective(arch),
    )
    expected = in_process.selected.numpy()
    assert _relative(ours, expected) <= AGREES_IN_PROCESS
    assert _relative(ours, _torch_func_reference(arch, original, x)) <= AGREES_WITH_TORCH_FUNC

    served = body["metadata"]["method"]
    known = KNOWN.get((upload.arch.name, upload.fmt))
    if known is not None:  # strict: once the methods agree, the entry must go
        assert served != str(in_process.method), f"fixed, remove it from KNOWN: {known}"
        pytest.xfail(known)
    if in_process.method is Algorithm.STRUCTURED and served.startswith("graph:"):
        # An nn.Sequential in process is read layer by layer; its archive holds only a
        # graph, which the graph engine serves: fast, but a different method name.
        pytest.xfail("in process the structured path reads the nn.Sequential's layers")
    assert served == str(in_process.method), report
    assert report["hessian_method"] == "auto", report["notes"]
    assert report["engine_path"] == in_process.method.path, report["notes"]


# --- the README's torch.export call -------------------------------------------------------

README = ROOT / "README.md"
EXPORT_CALL = re.compile(r"`(torch\.export\.save\(torch\.export\.export\(.*?\), \"model\.pt2\"\))`")


def test_the_readme_export_call_works_for_a_sequential(
    server: httpx.Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's export snippet, run as written on an ``nn.Sequential`` with a
    two-sample example, gives an archive the server serves over any batch size."""
    (call,) = EXPORT_CALL.findall(README.read_text())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Softplus(), nn.Linear(8, 2))
    example = torch.randn(2, 3)
    monkeypatch.chdir(tmp_path)
    exec(call, {"torch": torch, "model": model, "example": example})
    manifest = {"name": "readme_export", "version": "1", "format": "export", "input_shape": [3]}
    response = server.post(
        "/models",
        headers=AUTH,
        data={"manifest": json.dumps(manifest)},
        files={"file": ("model.pt2", (tmp_path / "model.pt2").read_bytes())},
    )
    assert response.status_code == 201, response.text[:2000]
    assert response.json()["capabilities"]["batch"] == "any"
    x = torch.randn(5, 3, dtype=torch.float64)
    body = {
        "model": "readme_export",
        "inputs": tensor([5, 3], x.reshape(-1).tolist(), datatype="FP64"),
        "output_index": 1,
        "precision": "float64",
    }
    answer = server.post("/hessian", json=body)
    assert answer.status_code == 200, answer.text[:2000]
    model64 = model.double()
    reference = torch.stack(
        [torch.func.hessian(lambda s: model64(s.unsqueeze(0))[0, 1])(s) for s in x]
    ).detach()
    assert _relative(decode(answer.json()["outputs"][0]), reference.numpy()) <= 1e-10
