"""serving.merging with the real service and engine: merged = each request computed alone.

Requests are prepared by the real ``DerivativeService`` on bundled models; the ones that
share a batch key are computed as one batch (``compute_batch``) and each slice is
compared with the same request computed alone: 1e-12 relative in float64, 1e-5 in
float32. Per-sample objective targets (mse rows, cross-entropy classes) must follow
their own samples.
"""

from __future__ import annotations

import base64
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from hessian_service.config import BUNDLED_MODELS_DIR, Settings
from hessian_service.repository.registry import Registry
from hessian_service.serving import merging
from hessian_service.serving.operations import OperatorOutcome
from hessian_service.serving.service import DerivativeService, PreparedRequest
from hessian_service.wire.operator_schemas import EstimateRequest, ProductRequest
from hessian_service.wire.schemas import DerivativeRequest


@pytest.fixture(scope="module")
def service() -> Iterator[DerivativeService]:
    registry = Registry(torch.device("cpu"))
    registry.load_dir(BUNDLED_MODELS_DIR)
    service = DerivativeService(registry, Settings(device="cpu"))
    yield service
    service.close()


def _request(model: str, shape: list[int], seed: int, **fields: Any) -> DerivativeRequest:
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    tensor = {"shape": shape, "datatype": "FP32", "data": base64.b64encode(x.tobytes()).decode()}
    return DerivativeRequest.model_validate({"model": model, "inputs": [tensor], **fields})


def _requests() -> list[tuple[str, DerivativeRequest]]:
    one, two = [1, 28, 28], [2, 1, 28, 28]
    out: list[tuple[str, DerivativeRequest]] = []
    for precision in ("float32", "float64"):
        p = {"precision": precision}
        out += [
            ("hessian", _request("mlp_tanh", one, 1, output_index=3, **p)),
            ("hessian", _request("mlp_tanh", two, 2, output_index=3, **p)),
            ("hessian", _request("mlp_tanh", one, 3, output_index=[3], **p)),  # own key
            ("hessian", _request("mlp_tanh", one, 4, output_index=5, **p)),
            (
                "hessian",
                _request(
                    "mlp_tanh",
                    two,
                    5,
                    objective={
                        "type": "mse",
                        "target": [[float(i) for i in range(10)], [float(-i) for i in range(10)]],
                    },
                    **p,
                ),
            ),
            (
                "hessian",
                _request("mlp_tanh", one, 6, objective={"type": "mse", "target": 0.5}, **p),
            ),
            (
                "hessian",
                _request(
                    "mlp_tanh", two, 7, objective={"type": "cross_entropy", "target": [1, 8]}, **p
                ),
            ),
            (
                "hessian",
                _request("mlp_tanh", one, 8, objective={"type": "cross_entropy", "target": 4}, **p),
            ),
            ("jacobian", _request("mlp_tanh", one, 9, **p)),
            ("jacobian", _request("mlp_tanh", two, 10, **p)),
            ("jacobian", _request("quadratic4", [4], 11, **p)),
            ("jacobian", _request("quadratic4", [3, 4], 12, **p)),
            (
                "jacobian",
                _request("mlp_tanh", one, 13, objective={"type": "log_softmax", "index": 2}, **p),
            ),
            (
                "jacobian",
                _request("mlp_tanh", two, 14, objective={"type": "log_softmax", "index": 2}, **p),
            ),
        ]
    return out


def test_keys_separate_what_must_not_merge(service: DerivativeService) -> None:
    prepared = [service.prepare(kind, request) for kind, request in _requests()]
    keys = [merging.batch_key(p) for p in prepared]
    assert keys[0] == keys[1]  # same model, kind, dtype, index: merge
    assert keys[0] != keys[2]  # an int and a one-element list give different shapes
    assert keys[0] != keys[3]  # another output
    assert keys[4] == keys[5]  # mse targets are per sample: they merge
    assert keys[6] == keys[7]
    assert keys[4] != keys[6]
    assert keys[8] != keys[10]  # another model
    assert keys[0] != keys[14]  # another precision
    assert len(set(keys)) == 16  # 8 groups per precision


