"""serving.jobs with the real service and engine: chunked results, states, bounds, expiry,
and the job folder.

Jobs are submitted to a ``JobStore`` on a real ``DerivativeService`` over the bundled
models. A chunked job's Hessians are checked against ``torch.func.hessian`` of the
model in float64 (1e-10 relative), with per-sample objective targets that must follow
their own samples through the chunks; the stored result, re-encoded, against the body
the endpoint builds (values equal in every encoding). The ``busy`` hook a store takes
(what it waits on between chunks) is used to act between two chunks deterministically.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hessian_service.config import BUNDLED_MODELS_DIR, Settings
from hessian_service.errors import Conflict, InvalidInput, NotFound, Overloaded, ServiceError
from hessian_service.repository.registry import Registry
from hessian_service.serving.job_results import StoredResult
from hessian_service.serving.jobs import (
    Job,
    JobLimits,
    JobState,
    JobStore,
    StoredProblem,
    job_operation,
)
from hessian_service.serving.operations import operation_for
from hessian_service.serving.request import PreparedRequest
from hessian_service.serving.service import DerivativeService
from hessian_service.wire import codec
from hessian_service.wire.binary import HEADER_LENGTH
from hessian_service.wire.schemas import DerivativeRequest

HESSIAN = operation_for("hessian")
WAIT_S = 60.0  # every wait below is bounded by this


@pytest.fixture(scope="module")
def service() -> Iterator[DerivativeService]:
    registry = Registry(torch.device("cpu"))
    registry.load_dir(BUNDLED_MODELS_DIR)
    service = DerivativeService(registry, Settings(device="cpu", access_log=False))
    yield service
    service.close()


@pytest.fixture
def stores() -> Iterator[Callable[..., JobStore]]:
    """Make started stores on the service; every one is closed after the test."""
    made: list[JobStore] = []

    def make(
        service: DerivativeService, *, start: bool = True, folder: Path | None = None, **limits: Any
    ) -> JobStore:
        busy = limits.pop("busy", None)
        store = JobStore(service, JobLimits(**limits), folder=folder, busy=busy)
        if start:
            store.start()
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def _request(model: str, x: np.ndarray, **fields: Any) -> DerivativeRequest:
    data = base64.b64encode(np.ascontiguousarray(x).tobytes()).decode()
    datatype = "FP64" if x.dtype == np.float64 else "FP32"
    tensor = {"shape": list(x.shape), "datatype": datatype, "data": data}
    return DerivativeRequest.model_validate({"model": model, "inputs": [tensor], **fields})


def _digits(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, 1, 28, 28))


def _wait(store: JobStore, job: Job) -> Job:
    deadline = time.monotonic() + WAIT_S
    while not store.get(job.id).state.finished:
        assert time.monotonic() < deadline, f"job still {job.state} after {WAIT_S} s"
        time.sleep(0.01)
    return store.get(job.id)


def _arrays(encoded_body: bytes, headers: dict[str, str]) -> dict[str, np.ndarray]:
    """The outputs of a json, base64 or binary body, by name (decoded independently of
    the service's codec)."""
    length = int(headers.get(HEADER_LENGTH, len(encoded_body)))
    body = json.loads(encoded_body[:length])
    tail, offset, arrays = encoded_body[length:], 0, {}
    for output in body["outputs"]:
        dtype = {"FP32": "<f4", "FP64": "<f8"}[output["datatype"]]
        if "parameters" in output and output["parameters"].get("binary_data_size") is not None:
            size = output["parameters"]["binary_data_size"]
            flat = np.frombuffer(tail[offset : offset + size], dtype=dtype)
            offset += size
        elif isinstance(output["data"], str):
            flat = np.frombuffer(base64.b64decode(output["data"]), dtype=dtype)
        else:
            flat = np.asarray(output["data"], dtype=dtype)
        arrays[output["name"]] = flat.reshape(output["shape"])
    return arrays


def test_chunked_hessians_equal_torch_func_with_per_sample_targets(
    service: DerivativeService, stores: Callable[..., JobStore]
) -> None:
    """Three samples, one per chunk (784 products each), cross-entropy classes per
    sample: each Hessian equals torch.func.hessian of its own sample's loss."""
    store = stores(service, chunk_products=784)
    x, classes = _digits(3), [4, 1, 7]
    request = _request(
        "mlp_tanh",
        x,
        objective={"type": "cross_entropy", "target": classes},
        precision="float64",
        encoding="binary",
    )
    job = _wait(store, store.submit(HESSIAN, request))
    assert job.state is JobState.SUCCEEDED, job.problem
    snap = job.snapshot()
    assert (snap.done, snap.total) == (3 * 784, 3 * 784)
    encoded = store.result(job.id, "binary")
    hessians = _arrays(encoded.body, encoded.headers)["hessian"]
    module = service.registry.get("mlp_tanh").for_dtype(torch.float64)
    for i, target in enumerate(classes):

        def loss(flat: torch.Tensor, target: int = target) -> torch.Tensor:
            logits = module(flat.reshape(1, 1, 28, 28))[0]
            return -torch.log_softmax(logits, dim=0)[target]

        reference = torch.func.hessian(loss)(torch.from_numpy(x[i].reshape(-1)))
        error = np.abs(hessians[i] - reference.numpy()).max() / np.abs(reference.numpy()).max()
        assert error < 1e-10, (i, error)


def test_result_in_every_encoding_equals_the_endpoint_body(
    service: DerivativeService, stores: Callable[..., JobStore]
) -> None:
    """json, base64 and binary of the stored result carry the values the endpoint's own
    body (prepare -> compute -> describe -> encode) carries, and the same metadata."""
    store = stores(service, chunk_products=784)
    request = _request("digits_cnn", _digits(2, seed=1).astype(np.float32), output_index=3)
    job = _wait(store, store.submit(HESSIAN, request))
    assert job.state is JobState.SUCCEEDED
    prepared = service.prepare("hessian", request)
    assert isinstance(prepared, PreparedRequest)
    for encoding in ("json", "base64", "binary"):
        direct_request = prepared.request.model_copy(update={"encoding": encoding})
        result, ms = service.compute(prepared)
        body = service.describe(replace(prepared, request=direct_request), result, ms)
        direct = codec.encode_body(body, encoding)
        fetched = store.result(job.id, encoding)
        assert fetched.media_type == direct.media_type
        ours, theirs = (
            _arrays(fetched.body, fetched.headers),
            _arrays(direct.body, direct.headers),
        )
        assert ours.keys() == theirs.keys() == {"hessian", "output"}
        for name in ours:  # chunks of one sample vs one batch of two: float32 rounding
            np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-6)
        length = int(fetched.headers.get(HEADER_LENGTH, len(fetched.body)))
        metadata = json.loads(fetched.body[:length])["metadata"]
        assert metadata["batch_size"] == 2 and metadata["output_index"] == 3


