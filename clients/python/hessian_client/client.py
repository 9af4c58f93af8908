"""``Client`` (blocking) and ``AsyncClient``: one call, one tensor.

``Client(url).hessian("digits_cnn", x, output_index=2)`` sends ``x`` (numpy, torch or
nested lists) as base64, asks for the binary encoding, and returns a ``torch.Tensor``,
or a numpy array with ``as_numpy=True``. torch is optional (``hessian-client[torch]``):
without it, a call that wants a tensor raises ``TorchNotInstalledError`` before it sends
anything. Errors come as one exception type, ``HessianServiceError``, carrying the
server's problem details.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from hessian_client._arrays import Encoding, Kind, Result, as_array, converter
from hessian_client._retry import RETRY_STATUSES, RetryPolicy
from hessian_client._wire import (
    HessianServiceError,
    decode_response,
    derivative_body,
    error_from,
)
from hessian_client.bulk import InputsLike, run
from hessian_client.jobs import Job, job_request
from hessian_client.jobs import submit as submit_job
from hessian_client.operators import (
    Call,
    Eigenpairs,
    Estimate,
    OperatorResult,
    ProductResult,
    Which,
    eigen_call,
    estimate_call,
    operator_body,
    products_call,
)
from hessian_client.packing import PACKING_ORDER, unpack

DEFAULT_URL = "http://127.0.0.1:8000"
T = TypeVar("T")
R = TypeVar("R", bound=OperatorResult)
# /health/ready answers 503 while loading: that is the answer, so only 429 is retried.
NOT_READY_RETRIES = frozenset({429})


def _result(kind: Kind, response: httpx.Response) -> Result:
    decoded = decode_response(response.content, response.headers)
    body = decoded.body
    value = decoded.arrays[kind]
    packing = (body.get("metadata") or {}).get("packing") or {}
    if packing.get("complete") and packing.get("order") == PACKING_ORDER:
        value = unpack(value, int(packing["n"]))  # the symmetric matrix, values unchanged
    return Result(
        value=value,
        output=decoded.arrays["output"],
        metadata=body.get("metadata", {}),
        model=body.get("model", ""),
        model_version=body.get("model_version", ""),
    )


class _Base:
    def __init__(self, retries: int, backoff: float, max_backoff: float) -> None:
        self.retry = RetryPolicy(retries=retries, backoff=backoff, max_backoff=max_backoff)

    @staticmethod
    def _not_ready(exc: HessianServiceError) -> dict[str, Any]:
        """A 503 from /health/ready is an answer (loading), not an error; others raise."""
        if exc.status != 503:
            raise exc
        return {**exc.problem, "ready": False}

    def _transport_error(self, what: str, exc: Exception) -> HessianServiceError:
        error = HessianServiceError(
            f"{what}: {type(exc).__name__}: {exc} (after {self.retry.retries + 1} tries)"
        )
        error.__cause__ = exc
        return error

    @staticmethod
    def _body(
        model: str,
        x: Any,
        output_index: int | list[int] | None,
        objective: dict[str, Any] | None,
        encoding: Encoding,
        layout: str,
        precision: str,
        rows: tuple[int, int] | None = None,
        result_precision: str | None = None,
    ) -> dict[str, Any]:
        return derivative_body(
            model,
            as_array(x),
            output_index=output_index,
            objective=objective,
            encoding=encoding,
            layout=layout,
            precision=precision,
            rows=rows,
            result_precision=result_precision,
        )


class Client(_Base):
    """A blocking client for one hessian-service.

    ``retries`` further tries on 429/503 (after ``Retry-After`` when the server sends one)
    and on connection failures, with exponential backoff from ``backoff`` seconds.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        timeout: float = 300.0,
        retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        headers: dict[str, str] | None = None,
        trust_env: bool = True,
    ) -> None:
        super().__init__(retries, backoff, max_backoff)
        self.url = url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.url, timeout=timeout, headers=headers, trust_env=trust_env
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        retry_statuses: frozenset[int] = RETRY_STATUSES,
        consume: Callable[[httpx.Response], T] | None = None,
    ) -> Any:
        """Send with retries; raise ``HessianServiceError`` on an error status.

        With ``consume`` the response is streamed and ``consume(response)`` reads it (a
        failure while reading is retried too); otherwise the read response is returned.
        """
        what = f"{method} {path}"
        attempt = 0
        while True:
            try:
                with self.http.stream(method, path, json=json) as response:
                    if response.status_code in retry_statuses and attempt < self.retry.retries:
                        response.close()
                        time.sleep(self.retry.delay(attempt, response.headers.get("retry-after")))
                        attempt += 1
                        continue
                    if response.is_error:
                        raise error_from(response.status_code, response.read(), what)
                    if consume is not None:
                        return consume(response)
                    response.read()
                    return response
            except httpx.TransportError as exc:
                if attempt >= self.retry.retries:
                    raise self._transport_error(what, exc) from exc
                time.sleep(self.retry.delay(attempt))
                attempt += 1

    def health(self) -> dict[str, Any]:
        """``GET /health/ready``'s body, with ``ready``: whether requests can be served."""
        try:
            response = self.request("GET", "/health/ready", retry_statuses=NOT_READY_RETRIES)
        except HessianServiceError as exc:
            return self._not_ready(exc)
        return {**response.json(), "ready": True}

    def models(self) -> list[dict[str, Any]]:
        """Every model the server knows: name, version, input and output shapes, ..."""
        models: list[dict[str, Any]] = self.request("GET", "/models").json()["models"]
        return models

    def model(self, name: str) -> dict[str, Any]:
        """One model's description (404 as ``HessianServiceError`` when it is unknown)."""
        info: dict[str, Any] = self.request("GET", f"/models/{name}").json()
        return info

    def compute(
        self,
        kind: Kind,
        model: str,
        x: Any,
        *,
        output_index: int | list[int] | None = None,
        objective: dict[str, Any] | None = None,
        layout: str = "matrix",
        precision: str = "float32",
        encoding: Encoding = "binary",
        rows: tuple[int, int] | None = None,
        result_precision: str | None = None,
    ) -> Result:
        """The whole answer of one /hessian or /jacobian request, as numpy arrays."""
        body = self._body(
            model, x, output_index, objective, encoding, layout, precision, rows, result_precision
        )
        return _result(kind, self.request("POST", f"/{kind}", json=body))

    def hessian(
        self,
        model: str,
        x: Any,
        *,
        output_index: int | list[int] | None = None,
        objective: dict[str, Any] | None = None,
        layout: str = "matrix",
        precision: str = "float32",
        encoding: Encoding = "binary",
        as_numpy: bool = False,
        rows: tuple[int, int] | None = None,
        result_precision: str | None = None,
    ) -> Any:
        """The input Hessian: ``[n, n]`` for one sample, ``[B, n, n]`` for a batch.

        ``rows=(a, b)``: only rows a..b, ``[b - a, n]``. ``layout="packed"`` sends half
        the bytes (the upper triangle) and is unpacked here to the symmetric matrix
        (a segment of rows stays packed: ``hessian_client.packing.unpack``).
        ``result_precision="float16"`` / ``"bfloat16"`` halves the bytes again (float16
        comes back as float16, bfloat16 widened to float32).
        A ``torch.Tensor``, or a numpy array with ``as_numpy=True``; without torch
        installed, a tensor call raises ``TorchNotInstalledError`` and sends nothing.
        """
        convert = converter(as_numpy)  # before sending: no torch, no server work
        result = self.compute(
            "hessian",
            model,
            x,
            output_index=output_index,
            objective=objective,
            layout=layout,
            precision=precision,
            encoding=encoding,
            rows=rows,
            result_precision=result_precision,
        )
        return convert(result.value)

    def jacobian(
        self,
        model: str,
        x: Any,
        *,
        output_index: int | list[int] | None = None,
        objective: dict[str, Any] | None = None,
        layout: str = "matrix",
        precision: str = "float32",
        encoding: Encoding = "binary",
        as_numpy: bool = False,
    ) -> Any:
        """The input Jacobian: ``[m, n]`` (all outputs), ``[n]`` for one index, ..."""
        convert = converter(as_numpy)  # before sending: no torch, no server work
        result = self.compute(
            "jacobian",
            model,
            x,
            output_index=output_index,
            objective=objective,
            layout=layout,
            precision=precision,
            encoding=encoding,
        )
        return convert(result.value)

    def _operate(self, call: Call[R]) -> R:
        """Send one operator request (``hessian_client.operators``) and read its answer."""
        response = self.request("POST", call.route, json=call.body)
        return call.read(response.content, response.headers)

    def hvp(
        self,
        model: str,
        x: Any,
        vectors: Any,
        output_index: int | list[int] | None = None,
        objective: dict[str, Any] | None = None,
        *,
        precision: str = "float32",
        encoding: Encoding = "binary",
    ) -> ProductResult:
        """Hessian-vector products ``H v`` of one scalar (an int ``output_index``, an
        ``objective``, or a one-output model) without forming ``H``: ``vectors``
        ``[m, *input_shape]`` (shared by a batch) or ``[B, m, *input_shape]``; ``values``
        has the vectors' shape. Exact; m products per sample."""
        body = operator_body(model, x, output_index, objective, precision, encoding)
        return self._operate(products_call("hvp", body, vectors))

    def jvp(
        self,
        model: str,
        x: Any,
        vectors: Any,
        output_index: int | list[int] | None = None,
        objective: dict[str, Any] | None = None,
        *,
        precision: str = "float32",
        encoding: Encoding = "binary",
    ) -> ProductResult:
        """Jacobian-vector products ``J v`` of the selected outputs (all without
        ``output_index``) along input-shaped ``vectors`` ``[m, *input_shape]``:
        ``values`` ``[m, *output_shape]`` (``[m, k]`` for k indices). Exact."""
        body = operator_body(model, x, output_index, objective, precision, encoding)
        return self._operate(products_call("jvp", body, vectors))

    def vjp(
        self,
        model: str,
        x: Any,
        vectors: Any,
        output_index: int | list[int] | None = None,
        objective: dict[str, Any] | None = None,
        *,
        precision: str = "float32",
        encoding: Encoding = "binary",
    ) -> ProductResult:
        """Vector-Jacobian products ``u^T J`` for covectors ``vectors`` ``[m,
        *output_shape]`` (``[m, k]`` for k indices): ``values`` ``[m, *input_shape]``."""
        body = operator_body(model, x, output_index, objective, precision, encoding)
        return self._operate(products_call("vjp", body, vectors))

    def hessian_diagonal(
        self,
        model: str,
        x: Any,
        output_index: int | list[int] | None = None,
        objective: dict[str, Any] | None = None,
        exact: bool | None = None,
        max_products: int | None = None,
        seed: int = 0,
        *,
        precision: str = "float32",
        encoding: Encoding = "binary",
    ) -> Estimate:
        """The Hessian's diagonal in the input's shape. ``exact=True``: exact or a 413;
        ``False``: a seeded estimate from ``max_products`` products with its
        ``standard_error``; None: exact when the server's planner says it fits."""
        body = operator_body(model, x, output_index, objective, precision, encoding)
        return self._operate(estimate_call("diagonal", body, exact, max_products, seed))

    def hessian_trace(
        self,
        model: str,
        x: Any,
        output_index: int | list[int] | None = None,
        objective: dict[str, Any] | None = None,
        exact: bool | None = None,
        max_products: int | None = None,
        seed: int = 0,
        *,
        precision: str = "float32",
        encoding: Encoding = "binary",
    ) -> Estimate:
        """The Hessian's trace (the Laplacian): a 0-d ``values`` per sample (``[B]``);
        exact, or Hutch++ with its ``standard_error``, as ``hessian_diagonal``."""
        body = operator_body(model, x, output_index, objective, precision, encoding)
        return self._operate(estimate_call("trace", body, exact, max_products, seed))

    def hessian_eigen(
        self,
        model: str,
        x: Any,
        k: int = 5,
        which: Which = "largest",
        tol: float = 1e-6,
        max_products: int | None = None,
        *,
        output_index: int | list[int] | None = None,
        objective: dict[str, Any] | None = None,
        seed: int = 0,
        precision: str = "float32",
        encoding: Encoding = "binary",
    ) -> Eigenpairs:
        """k eigenpairs (``which``: largest, smallest or magnitude) by Lanczos on
        Hessian-vector products, with residuals and ``converged`` (every residual within
        ``tol`` x the largest |eigenvalue|); at most ``max_products`` products."""
        body = operator_body(model, x, output_index, objective, precision, encoding)
        return self._operate(eigen_call(body, k, which, tol, max_products, seed))

    def bulk_hessian(self, model: str, inputs: InputsLike, **options: Any) -> Path:
        """Hessians of many inputs streamed to a file; see ``hessian_client.bulk.run``."""
        return run(self, "hessian", model, inputs, **options)

    def bulk_jacobian(self, model: str, inputs: InputsLike, **options: Any) -> Path:
        """Jacobians of many inputs streamed to a file; see ``hessian_client.bulk.run``."""
        return run(self, "jacobian", model, inputs, **options)

    def submit(self, operation: str, **request: Any) -> Job:
        """Run one request as a job (``POST /jobs``) and return it at once.

        ``operation`` is the endpoint (``hessian``, ``/hvp``, ``hessian/trace``, ...);
        ``request`` its body's fields, with ``x`` the input (any array: sent as base64)
        and other arrays (``vectors``) sent as tensor objects; encoding binary unless
        given. The request is checked before it is queued: its 4xx raises here.
        ``job.wait()`` shows progress, ``job.result()`` fetches the answer.
        """
        return submit_job(self, operation, job_request(**request))

    def job(self, job_id: str) -> Job:
        """A job submitted earlier (by id), with its current status."""
        job = Job(self, {"id": job_id})
        job.status()
        return job

    def jobs(self) -> list[dict[str, Any]]:
        """``GET /jobs``: every job the server keeps, oldest first."""
        jobs: list[dict[str, Any]] = self.request("GET", "/jobs").json()["jobs"]
        return jobs


