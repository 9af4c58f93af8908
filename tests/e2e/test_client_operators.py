"""The Python client's operator methods against a real uvicorn server on 127.0.0.1.

``Client.hvp``/``jvp``/``vjp``, ``hessian_diagonal``, ``hessian_trace`` and
``hessian_eigen`` (and one call of each kind through ``AsyncClient``) are checked against
float64 references computed here with torch.func from the bundled digits_cnn itself
(``tests.unit.operators_helpers.bundled``: the shipped weights, no service code): the dense
Hessian of logit ``INDEX`` by ``torch.func.hessian``, the Jacobian by ``torch.func.jacrev``
and the eigenpairs by ``torch.linalg.eigh``. Exact answers must agree to 1e-10 relative
(float64 end to end: FP64 tensors on the wire, ``precision="float64"``); an estimate must
say ``exact`` False, carry a standard error and lie within 4 of it (seeded, so
deterministic); a refusal is a ``HessianServiceError`` naming the field at fault. The CLI's
``trace``, ``eigen``, ``hvp`` and ``diagonal`` commands (run in process: they are the client)
print and save the same numbers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hessian_client import AsyncClient, Client, HessianServiceError

from hessian_service.cli import main
from tests.unit.operators_helpers import bundled

pytestmark = pytest.mark.e2e

MODEL = "digits_cnn"
SHAPE = (1, 28, 28)
N = 784
INDEX = 3  # the selected logit
EXACT = 1e-10  # relative tolerance of an exact float64 answer
F64 = "float64"  # the compute precision of every exact check


class Reference:
    """digits_cnn at one seeded input, in float64: output, Jacobian, dense Hessian of
    logit ``INDEX`` and its eigendecomposition (ascending)."""

    def __init__(self) -> None:
        model = bundled(MODEL)
        self.x = np.random.default_rng(0).random(SHAPE)  # float64: sent as FP64
        flat = torch.from_numpy(self.x).reshape(-1)

        def outputs(f: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = model(f.reshape(1, *SHAPE))
            return out.reshape(-1)

        with torch.no_grad():
            self.output = outputs(flat).numpy()
        self.jacobian = torch.func.jacrev(outputs)(flat).numpy()  # [10, n]
        hessian = torch.func.hessian(lambda f: outputs(f)[INDEX])(flat)  # [n, n]
        self.hessian = hessian.numpy()
        values, vectors = torch.linalg.eigh(hessian)
        self.eigenvalues, self.eigenvectors = values.numpy(), vectors.numpy()


@pytest.fixture(scope="module")
def ref() -> Reference:
    return Reference()


@pytest.fixture(scope="module")
def hc(server_url: str) -> Iterator[Client]:
    with Client(server_url, trust_env=False) as client:
        yield client


def _close(got: np.ndarray, expected: np.ndarray, rtol: float = EXACT) -> None:
    """Same shape, equal to ``rtol`` relative to the reference's largest entry."""
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert got.dtype == np.float64
    scale = float(np.abs(expected).max())
    assert scale > 0
    error = float(np.abs(got - expected).max())
    assert error <= rtol * scale, error / scale


def test_products_equal_the_dense_references(hc: Client, ref: Reference) -> None:
    v = np.random.default_rng(1).standard_normal((3, *SHAPE))
    hvp = hc.hvp(MODEL, ref.x, v, output_index=INDEX, precision=F64)
    _close(hvp.values, (v.reshape(3, N) @ ref.hessian).reshape(3, *SHAPE))
    _close(hvp.output, ref.output)
    assert (hvp.products, hvp.exact, hvp.model) == (3, True, MODEL)
    assert hvp.method

    jvp = hc.jvp(MODEL, ref.x, v, precision=F64)  # every output
    _close(jvp.values, v.reshape(3, N) @ ref.jacobian.T)  # [m, 10]
    jvp = hc.jvp(MODEL, ref.x, v, output_index=[1, 4], encoding="json", precision=F64)
    _close(jvp.values, v.reshape(3, N) @ ref.jacobian[[1, 4]].T)  # [m, k]

    u = np.random.default_rng(2).standard_normal((2, 10))
    vjp = hc.vjp(MODEL, ref.x, u, encoding="base64", precision=F64)
    _close(vjp.values, (u @ ref.jacobian).reshape(2, *SHAPE))
    assert vjp.products == 2 and vjp.exact