def test_cancel_between_chunks_stops_at_the_next_chunk(
    service: DerivativeService, stores: Callable[..., JobStore]
) -> None:
    """DELETE arriving after the first chunk: the job does no second chunk, ends
    cancelled, has no result (409 naming the state), and the worker takes the next job."""
    holder: dict[str, JobStore] = {}
    cancelled_after: list[int] = []

    def busy() -> bool:  # runs between chunks, on the job's thread
        store = holder["store"]
        for job in store.jobs():
            if job.state is JobState.RUNNING and not cancelled_after:
                cancelled_after.append(job.snapshot().done)
                store.cancel(job.id)
        return False

    store = stores(service, chunk_products=784, busy=busy)
    holder["store"] = store
    long = store.submit(HESSIAN, _request("mlp_tanh", _digits(6), output_index=0))
    job = _wait(store, long)
    assert job.state is JobState.CANCELLED and job.cancel_requested
    assert cancelled_after == [784] and job.snapshot().done == 784
    with pytest.raises(Conflict, match="is cancelled") as conflict:
        store.result(job.id)
    assert conflict.value.extra["state"] == "cancelled"
    follow = _wait(
        store, store.submit(HESSIAN, _request("quadratic4", np.full(4, 2.0), output_index=2))
    )
    assert follow.state is JobState.SUCCEEDED
    hessian = _arrays(store.result(follow.id, "json").body, {})["hessian"]
    np.testing.assert_array_equal(hessian, np.diag([0.0, 0.0, 2.0 * 2.0, 0.0]))
    assert store.cancel(job.id) is None  # a finished job is deleted
    with pytest.raises(NotFound):
        store.get(job.id)


