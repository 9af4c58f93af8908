"""UM-Bridge's own Python client (``umbridge.HTTPModel``) against a real server on 127.0.0.1.

Every call on mlp_tanh and digits_cnn is compared with two references computed here, in
float32, from the models' weights loaded independently of the server: ``torch.func``
(``vjp``, ``jvp``, ``jvp`` of ``grad`` of ``sens^T f``) and the engine's own operators
(``vector_jacobian_products``, ``jacobian_vector_products``,
``hessian_vector_products``). Tolerance: ``max |got - want| <= 1e-6 * max(1, max |want|)``
(float32 arithmetic in a different order; the float64 case: 1e-10).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import httpx
import pytest
import torch
import umbridge
from safetensors.torch import load_file
from torch import nn

from hessian_service.config import BUNDLED_MODELS_DIR
from hessian_service.engine import Objective
from hessian_service.engine import operators as ops
from hessian_service.repository import zoo

pytestmark = pytest.mark.e2e

MODELS = ["mlp_tanh", "digits_cnn"]
FLOAT32 = 1e-6


def local(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The bundled model with its weights, loaded here (not through the server)."""
    model = zoo.build(name)
    model.load_state_dict(load_file(str(BUNDLED_MODELS_DIR / name / "weights.safetensors")))
    return model.to(dtype).eval().requires_grad_(False)