class AsyncClient(_Base):
    """The asyncio twin of ``Client`` (httpx.AsyncClient), with the same retries."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        timeout: float = 300.0,
        retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        headers: dict[str, str] | None = None,
        trust_env: bool = True,
    ) -> None:
        super().__init__(retries, backoff, max_backoff)
        self.url = url.rstrip("/")
        self.http = httpx.AsyncClient(
            base_url=self.url, timeout=timeout, headers=headers, trust_env=trust_env
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        retry_statuses: frozenset[int] = RETRY_STATUSES,
    ) -> httpx.Response:
        """Send with retries; raise ``HessianServiceError`` on an error status."""
        what = f"{method} {path}"
        attempt = 0
        while True:
            try:
                response = await self.http.request(method, path, json=json)
            except httpx.TransportError as exc:
                if attempt >= self.retry.retries:
                    raise self._transport_error(what, exc) from exc
                await asyncio.sleep(self.retry.delay(attempt))
                attempt += 1
                continue
            if response.status_code in retry_statuses and attempt < self.retry.retries:
                await asyncio.sleep(self.retry.delay(attempt, response.headers.get("retry-after")))
                attempt += 1
                continue
            if response.is_error:
                raise error_from(response.status_code, response.content, what)
            return response

    async def health(self) -> dict[str, Any]:
        """``GET /health/ready``'s body, with ``ready``: whether requests can be served."""
        try:
            response = await self.request("GET", "/health/ready", retry_statuses=NOT_READY_RETRIES)
        except HessianServiceError as exc:
            return self._not_ready(exc)
        return {**response.json(), "ready": True}

    async def models(self) -> list[dict[str, Any]]:
        """Every model the server knows."""
        models: list[dict[str, Any]] = (await self.request("GET", "/models")).json()["models"]
        return models

    async def model(self, name: str) -> dict[str, Any]:
        """One model's description."""
        info: dict[str, Any] = (await self.request("GET", f"/models/{name}")).json()
        return info

    async def compute(
        self,
        kind: Kind,
        model: str,
        x: Any,
        *,
        output_index: int | list[int] | None = None,
        objective: dict[str, Any] | None = None,
        layout: str = "matrix",
        precision: str = "float32",
        encoding: Encoding = "binary",
        rows: tuple[int, int] | None = None,
        result_precision: str | None = None,
    ) -> Result:
        """The whole answer of one /hessian or /jacobian request, as numpy arrays."""
        body = self._body(
            model, x, output_index, objective, encoding, layout, precision, rows, result_precision
        )
        return _result(kind, await self.request("POST", f"/{kind}", json=body))

    async def hessian(
        self,
        model: str,
        x: Any,
        *,
        output_index: int | list[int] | None = None,
        objective: dict[str, Any] | None = None,
        layout: str = "matrix",
        precision: str = "float32",
        encoding: Encoding = "binary",
        as_numpy: bool = False,
        rows: tuple[int, int] | None = None,
        result_precision: str | None = None,
    ) -> Any:
        """The input Hessian, as ``Client.hessian``."""
        convert = converter(as_numpy)  # before sending: no torch, no server work
        result = await self.compute(
            "hessian",
            model,
            x,
            output_index=output_index,
            objective=objective,
            layout=layout,
            precision=precision,
            encoding=encoding,
            rows=rows,
            result_precision=result_precision,
        )
        return convert(result.value)

    async def jacobian(
        self,
        model: str,
        x: Any,
        *,
        output_index: int | list[int] | None = None,
        objective: dict[str, Any] | None = None,
        layout: str = "matrix",
        precision: str = "float32",
        encoding: Encoding = "binary",
        as_numpy: bool = False,
    ) -> Any:
        """The input Jacobian, as ``Client.jacobian``."""
        convert = converter(as_numpy)  # before sending: no torch, no server work
        result = await self.compute(
            "jacobian",
            model,
            x,
            output_index=output_index,
            objective=objective,
            layout=layout,
            precision=precision,
            encoding=encoding,
        )
        return convert(result.value)

    async def _operate(self, call: Call[R]) -> R:
        """Send one operator request (``hessian_client.operators``) and read its answer."""
        response = await self.request("POST", call.route, json=call.body)
        return call.read(response.content, response.headers)

    async def hvp(
        self,
        model: str,
        x: Any,
        vectors: Any,
        output_index: int | list[int] | None = None,
        objective: dict[str, Any] | None = None,
        *,
        precision: str = "float32",
        encoding: Encoding = "binary",
    ) -> ProductResult:
        """Hessian-vector products, as ``Client.hvp``."""
        body = operator_body(model, x, output_index, objective, precision, encoding)
        return await self._operate(products_call("hvp", body, vectors))

    async def jvp(
        self,
        model: str,
        x: Any,
        vectors: Any,
        output_index: int | list[int] | None = None,
        objective: dict[str, Any] | None = None,
        *,
        precision: str = "float32",
        encoding: Encoding = "binary",
    ) -> ProductResult:
        """Jacobian-vector products, as ``Client.jvp``."""
        body = operator_body(model, x, output_index, objective, precision, encoding)
        return await self._operate(products_call("jvp", body, vectors))

    async def vjp(
        self,
        model: str,
        x: Any,
        vectors: Any,
        output_index: int | list[int] | None = None,
        objective: dict[str, Any] | None = None,
        *,
        precision: str = "float32",
        encoding: Encoding = "binary",
    ) -> ProductResult:
        """Vector-Jacobian products, as ``Client.vjp``."""
        body = operator_body(model, x, output_index, objective, precision, encoding)
        return await self._operate(products_call("vjp", body, vectors))

    async def hessian_diagonal(
        self,
        model: str,
        x: Any,
        output_index: int | list[int] | None = None,
        objective: dict[str, Any] | None = None,
        exact: bool | None = None,
        max_products: int | None = None,
        seed: int = 0,
        *,
        precision: str = "float32",
        encoding: Encoding = "binary",
    ) -> Estimate:
        """The Hessian's diagonal, as ``Client.hessian_diagonal``."""
        body = operator_body(model, x, output_index, objective, precision, encoding)
        return await self._operate(estimate_call("diagonal", body, exact, max_products, seed))

    async def hessian_trace(
        self,
        model: str,
        x: Any,
        output_index: int | list[int] | None = None,
        objective: dict[str, Any] | None = None,
        exact: bool | None = None,
        max_products: int | None = None,
        seed: int = 0,
        *,
        precision: str = "float32",
        encoding: Encoding = "binary",
    ) -> Estimate:
        """The Hessian's trace, as ``Client.hessian_trace``."""
        body = operator_body(model, x, output_index, objective, precision, encoding)
        return await self._operate(estimate_call("trace", body, exact, max_products, seed))

    async def hessian_eigen(
        self,
        model: str,
        x: Any,
        k: int = 5,
        which: Which = "largest",
        tol: float = 1e-6,
        max_products: int | None = None,
        *,
        output_index: int | list[int] | None = None,
        objective: dict[str, Any] | None = None,
        seed: int = 0,
        precision: str = "float32",
        encoding: Encoding = "binary",
    ) -> Eigenpairs:
        """k eigenpairs of the Hessian, as ``Client.hessian_eigen``."""
        body = operator_body(model, x, output_index, objective, precision, encoding)
        return await self._operate(eigen_call(body, k, which, tol, max_products, seed))