def test_exact_diagonal_and_trace_equal_the_dense_hessian(hc: Client, ref: Reference) -> None:
    diagonal = hc.hessian_diagonal(MODEL, ref.x, output_index=INDEX, exact=True, precision=F64)
    _close(diagonal.values, np.diag(ref.hessian).reshape(SHAPE))
    assert diagonal.exact and diagonal.standard_error is None and diagonal.products >= 1

    trace = hc.hessian_trace(MODEL, ref.x, output_index=INDEX, precision=F64)  # exact: it fits
    assert trace.exact and trace.standard_error is None and trace.values.shape == ()
    want = float(np.trace(ref.hessian))
    assert abs(float(trace.values) - want) <= EXACT * float(np.abs(np.diag(ref.hessian)).sum())


def test_estimates_report_exact_false_and_a_standard_error(hc: Client, ref: Reference) -> None:
    trace = hc.hessian_trace(
        MODEL, ref.x, output_index=INDEX, exact=False, max_products=60, seed=1, precision=F64
    )
    assert (trace.exact, trace.method) == (False, "hutch++")
    assert 0 < trace.products <= 60
    assert trace.standard_error is not None and trace.standard_error.shape == ()
    error = float(trace.standard_error)
    assert error > 0
    assert abs(float(trace.values) - float(np.trace(ref.hessian))) <= 4 * error

    diagonal = hc.hessian_diagonal(
        MODEL, ref.x, output_index=INDEX, exact=False, max_products=64, seed=2, precision=F64
    )
    assert diagonal.exact is False and 0 < diagonal.products <= 64
    assert diagonal.standard_error is not None
    assert diagonal.standard_error.shape == diagonal.values.shape == SHAPE
    assert float(diagonal.standard_error.max()) > 0
    # The entries' errors against their own standard errors: at most a few beyond 4.
    outside = np.abs(diagonal.values - np.diag(ref.hessian).reshape(SHAPE)) > (
        4 * diagonal.standard_error + 1e-12
    )
    assert int(outside.sum()) <= N // 100, int(outside.sum())


def test_eigen_matches_eigh_with_residuals(hc: Client, ref: Reference) -> None:
    eig = hc.hessian_eigen(MODEL, ref.x, k=3, tol=1e-10, output_index=INDEX, precision=F64)
    assert eig.converged and eig.method == "lanczos" and eig.products > 3
    top = ref.eigenvalues[::-1][:3]
    _close(eig.eigenvalues, top)
    assert eig.eigenvectors.shape == (3, *SHAPE) and eig.residuals.shape == (3,)
    vectors = eig.eigenvectors.reshape(3, N)
    # The residuals are what they say: ||H v - lambda v|| measured here, and small.
    measured = np.linalg.norm(vectors @ ref.hessian - eig.eigenvalues[:, None] * vectors, axis=1)
    np.testing.assert_allclose(eig.residuals, measured, rtol=1e-3, atol=1e-12)
    assert float(eig.residuals.max()) <= 1e-10 * float(np.abs(top).max())

    bottom = hc.hessian_eigen(
        MODEL, ref.x, k=2, which="smallest", tol=1e-10, output_index=INDEX, precision=F64
    )
    _close(bottom.eigenvalues, ref.eigenvalues[:2])