def test_queue_and_store_bounds(
    service: DerivativeService, stores: Callable[..., JobStore]
) -> None:
    """Not started (no thread takes jobs): the queue's bound is 503; a queued job is
    cancelled at once; a store full of live jobs is 503, one with a finished job evicts it."""
    small = _request("quadratic4", np.ones(4), output_index=1)
    queue = stores(service, start=False, max_queued=1, max_jobs=5)
    first = queue.submit(HESSIAN, small)
    assert first.state is JobState.QUEUED and first.body(1.0)["progress"]["total"] == 4
    with pytest.raises(Overloaded, match="HESSIAN_MAX_QUEUED_JOBS") as full:
        queue.submit(HESSIAN, small)
    assert full.value.headers["Retry-After"] == "5"
    cancelled = queue.cancel(first.id)
    assert cancelled is not None and cancelled.state is JobState.CANCELLED
    queue.submit(HESSIAN, small)  # room again
    kept = stores(service, start=False, max_queued=5, max_jobs=2)
    one, _two = kept.submit(HESSIAN, small), kept.submit(HESSIAN, small)
    with pytest.raises(Overloaded, match="HESSIAN_MAX_JOBS"):
        kept.submit(HESSIAN, small)
    kept.cancel(one.id)  # finished now: the next job evicts it
    three = kept.submit(HESSIAN, small)
    assert [job.id for job in kept.jobs()] == [_two.id, three.id]
    with pytest.raises(Overloaded, match="HESSIAN_MAX_JOBS"):
        kept.submit(HESSIAN, small)


def test_checks_before_work_name_the_request_field(
    service: DerivativeService, stores: Callable[..., JobStore]
) -> None:
    store = stores(service, start=False)
    with pytest.raises(InvalidInput, match=r"request\.output_index: 9 is out of range") as bad:
        store.submit(HESSIAN, _request("quadratic4", np.ones(4), output_index=9))
    assert bad.value.field == "request.output_index"
    with pytest.raises(NotFound) as unknown:
        store.submit(HESSIAN, _request("nope", np.ones(4), output_index=0))
    assert unknown.value.field == "request.model"
    with pytest.raises(InvalidInput) as png:
        store.submit(HESSIAN, _request("quadratic4", np.ones(4), output_index=0, encoding="png"))
    assert png.value.field == "request.encoding"
    assert store.jobs() == []


def test_operation_names() -> None:
    assert job_operation("/hessian").kind == "hessian"
    assert job_operation("jacobian").kind == "jacobian"
    with pytest.raises(InvalidInput, match="expected one of /jacobian, /hessian") as error:
        job_operation("/hessians")
    assert error.value.field == "operation"


def test_finished_jobs_expire(service: DerivativeService, stores: Callable[..., JobStore]) -> None:
    store = stores(service, ttl_s=0.2)
    job = _wait(store, store.submit(HESSIAN, _request("quadratic4", np.ones(4), output_index=0)))
    assert job.body(0.2)["expires"] is not None
    time.sleep(0.3)
    with pytest.raises(NotFound, match="expired"):
        store.get(job.id)


