"""The repository serves TorchScript and torch.export archives on the engine's own path.

Two things used to stand between an archive and the fast path, both fixed in
``hessian_service.repository``:

- The probe forced the autograd row loop on a ``torch.export`` model that flattens with
  ``x.view(x.size(0), -1)``: its own check, a plain ``vmap`` of the forward, fails on
  ``aten::sym_size`` (no batching rule), although ``vmap`` of the gradient, which the
  engine runs, works. It also recorded the path of its trial instead of ``auto``.
- A TorchScript module whose first runs are ``torch.func`` transforms gets an optimized
  JIT plan whose differentiable subgraphs give wrong Hessians (measured: 4.7e-2 off) or
  raise; the loader's ``UnoptimizedScript`` runs every call unoptimized.

References are ``torch.func.hessian`` of the original eager module in float64, to 1e-10
relative to the largest entry.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import vmap

from bench.architectures import by_name
from hessian_service import engine
from hessian_service.repository.loaders import UnoptimizedScript
from hessian_service.repository.registry import load_model
from tests.fresh_script import FreshSiLU

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
]
RELATIVE = 1e-10


def _relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max().clamp_min(1e-300))


def _hessians(model: nn.Module, x: torch.Tensor, index: int, *, ce: bool = False) -> torch.Tensor:
    """``torch.func.hessian`` per sample, as ``[B, n, n]``, of output ``index`` (or, with
    ``ce``, of the cross-entropy towards class ``index``)."""
    n = x[0].numel()

    def scalar(flat: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = model(flat.reshape(1, *x.shape[1:])).reshape(-1)
        return -torch.log_softmax(out, dim=0)[index] if ce else out[index]

    return torch.stack([torch.func.hessian(scalar)(s.reshape(-1)) for s in x]).reshape(-1, n, n)


def _export_folder(tmp_path: Path, model: nn.Module, shape: tuple[int, ...]) -> Path:
    """A model folder holding ``model`` exported as the README says: batch dimension
    dynamic, given by position (any forward argument name), a two-sample example."""
    example = torch.randn(2, *shape, dtype=torch.float64)
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    (tmp_path / "model.pt2").write_bytes(buffer.getvalue())
    manifest = {"name": "m", "version": "1", "format": "export", "input_shape": list(shape)}
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "dtype": "float64"}))
    return tmp_path


def test_an_exported_view_flatten_cnn_is_served_on_the_path_it_takes_in_process(
    tmp_path: Path,
) -> None:
    arch = by_name("tutorial_cnn")  # conv/ReLU/max-pool, x.view(x.size(0), -1), MLP
    original = arch.build().double()
    loaded = load_model(_export_folder(tmp_path, original, arch.sample_shape), torch.device("cpu"))
    x = torch.randn(2, *arch.sample_shape, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="sym_size"):  # what the old probe checked
        vmap(lambda sample: loaded.module(sample.unsqueeze(0)))(x)
    report = loaded.capabilities
    assert report is not None
    assert report.vmap, report.notes
    assert (loaded.method("hessian"), loaded.method("jacobian")) == ("auto", "auto")
    # Its raw outputs are piecewise linear (zero Hessian): the table's cross-entropy is not.
    objective = engine.Objective(engine.ObjectiveKind.CROSS_ENTROPY, target=torch.tensor(5))
    in_process = engine.compute_hessian(original, x, objective=objective)
    assert report.engine_path == in_process.method.path
    method = loaded.method("hessian")
    served = engine.compute_hessian(loaded.module, x, objective=objective, method=method)
    assert served.method == in_process.method
    assert _relative(served.selected, _hessians(original, x, 5, ce=True)) <= RELATIVE


def test_an_exported_sequential_loads_with_the_positional_batch_dimension(tmp_path: Path) -> None:
    """``nn.Sequential.forward`` names its argument ``input``: a ``{"x": ...}`` spec fails,
    the positional one works and the archive takes any batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Softplus(), nn.Linear(8, 2)).double().eval()
    with pytest.raises(Exception, match="input"):
        torch.export.export(
            model,
            (torch.randn(2, 3, dtype=torch.float64),),
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        )
    loaded = load_model(_export_folder(tmp_path, model, (3,)), torch.device("cpu"))
    assert loaded.capabilities is not None and loaded.capabilities.batch == "any"
    x = torch.randn(5, 3, dtype=torch.float64)
    result = engine.hessian(loaded.module, x, output_index=1, method=loaded.method("hessian"))
    assert _relative(result, _hessians(model, x, 1)) <= RELATIVE


def test_a_never_run_torchscript_module_as_loaded_gives_exact_hessians() -> None:
    """Its first runs are the generic path's transforms: unwrapped, the JIT profiles them
    and its optimized plan gives Hessians 4.7e-2 off from the second call on."""
    torch.manual_seed(0)
    model = type("FreshSiLUUpload", (FreshSiLU,), {})().double().eval().requires_grad_(False)
    served = UnoptimizedScript(torch.jit.script(model))  # what loaders._load_torchscript returns
    x = torch.randn(2, 5, dtype=torch.float64)
    reference = _hessians(model, x, 0)
    for method in ("generic", "generic", "auto", "autograd", "generic"):
        result = engine.hessian(served, x, output_index=0, method=method)
        assert _relative(result, reference) <= RELATIVE, method