def flat_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``F``: the flat input vector -> the flat output vector, as UM-Bridge sees it."""

    def f(flat: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = model(flat.reshape(1, 1, 28, 28)).reshape(-1)
        return out

    return f


def close(got: list[float], want: torch.Tensor, tol: float = FLOAT32, label: str = "") -> float:
    """The error measure of the module docstring, asserted; printed (``pytest -s``) when
    ``label`` names the comparison, for the record."""
    got_tensor = torch.tensor(got, dtype=torch.float64)
    want64 = want.double().reshape(-1)
    assert got_tensor.shape == want64.shape
    scale = max(1.0, float(want64.abs().max()))
    error = float((got_tensor - want64).abs().max()) / scale
    assert error <= tol, f"error {error:.3g} > {tol:g}"
    if label:
        print(f"{label}: max error {error:.2e} (tolerance {tol:g})")
    return error


def vectors(seed: int, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=generator)
    sens = torch.randn(m, generator=generator)
    vec = torch.randn(n, generator=generator)
    return x, sens, vec


@pytest.fixture(scope="module", params=MODELS)
def remote(request: pytest.FixtureRequest, server_url: str) -> umbridge.HTTPModel:
    return umbridge.HTTPModel(server_url, request.param)


def test_info_lists_every_model_and_sizes_follow_the_config(server_url: str) -> None:
    assert set(MODELS) <= set(umbridge.supported_models(server_url))
    model = umbridge.HTTPModel(server_url, "digits_cnn")
    assert model.get_input_sizes() == [784]
    assert model.get_output_sizes() == [10]
    assert model.get_output_sizes({"output_index": 2}) == [1]
    assert model.get_output_sizes({"output_index": [1, 3, 3]}) == [3]
    assert model.get_output_sizes({"objective": {"type": "cross_entropy", "target": 3}}) == [1]
    assert model.supports_evaluate()
    assert model.supports_gradient()
    assert model.supports_apply_jacobian()
    assert model.supports_apply_hessian()


def test_evaluate_is_the_forward_pass(remote: umbridge.HTTPModel) -> None:
    f = flat_fn(local(remote.name))
    x, _, _ = vectors(1, 784, 10)
    (output,) = remote([x.tolist()])
    close(output, f(x), label=f"{remote.name} Evaluate vs the forward pass")
    (logit,) = remote([x.tolist()], {"output_index": 4})
    close(logit, f(x)[4:5])
    (loss,) = remote([x.tolist()], {"objective": {"type": "cross_entropy", "target": 3}})
    close(loss, -torch.log_softmax(f(x), 0)[3:4])


def test_gradient_is_the_vjp(remote: umbridge.HTTPModel) -> None:
    model = local(remote.name)
    x, sens, _ = vectors(2, 784, 10)
    got = remote.gradient(0, 0, [x.tolist()], sens.tolist())
    _, pullback = torch.func.vjp(flat_fn(model), x)
    close(got, pullback(sens)[0], label=f"{remote.name} Gradient vs torch.func.vjp")
    engine = ops.vector_jacobian_products(model, x.reshape(1, 1, 28, 28), sens.reshape(1, 1, 10))
    close(got, engine.values, label=f"{remote.name} Gradient vs the engine's VJP")


def test_apply_jacobian_is_the_jvp(remote: umbridge.HTTPModel) -> None:
    model = local(remote.name)
    x, _, vec = vectors(3, 784, 10)
    got = remote.apply_jacobian(0, 0, [x.tolist()], vec.tolist())
    _, tangent = torch.func.jvp(flat_fn(model), (x,), (vec,))
    close(got, tangent, label=f"{remote.name} ApplyJacobian vs torch.func.jvp")
    engine = ops.jacobian_vector_products(
        model, x.reshape(1, 1, 28, 28), vec.reshape(1, 1, 1, 28, 28)
    )
    close(got, engine.values, label=f"{remote.name} ApplyJacobian vs the engine's JVP")


def hvp_reference(
    model: nn.Module, x: torch.Tensor, sens: torch.Tensor, vec: torch.Tensor
) -> torch.Tensor:
    """``∇²(sens^T F)(x) vec`` by ``torch.func``: forward over reverse, no engine code."""
    f = flat_fn(model)

    def weighted(flat: torch.Tensor) -> torch.Tensor:
        return (f(flat) * sens).sum()

    _, product = torch.func.jvp(torch.func.grad(weighted), (x,), (vec,))
    return product


def test_apply_hessian_is_the_hvp_of_sens_weighted_outputs(remote: umbridge.HTTPModel) -> None:
    model = local(remote.name)
    x, sens, vec = vectors(4, 784, 10)
    got = remote.apply_hessian(0, 0, 0, [x.tolist()], sens.tolist(), vec.tolist())
    want = hvp_reference(model, x, sens, vec)
    assert want.abs().max() > 1e-3  # curved: a zero answer cannot pass
    close(got, want, label=f"{remote.name} ApplyHessian vs torch.func jvp(grad)")
    engine = ops.hessian_vector_products(
        model,
        x.reshape(1, 1, 28, 28),
        vec.reshape(1, 1, 1, 28, 28),
        objective=Objective("weighted_sum", target=sens),
    )
    close(got, engine.values, label=f"{remote.name} ApplyHessian vs the engine's HVP")


def test_apply_hessian_under_a_selection_config(remote: umbridge.HTTPModel) -> None:
    model = local(remote.name)
    x, sens, vec = vectors(5, 784, 10)
    # One output: F = f_7, sens of size 1.
    got = remote.apply_hessian(0, 0, 0, [x.tolist()], [2.5], vec.tolist(), {"output_index": 7})
    close(got, hvp_reference(model, x, 2.5 * torch.eye(10)[7], vec))
    # A list, one index repeated: sens^T F adds both of its weights.
    picked = [1, 3, 3]
    weights = torch.zeros(10).index_add_(0, torch.tensor(picked), sens[:3])
    got = remote.apply_hessian(
        0, 0, 0, [x.tolist()], sens[:3].tolist(), vec.tolist(), {"output_index": picked}
    )
    close(got, hvp_reference(model, x, weights, vec))
    # An objective: F is the one scalar, scaled by sens[0].
    config = {"objective": {"type": "cross_entropy", "target": 3}}
    got = remote.apply_hessian(0, 0, 0, [x.tolist()], [-1.5], vec.tolist(), config)
    f = flat_fn(model)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        return -1.5 * -torch.log_softmax(f(flat), 0)[3]

    _, want = torch.func.jvp(torch.func.grad(loss), (x,), (vec,))
    close(got, want)
    # The gradient under the same selections.
    got = remote.gradient(0, 0, [x.tolist()], [2.0], {"output_index": 7})
    close(got, 2.0 * torch.func.grad(lambda flat: f(flat)[7])(x))


def test_float64_config_computes_in_double(server_url: str) -> None:
    model = local("mlp_tanh", torch.float64)
    remote = umbridge.HTTPModel(server_url, "mlp_tanh")
    x, sens, vec = (t.double() for t in vectors(6, 784, 10))
    config = {"precision": "float64"}
    got = remote.apply_hessian(0, 0, 0, [x.tolist()], sens.tolist(), vec.tolist(), config)
    close(got, hvp_reference(model, x, sens, vec), tol=1e-10, label="mlp_tanh float64 ApplyHessian")


def _post(client: httpx.Client, path: str, body: dict[str, object]) -> tuple[int, dict[str, str]]:
    response = client.post(path, json=body)
    error = response.json()["error"]
    assert set(error) == {"type", "message"}
    return response.status_code, error


def test_bad_requests_get_the_protocols_error(server_url: str, client: httpx.Client) -> None:
    x = [0.5] * 784
    base = {"name": "digits_cnn", "input": [x], "config": {}}
    cases: list[tuple[str, dict[str, object], str, str]] = [
        ("/Evaluate", {**base, "name": "no_such_model"}, "ModelNotFound", "no_such_model"),
        ("/Evaluate", {**base, "input": [x[:5]]}, "InvalidInput", "input[0]: expected 784"),
        ("/Evaluate", {**base, "input": [x, x]}, "InvalidInput", "1 input vector"),
        ("/Evaluate", {**base, "config": {"outputindex": 2}}, "InvalidInput", "config.outputindex"),
        ("/Evaluate", {**base, "config": {"output_index": 10}}, "InvalidInput", "out of range"),
        ("/Gradient", {**base, "outWrt": 0, "inWrt": 0}, "InvalidInput", "sens"),
        (
            "/Gradient",
            {**base, "outWrt": 1, "inWrt": 0, "sens": [1.0] * 10},
            "InvalidInput",
            "outWrt",
        ),
        (
            "/ApplyJacobian",
            {**base, "outWrt": 0, "inWrt": 0, "vec": [1.0] * 3},
            "InvalidInput",
            "vec: expected 784",
        ),
        (
            "/ApplyHessian",
            {**base, "outWrt": 0, "inWrt1": 0, "inWrt2": 0, "sens": [1.0] * 9, "vec": x},
            "InvalidInput",
            "sens: expected 10",
        ),
        ("/InputSizes", {"config": {}}, "InvalidInput", "name"),
        ("/ModelInfo", {"name": "nope"}, "ModelNotFound", "nope"),
        ("/Evaluate", {**base, "input": [[10**400] * 784]}, "InvalidInput", "float64's range"),
        (
            "/Evaluate",
            {**base, "config": {"objective": {"type": "log_softmax", "index": 99}}},
            "InvalidInput",
            "config.objective.index",
        ),
        (
            "/Gradient",
            {
                **base,
                "outWrt": 0,
                "inWrt": 0,
                "sens": [1.0],
                "config": {"objective": {"type": "mse", "target": [1.0, 2.0]}},
            },
            "InvalidInput",
            "config.objective.target",
        ),
        (
            "/Evaluate",
            {**base, "config": {"precision": "float16"}},
            "InvalidInput",
            "config.precision",
        ),
    ]
    for path, body, kind, words in cases:
        status, error = _post(client, path, body)
        assert (status, error["type"]) == (400, kind), (path, body, error)
        assert words in error["message"], (path, error)
    response = client.post(
        "/Evaluate", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "InvalidInput"
    wrong_method = client.get("/Evaluate")  # the server's own errors on these paths too
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["type"] == "InvalidInput"
    # The client raises the protocol's error (it reads the body, not the status).
    with pytest.raises(Exception, match="InvalidInput"):
        umbridge.HTTPModel(server_url, "digits_cnn")([x[:10]])
    assert math.isfinite(umbridge.HTTPModel(server_url, "digits_cnn")([x])[0][0])


def test_concurrent_calls_run_batched_each_with_its_own_answer() -> None:
    """16 UM-Bridge clients at once (an ensemble of MCMC chains): their ApplyHessian and
    Gradient calls merge into shared batches (the server's metrics count them) and each
    gets its own answer, as computed alone by torch.func here."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.e2e.conftest import running_server
    from tests.e2e.test_concurrency import metric, scrape

    model = local("digits_cnn")
    calls = [vectors(100 + i, 784, 10) for i in range(16)]
    with running_server(HESSIAN_MAX_BATCH_DELAY_MS="20") as url:
        remote = umbridge.HTTPModel(url, "digits_cnn")
        before = scrape(url)
        barrier = threading.Barrier(16)

        def call(args: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[list[float], ...]:
            x, sens, vec = args
            barrier.wait(timeout=30)
            hvp = remote.apply_hessian(0, 0, 0, [x.tolist()], sens.tolist(), vec.tolist())
            grad = remote.gradient(0, 0, [x.tolist()], sens.tolist())
            return hvp, grad

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(call, calls))
        after = scrape(url)
    for (x, sens, vec), (hvp, grad) in zip(calls, answers, strict=True):
        close(hvp, hvp_reference(model, x, sens, vec))
        _, pullback = torch.func.vjp(flat_fn(model), x)
        close(grad, pullback(sens)[0])
    for kind in ("hvp", "vjp"):
        batches = metric(after, "hessian_batch_requests_count", kind=kind) - metric(
            before, "hessian_batch_requests_count", kind=kind
        )
        requests = metric(after, "hessian_batch_requests_sum", kind=kind) - metric(
            before, "hessian_batch_requests_sum", kind=kind
        )
        assert requests == 16, kind
        assert batches < requests, f"no two {kind} calls were merged"
        print(f"16 concurrent UM-Bridge {kind} calls ran in {batches:.0f} batches")


def test_a_body_over_the_limit_is_the_protocols_413(limited_server_url: str) -> None:
    """The size limit answers before any route: still in the shape the client reads."""
    body = {"name": "digits_cnn", "input": [[0.123456789] * 784] * 30, "config": {}}
    with httpx.Client(base_url=limited_server_url, timeout=60, trust_env=False) as http:
        response = http.post("/Evaluate", json=body)  # about 330 kB: over the 200 kB limit
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "TooLarge"
