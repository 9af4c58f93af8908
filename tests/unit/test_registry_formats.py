"""Loading user models in each format, the capability probe, versions, and the engine's
autograd fallback -- every value against torch.func on the original module, in float64."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from hessian_service.config import Settings
from hessian_service.engine import Curvature, Objective, compute_hessian, compute_jacobian
from hessian_service.errors import Conflict, InvalidInput, NotFound
from hessian_service.repository.capabilities import MAX_PROBE_HESSIAN_ENTRIES, curvature_of, probe
from hessian_service.repository.registry import (
    LoadedModel,
    Manifest,
    Registry,
    load_model,
    version_key,
)
from hessian_service.serving.service import DerivativeService
from hessian_service.wire.schemas import DerivativeRequest
from tests.byom import (
    Branchy,
    Float32Only,
    ReluMLP,
    SoftMLP,
    TinyConv,
    export_bytes,
    seeded,
    torchscript_bytes,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    # torch.export's own pytree code, in torch 2.13.
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
]
CPU = torch.device("cpu")


def _folder(tmp_path: Path, name: str, fmt: str, data: bytes, shape: list[int]) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    file = {"torchscript": "model.pt", "export": "model.pt2"}[fmt]
    (folder / file).write_bytes(data)
    manifest = {"name": name, "version": "1", "format": fmt, "input_shape": shape}
    manifest["dtype"] = "float64"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _reference(module: nn.Module, x: torch.Tensor, index: int) -> torch.Tensor:
    n = x[0].numel()

    def scalar(sample: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = module(sample.reshape(1, *x.shape[1:])).reshape(-1)[index]
        return out

    return torch.stack([torch.func.hessian(scalar)(s.reshape(-1)).reshape(n, n) for s in x])


CASES = {
    # name: (architecture, format, per-sample shape, how the archive is made)
    "script_mlp": (SoftMLP, "torchscript", [6], "script"),
    "trace_conv": (TinyConv, "torchscript", [1, 6, 6], "trace"),
    "export_mlp": (SoftMLP, "export", [6], "dynamic"),
    "export_conv_batch_of_one": (TinyConv, "export", [1, 6, 6], "static"),
}


def _archive(module: nn.Module, how: str, shape: list[int]) -> bytes:
    example = torch.randn(1 if how == "static" else 2, *shape, dtype=torch.float64)
    if how == "script":
        return torchscript_bytes(module)
    if how == "trace":
        return torchscript_bytes(module, trace_input=example)
    return export_bytes(module, example, dynamic_batch=how == "dynamic")


@pytest.mark.parametrize("name", list(CASES))
def test_each_format_gives_torch_func_hessians(tmp_path: Path, name: str) -> None:
    architecture, fmt, shape, how = CASES[name]
    original = seeded(architecture()).double()
    folder = _folder(tmp_path, name, fmt, _archive(original, how, shape), shape)
    loaded = load_model(folder, CPU)
    report = loaded.capabilities
    assert report is not None
    assert (report.vmap, report.forward_mode) == (True, True)
    # Served like the module in process: method auto, and the path auto takes there.
    assert (loaded.method("hessian"), loaded.method("jacobian")) == ("auto", "auto")
    in_process = compute_hessian(original, torch.zeros(1, *shape).double(), output_index=0)
    assert report.engine_path == in_process.method.path, report.notes
    assert report.curvature is Curvature.GENERAL
    assert report.batch == ("one" if how == "static" else "any")
    assert report.parameters == sum(p.numel() for p in original.parameters())
    assert report.parameter_bytes == 8 * report.parameters
    assert not report.random_ops
    x = torch.randn(3, *shape, dtype=torch.float64)
    result = compute_hessian(loaded.module, x, output_index=1, method=loaded.method("hessian"))
    torch.testing.assert_close(
        result.matrix[:, 0], _reference(original, x, 1), rtol=1e-10, atol=1e-12
    )
    assert loaded.manifest.output_shape == [3 if architecture is SoftMLP else 4]
    with torch.no_grad():  # a batch goes through, also for the batch-of-one export
        torch.testing.assert_close(loaded.module(x), original(x))


def test_a_model_vmap_cannot_run_gets_the_autograd_row_loop(tmp_path: Path) -> None:
    original = seeded(Branchy()).double()
    folder = _folder(tmp_path, "branchy", "torchscript", torchscript_bytes(original), [4])
    loaded = load_model(folder, CPU)
    report = loaded.capabilities
    assert report is not None
    assert report.vmap is False
    assert any(note.startswith("vmap:") for note in report.notes)
    assert (report.engine_path, loaded.method("hessian"), loaded.method("jacobian")) == (
        "autograd",
        "autograd",
        "autograd",
    )
    x = torch.randn(2, 4, dtype=torch.float64)
    result = compute_hessian(loaded.module, x, output_index=[0, 2], method="autograd")
    assert result.method == "autograd:row-loop"
    for k, index in enumerate([0, 2]):
        torch.testing.assert_close(result.matrix[:, k], _reference(original, x, index))
    jac = compute_jacobian(loaded.module, x, method="autograd")
    expected = torch.stack([torch.func.jacrev(lambda s: original(s[None])[0])(s) for s in x])
    torch.testing.assert_close(jac.matrix, expected)


def test_autograd_method_matches_generic_with_objectives_and_gives_zeros() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().eval()
    x = torch.randn(3, 5, dtype=torch.float64)
    objective = Objective("cross_entropy", target=torch.tensor([0, 2, 1]))
    ours = compute_hessian(model, x, objective=objective, method="autograd").matrix
    generic = compute_hessian(model, x, objective=objective, method="generic").matrix
    torch.testing.assert_close(ours, generic)
    linear = nn.Linear(4, 1).double()
    zeros = compute_hessian(linear, torch.randn(2, 4, dtype=torch.float64), method="autograd")
    assert zeros.matrix.shape == (2, 1, 4, 4)
    assert not zeros.matrix.any()


def test_curvature_from_graph_operators() -> None:
    relu = seeded(ReluMLP())
    example = torch.randn(2, 5)
    assert curvature_of(torch.jit.script(relu)) is Curvature.PIECEWISE_LINEAR
    exported = torch.export.export(relu, (example,)).module()
    assert curvature_of(exported) is Curvature.PIECEWISE_LINEAR
    affine = torch.export.export(nn.Sequential(nn.Linear(5, 2)).eval(), (example,)).module()
    assert curvature_of(affine) is Curvature.AFFINE
    assert curvature_of(torch.jit.script(seeded(SoftMLP()))) is Curvature.GENERAL


class Noisy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1e-3 * torch.rand_like(x)


def test_random_ops_are_reported() -> None:
    scripted = torch.jit.script(Noisy())
    report = probe(scripted, [3], batch="any")
    assert report.random_ops
    assert "calls the random operator aten::rand_like" in report.random_evidence
    assert "two forward passes on the same input differ" in report.random_evidence
    dropout = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).train()
    report = probe(dropout, [3], batch="any")
    assert report.random_ops
    assert any("dropout in training mode" in line for line in report.random_evidence)
    assert not probe(dropout.eval(), [3], batch="any").random_ops


def test_responses_of_a_random_model_carry_a_note(tmp_path: Path) -> None:
    """The probe's random-ops finding reaches the client, and only for random models."""
    registry = Registry(CPU)
    for name, module in (("noisy", Noisy()), ("steady", seeded(SoftMLP()))):
        folder = _folder(tmp_path, name, "torchscript", torchscript_bytes(module), [6])
        registry.add(load_model(folder, CPU))
    registry.ready = True
    service = DerivativeService(registry, Settings(device="cpu"))
    try:
        notes = {}
        for name in ("noisy", "steady"):
            request = DerivativeRequest.model_validate(
                {
                    "model": name,
                    "inputs": [{"shape": [6], "datatype": "FP64", "data": [0.5] * 6}],
                    "output_index": 1,
                    "precision": "float64",
                }
            )
            prepared = service.prepare("hessian", request)
            result, compute_ms = service.compute(prepared)
            notes[name] = service.describe(prepared, result, compute_ms)["metadata"]["notes"]
    finally:
        service.close()
    random_notes = [note for note in notes["noisy"] if "random operations" in note]
    assert len(random_notes) == 1
    assert "aten::rand_like" in random_notes[0]
    assert not any("random" in note for note in notes["steady"])