def test_merged_batches_equal_requests_computed_alone(service: DerivativeService) -> None:
    groups: dict[merging.BatchKey, list[PreparedRequest]] = defaultdict(list)
    for kind, request in _requests():
        prepared = service.prepare(kind, request)
        groups[merging.batch_key(prepared)].append(prepared)
    merged_groups = 0
    for key, batch in groups.items():
        results = service.compute_batch(key, batch)
        merged_groups += len(batch) > 1
        assert len(results) == len(batch)
        for prepared, (result, _ms) in zip(batch, results, strict=True):
            alone, _ = service.compute(prepared)
            assert result.matrix.shape == alone.matrix.shape
            tolerance = 1e-12 if prepared.x.dtype == torch.float64 else 1e-5
            scale = float(alone.matrix.abs().max())
            torch.testing.assert_close(
                result.matrix, alone.matrix, rtol=tolerance, atol=tolerance * scale
            )
            torch.testing.assert_close(result.output, alone.output, rtol=tolerance, atol=1e-6)
            assert result.squeeze_scalars == alone.squeeze_scalars
    assert merged_groups == 12  # six merged groups per precision


def test_merge_refuses_different_keys(service: DerivativeService) -> None:
    a = service.prepare("hessian", _request("mlp_tanh", [1, 28, 28], 0, output_index=1))
    b = service.prepare("hessian", _request("mlp_tanh", [1, 28, 28], 0, output_index=2))
    with pytest.raises(ValueError, match="different keys"):
        merging.merge([a, b])


def _product(model: str, shape: list[int], m: int, seed: int, **fields: Any) -> ProductRequest:
    """An /hvp-style body whose m vectors are shared by every sample."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal([m, *shape[-3:]]).astype(np.float32)

    def tensor(array: np.ndarray) -> dict[str, Any]:
        data = base64.b64encode(array.tobytes()).decode()
        return {"shape": list(array.shape), "datatype": "FP32", "data": data}

    body = {"model": model, "inputs": [tensor(x)], "vectors": tensor(v), **fields}
    return ProductRequest.model_validate(body)


def test_products_merge_with_their_own_vectors_and_weights(service: DerivativeService) -> None:
    """Concurrent products of the same m merge (each sample keeps its own vectors and
    weighted_sum weights); another m, an estimate, or another kind do not."""
    one, two = [1, 1, 28, 28], [2, 1, 28, 28]
    weights = {"type": "weighted_sum", "weights": [float(i) for i in range(10)]}
    cases = [
        ("hvp", _product("mlp_tanh", one, 2, 1, output_index=3)),
        ("hvp", _product("mlp_tanh", two, 2, 2, output_index=3)),
        ("hvp", _product("mlp_tanh", one, 3, 3, output_index=3)),  # another m: own key
        ("hvp", _product("mlp_tanh", one, 1, 4, objective=weights)),
        ("hvp", _product("mlp_tanh", two, 1, 5, objective=weights)),
    ]
    prepared = [service.prepare(kind, request) for kind, request in cases[:5]]
    keys = [merging.batch_key(p) for p in prepared]
    assert keys[0] == keys[1] and keys[3] == keys[4]
    assert len({keys[0], keys[2], keys[3]}) == 3
    trace_body = EstimateRequest.model_validate(cases[0][1].model_dump(exclude={"vectors"}))
    traces = [service.prepare("hessian/trace", trace_body) for _ in range(2)]
    assert merging.batch_key(traces[0]) != merging.batch_key(traces[1])  # never merge
    for group in ([prepared[0], prepared[1]], [prepared[3], prepared[4]]):
        results = service.compute_batch(merging.batch_key(group[0]), group)
        for each, (result, _ms) in zip(group, results, strict=True):
            alone, _ = service.compute(each)
            assert isinstance(result, OperatorOutcome) and isinstance(alone, OperatorOutcome)
            assert result.products == alone.products
            (got,), (want,) = result.values.values(), alone.values.values()
            assert got.shape == want.shape
            scale = float(want.abs().max())
            assert scale > 1e-4  # curved: zeros would not pass
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)
            torch.testing.assert_close(result.output, alone.output, rtol=1e-5, atol=1e-6)