def test_result_bytes_evict_oldest_and_refuse_what_never_fits(
    service: DerivativeService, stores: Callable[..., JobStore]
) -> None:
    """One mlp_tanh Hessian is ~2.46 MB as binary: a 4 MB store keeps one at a time (the
    older is evicted), a 1 MB one keeps none (413 naming the setting, as the result)."""
    request = _request("mlp_tanh", _digits(1)[0].astype(np.float32), output_index=0)
    store = stores(service, max_result_bytes=4_000_000)
    first = _wait(store, store.submit(HESSIAN, request))
    second = _wait(store, store.submit(HESSIAN, request))
    assert first.state is second.state is JobState.SUCCEEDED
    assert [job.id for job in store.jobs()] == [second.id]
    tiny = stores(service, max_result_bytes=1_000_000)
    failed = _wait(tiny, tiny.submit(HESSIAN, request))
    assert failed.state is JobState.FAILED and failed.problem is not None
    assert failed.problem["status"] == 413
    assert failed.problem["setting"] == "HESSIAN_MAX_JOB_RESULT_BYTES"
    with pytest.raises(StoredProblem) as answered:
        tiny.result(failed.id)
    assert answered.value.status == 413


def test_running_past_the_job_timeout_fails_504(
    service: DerivativeService, stores: Callable[..., JobStore]
) -> None:
    def slow() -> bool:  # between chunks: make the first chunk end past the deadline
        time.sleep(0.06)
        return False

    store = stores(service, timeout_s=0.05, chunk_products=784, busy=slow)
    job = _wait(store, store.submit(HESSIAN, _request("mlp_tanh", _digits(3), output_index=0)))
    assert job.state is JobState.FAILED and job.problem is not None
    assert job.problem["status"] == 504 and "HESSIAN_JOB_TIMEOUT_S" in job.problem["detail"]
    assert job.snapshot().done < 3 * 784


def test_job_folder_survives_a_restart(
    service: DerivativeService, stores: Callable[..., JobStore], tmp_path: Path
) -> None:
    """A finished job comes back with its result, byte for byte; one that was queued
    when the process died (no close) comes back failed, saying so; memory stores say
    they are not persistent."""
    assert not stores(service, start=False).jobs() and not JobStore(service, JobLimits()).persistent
    folder = tmp_path / "jobs"
    first = stores(service, folder=folder)
    done = _wait(
        first, first.submit(HESSIAN, _request("quadratic4", np.full(4, 3.0), output_index=3))
    )
    before = first.result(done.id, "binary").body
    first.close()
    crashed = stores(service, folder=folder, start=False)
    orphan = crashed.submit(HESSIAN, _request("quadratic4", np.ones(4), output_index=0))
    # ... the process dies here: no close(), the record says queued
    second = stores(service, folder=folder)
    again = second.get(done.id)
    assert again.state is JobState.SUCCEEDED and again.persistent
    assert again.body(3600)["persistent"] is True
    assert second.result(done.id, "binary").body == before
    hessian = _arrays(second.result(done.id, "json").body, {})["hessian"]
    np.testing.assert_array_equal(hessian, np.diag([0.0, 0.0, 0.0, 2.0 * 3.0]))
    lost = second.get(orphan.id)
    assert lost.state is JobState.FAILED and lost.problem is not None
    assert "stopped before" in lost.problem["detail"]
    assert second.cancel(done.id) is None
    assert not (folder / f"{done.id}.json").exists() and not (folder / f"{done.id}.result").exists()


def test_stored_result_round_trip() -> None:
    """Every datatype the codec writes survives the binary form and re-encoding."""
    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7,
        "b": torch.tensor([1.5, -2.25], dtype=torch.float64),
        "c": torch.tensor([0.5, 3.0], dtype=torch.bfloat16),
        "d": torch.empty(0, dtype=torch.float16),
    }
    body = {
        "model": "m",
        "outputs": [codec.tensor_object(name, t, "binary") for name, t in tensors.items()],
    }
    stored = StoredResult.of(body)
    for encoding in ("json", "base64", "binary"):
        expected = codec.encode_body(
            {
                "model": "m",
                "outputs": [codec.tensor_object(name, t, encoding) for name, t in tensors.items()],
            },
            encoding,
        )
        assert stored.encoded(encoding).body == expected.body, encoding


def test_service_error_is_a_failed_job(service: DerivativeService) -> None:
    """A problem stored for a failed job answers with its own status."""
    problem = StoredProblem({"status": 507, "detail": "x: out of memory", "field": "x"})
    assert isinstance(problem, ServiceError) and problem.status == 507 and problem.field == "x"