def test_async_twin_gives_the_same_answers(server_url: str, ref: Reference) -> None:
    v = np.random.default_rng(3).standard_normal((2, *SHAPE))

    async def calls() -> tuple[Any, ...]:
        async with AsyncClient(server_url, trust_env=False) as client:
            return await asyncio.gather(
                client.hvp(MODEL, ref.x, v, output_index=INDEX, precision=F64),
                client.hessian_trace(MODEL, ref.x, output_index=INDEX, exact=True, precision=F64),
                client.hessian_eigen(
                    MODEL, ref.x, k=1, tol=1e-10, output_index=INDEX, precision=F64
                ),
            )

    hvp, trace, eig = asyncio.run(calls())
    _close(hvp.values, (v.reshape(2, N) @ ref.hessian).reshape(2, *SHAPE))
    assert abs(float(trace.values) - float(np.trace(ref.hessian))) <= EXACT * float(
        np.abs(np.diag(ref.hessian)).sum()
    )
    _close(eig.eigenvalues, ref.eigenvalues[-1:])


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c, x: c.hvp(MODEL, x, np.ones((2, 5)), output_index=INDEX), "vectors.shape"),
        (lambda c, x: c.vjp(MODEL, x, np.ones((2, 1, 28, 28))), "vectors.shape"),
        (
            lambda c, x: c.hessian_diagonal(MODEL, x, output_index=INDEX, max_products=0),
            "max_products",
        ),
        (lambda c, x: c.hessian_eigen(MODEL, x, k=0, output_index=INDEX), "k"),
        (lambda c, x: c.hessian_trace(MODEL, np.ones((2, 2)), output_index=INDEX), "inputs"),
    ],
    ids=["hvp-vectors", "vjp-vectors", "diagonal-max_products", "eigen-k", "trace-inputs"],
)
def test_refusals_raise_with_the_field(hc: Client, ref: Reference, call: Any, field: str) -> None:
    with pytest.raises(HessianServiceError) as caught:
        call(hc, ref.x)
    assert caught.value.status == 422, caught.value
    assert caught.value.field is not None and caught.value.field.startswith(field), (
        caught.value.problem
    )
    assert caught.value.detail


def test_async_refusal_raises_with_the_field(server_url: str, ref: Reference) -> None:
    async def call() -> None:
        async with AsyncClient(server_url, trust_env=False) as client:
            await client.hvp(MODEL, ref.x, np.ones((2, 5)), output_index=INDEX)

    with pytest.raises(HessianServiceError) as caught:
        asyncio.run(call())
    assert (caught.value.status, caught.value.field) == (422, "vectors.shape")


def test_cli_operator_commands(
    server_url: str, ref: Reference, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x, v = tmp_path / "x.npy", tmp_path / "v.npy"
    np.save(x, ref.x)
    vectors = np.random.default_rng(4).standard_normal((2, *SHAPE))
    np.save(v, vectors)
    common = ["--model", MODEL, "--input", str(x), "--output-index", str(INDEX)]
    common += ["--precision", "float64", "--url", server_url]

    def run(*argv: str) -> dict[str, Any]:
        assert main([*argv, *common]) == 0
        summary: dict[str, Any] = json.loads(capsys.readouterr().out)
        return summary

    trace = run("trace", "--exact")
    assert trace["exact"] is True and trace["products"] >= 1
    assert abs(trace["trace"] - float(np.trace(ref.hessian))) <= EXACT * float(
        np.abs(np.diag(ref.hessian)).sum()
    )
    estimate = run("trace", "--estimate", "--max-products", "60", "--seed", "1")
    assert estimate["exact"] is False and estimate["standard_error"] > 0

    eigen = run("eigen", "--k", "2", "--tol", "1e-10", "--out", str(tmp_path / "e.npz"))
    _close(np.asarray(eigen["eigenvalues"]), ref.eigenvalues[::-1][:2])
    with np.load(tmp_path / "e.npz") as saved:
        assert saved["eigenvectors"].shape == (2, *SHAPE)
        _close(saved["eigenvalues"], ref.eigenvalues[::-1][:2])

    run("hvp", "--vectors", str(v), "--out", str(tmp_path / "hv.npy"))
    _close(np.load(tmp_path / "hv.npy"), (vectors.reshape(2, N) @ ref.hessian).reshape(2, *SHAPE))
    run("diagonal", "--exact", "--out", str(tmp_path / "d.npy"))
    _close(np.load(tmp_path / "d.npy"), np.diag(ref.hessian).reshape(SHAPE))

    assert main(["hvp", "--vectors", str(x), *common]) == 1  # [1, 28, 28]: not [m, 1, 28, 28]
    assert "vectors.shape" in capsys.readouterr().err