def test_versions_sort_naturally() -> None:
    ordered = ["1", "1.2", "1.10", "2", "9", "10", "10a"]
    assert sorted(reversed(ordered), key=version_key) == ordered


def _fake(name: str, version: str) -> LoadedModel:
    manifest = Manifest(name=name, version=version, architecture="linear4", input_shape=[4])
    return LoadedModel(manifest, nn.Linear(4, 1), CPU, Curvature.AFFINE)


def test_registry_resolves_latest_and_exact_versions() -> None:
    registry = Registry(CPU)
    registry.ready = True
    one, two, ten = _fake("m", "1"), _fake("m", "2"), _fake("m", "10")
    for model in (two, ten, one):
        registry.add(model)
    assert registry.get("m") is ten
    assert registry.get("m@2") is two
    with pytest.raises(Conflict):
        registry.add(_fake("m", "2"))
    replacement = _fake("m", "2")
    assert registry.add(replacement, replace=True) is two
    assert registry.remove("m@10") == [ten]
    assert registry.get("m") is replacement
    with pytest.raises(NotFound, match="loaded versions: 1, 2"):
        registry.get("m@10")
    assert registry.remove("m") == [one, replacement]
    with pytest.raises(NotFound):
        registry.get("m")


def test_manifest_checks() -> None:
    with pytest.raises(ValueError, match="architecture"):
        Manifest(name="a", version="1", input_shape=[2])
    with pytest.raises(ValueError, match="only for format 'zoo'"):
        Manifest(name="a", version="1", format="export", architecture="x", input_shape=[2])
    for bad in ("../etc", "a/b", "", "@x"):
        with pytest.raises(ValueError):
            Manifest(name=bad, version="1", format="export", input_shape=[2])
    with pytest.raises(ValueError):
        Manifest(name="a", version="1", format="export", input_shape=[2], file="../x.pt2")
    manifest = Manifest(name="a", version="1", format="export", input_shape=[2])
    assert manifest.file_name == "model.pt2"


def test_a_precision_the_model_cannot_run_is_a_422_error(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "f32", "torchscript", torchscript_bytes(Float32Only()), [4])
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "dtype": "float32"}))
    loaded = load_model(folder, CPU)
    assert loaded.capabilities is not None
    assert loaded.capabilities.precisions == ("float32",)
    assert any(note.startswith("torch.float64:") for note in loaded.capabilities.notes)
    with pytest.raises(InvalidInput, match="runs in float32 only") as caught:
        loaded.for_dtype(torch.float64)
    assert caught.value.field == "precision"


def test_no_trial_hessian_for_huge_inputs() -> None:
    n = 8193  # n * n is just over MAX_PROBE_HESSIAN_ENTRIES
    assert n * n > MAX_PROBE_HESSIAN_ENTRIES >= (n - 1) ** 2
    wide = nn.Sequential(nn.Linear(n, 2), nn.Tanh()).eval().requires_grad_(False)
    report = probe(wide, [n], batch="any")
    assert report.engine_path == "structured"
    assert any("Hessian probe skipped" in note for note in report.notes)
