"""Out-of-memory during a computation: retried with half the memory budget, then 507.

A test-only model (registered in the app's registry as an upload would be) raises
``torch.OutOfMemoryError`` when one derivative pass pushes more than ``limit`` samples
through it at once, as a device would past its memory. The service retries with half
the budget (the generic path's plan then takes half the samples per chunk) and answers
with the right values (against float64 ``torch.func.hessian``); a model that always
fails gets 507 naming the estimate, and the server answers the next request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn
from torch._C import _functorch

from hessian_service.config import Settings
from hessian_service.engine import EnginePath, compute_hessian
from hessian_service.main import create_app
from hessian_service.repository.capabilities import probe
from hessian_service.repository.registry import LoadedModel, Manifest

N_INPUTS, BATCH = 16, 4


def _physical(t: torch.Tensor) -> torch.Tensor:
    """The tensor under functorch's wrappers: its leading axis is the samples of a chunk."""
    for _ in range(32):
        if _functorch.is_batchedtensor(t) or _functorch.is_gradtrackingtensor(t):
            t = _functorch.get_unwrapped(t)
        else:
            break
    return t


class ChunkLimited(nn.Module):
    """A tanh MLP that 'runs out of memory' when a derivative pass (a functorch-wrapped
    input) carries more than ``limit`` samples; plain forward passes always run."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.inner = nn.Sequential(nn.Linear(N_INPUTS, 12), nn.Tanh(), nn.Linear(12, 1))
        self.limit = BATCH
        self.largest = 0  # the most samples one derivative pass carried

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _functorch.is_gradtrackingtensor(x) or _functorch.is_batchedtensor(x):
            samples = int(_physical(x).shape[0])
            self.largest = max(self.largest, samples)
            if samples > self.limit:
                raise torch.OutOfMemoryError(f"test: {samples} samples > {self.limit}")
        return self.inner(x)


def _budget_for(model: ChunkLimited, x: torch.Tensor, samples: int) -> int:
    """The largest power-of-two budget whose generic plan takes at most ``samples``
    samples per pass (found by running it, not by copying the planner's formula)."""
    model.limit = BATCH
    for power in range(30, 8, -1):
        model.largest = 0
        compute_hessian(model, x, method=EnginePath.GENERIC, memory_budget_bytes=1 << power)
        if model.largest <= samples:
            return 1 << power
    raise AssertionError("no budget gives that chunk")


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[TestClient, ChunkLimited, torch.Tensor, int]]:
    model = ChunkLimited().double().eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    x = torch.linspace(-1.0, 1.0, BATCH * N_INPUTS, dtype=torch.float64).reshape(BATCH, N_INPUTS)
    half = _budget_for(model, x, BATCH // 2)
    settings = Settings(device="cpu", memory_budget_bytes=2 * half, max_batch_delay_ms=0)
    with TestClient(create_app(settings)) as client:
        manifest = Manifest(
            name="chunk_limited",
            version="1",
            format="torchscript",
            input_shape=[N_INPUTS],
            output_shape=[1],
            dtype="float64",
        )
        found = probe(
            model, [N_INPUTS], batch="any", device=torch.device("cpu"), dtype=torch.float64
        )
        # The generic path: the one whose chunks are samples (the graph path runs its
        # captured graph, not this forward); the probe would record auto.
        capabilities = dataclasses.replace(found, hessian_method=EnginePath.GENERIC)
        loaded = LoadedModel(
            manifest, model, torch.device("cpu"), found.curvature, capabilities=capabilities
        )
        client.app.state.registry.add(loaded)  # type: ignore[attr-defined]
        yield client, model, x, half


def _request(x: torch.Tensor) -> dict[str, object]:
    return {
        "model": "chunk_limited",
        "inputs": [
            {
                "name": "x",
                "shape": list(x.shape),
                "datatype": "FP64",
                "data": x.reshape(-1).tolist(),
            }
        ],
        "precision": "float64",
    }


def _reference(model: ChunkLimited, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.func.hessian(lambda s: model.inner(s).sum())(s) for s in x])


def _oom_retries(client: TestClient) -> float:
    text = client.get("/metrics").text
    lines = [ln for ln in text.splitlines() if ln.startswith("hessian_oom_retries_total{")]
    return sum(float(ln.split()[-1]) for ln in lines if 'kind="hessian"' in ln)


def test_out_of_memory_is_retried_with_half_the_budget(setup) -> None:  # type: ignore[no-untyped-def]
    client, model, x, _half = setup
    model.limit, model.largest = BATCH // 2, 0
    before = _oom_retries(client)
    response = client.post("/hessian", json=_request(x))
    assert response.status_code == 200, response.text
    assert model.largest == BATCH  # the first try did carry all 4 samples, and failed
    got = torch.tensor(response.json()["outputs"][0]["data"], dtype=torch.float64).reshape(
        BATCH, N_INPUTS, N_INPUTS
    )
    expected = _reference(model, x)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert _oom_retries(client) == before + 1


def test_out_of_memory_at_every_budget_is_507_and_the_server_goes_on(setup) -> None:  # type: ignore[no-untyped-def]
    client, model, x, half = setup
    model.limit = 0  # fails however small the chunk
    response = client.post("/hessian", json=_request(x))
    assert response.status_code == 507, response.text
    problem = response.json()
    assert problem["title"] == "Insufficient storage"
    assert problem["field"] == "inputs[0].shape"
    assert problem["estimated_bytes"] == BATCH * N_INPUTS * N_INPUTS * 8
    assert problem["memory_budgets_tried"] == [2 * half, half, half // 2, half // 4]
    assert "rows" in problem["detail"] and "/hessian/diagonal" in problem["detail"]
    model.limit = BATCH
    again = client.post("/hessian", json=_request(x))
    assert again.status_code == 200, again.text
    got = torch.tensor(again.json()["outputs"][0]["data"], dtype=torch.float64).reshape(
        BATCH, N_INPUTS, N_INPUTS
    )
    assert torch.allclose(got, _reference(model, x), rtol=1e-10, atol=1e-12)
