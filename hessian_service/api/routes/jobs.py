"""``/jobs``: any derivative request as a job with progress (``serving.jobs`` does the work).

``POST /jobs`` checks the request as its endpoint would and answers 202 with the job and
its ``Location``; ``GET /jobs/{id}`` is its state and progress; ``GET /jobs/{id}/result``
the endpoint's own response body, in json, base64 or binary; ``DELETE /jobs/{id}`` cancels
a live job (it stops at its next chunk) or deletes a finished one; ``GET /jobs`` lists.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Body, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from hessian_service.api.body import counted_json_route
from hessian_service.api.examples import job_examples
from hessian_service.api.responses import problem_response, problems
from hessian_service.config import Settings
from hessian_service.errors import PROBLEM_CONTENT_TYPE
from hessian_service.serving.jobs import Job, JobStore, StoredProblem, job_operation
from hessian_service.serving.operations import Operation
from hessian_service.wire import codec
from hessian_service.wire.binary import BINARY_CONTENT_TYPE, HEADER_LENGTH, JSON_CONTENT_TYPE
from hessian_service.wire.job_schemas import JobBody, JobList, JobRequest


def get_jobs(request: Request) -> JobStore:
    jobs: JobStore = request.app.state.jobs
    return jobs


JobsDep = Annotated[JobStore, Depends(get_jobs)]


def _binary_alternative(settings: Settings) -> str:
    return (
        "Send the numbers as base64 instead: request.inputs[0].data as a string of the "
        "tensor's little-endian bytes, which may fill the whole "
        f"{settings.max_body_bytes}-byte body limit (HESSIAN_MAX_BODY_BYTES)."
    )


submit_router = APIRouter(
    tags=["jobs"], route_class=counted_json_route(JobRequest, _binary_alternative)
)
router = APIRouter(tags=["jobs"])


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        codec.dumps(body), status_code=status, media_type=JSON_CONTENT_TYPE, headers=headers
    )


def job_body(jobs: JobStore, job: Job) -> dict[str, Any]:
    """The job's body with its links."""
    links = {"self": f"/jobs/{job.id}", "result": f"/jobs/{job.id}/result"}
    return {**job.body(jobs.limits.ttl_s), "links": links}


def _validated(operation: Operation, job: JobRequest) -> Any:
    """``job.request`` as its endpoint's body; a 422 naming ``request.<field>`` exactly
    as the endpoint's own validation would name ``<field>``."""
    try:
        return operation.request_schema.model_validate(job.request)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", "request", *error["loc"])} for error in exc.errors()]
        raise RequestValidationError(errors, body={"request": job.request}) from None


def _submit(jobs: JobStore, job: JobRequest) -> Job:
    operation = job_operation(job.operation)
    return jobs.submit(operation, _validated(operation, job))


@submit_router.post(
    "/jobs",
    status_code=202,
    response_model=JobBody,
    responses={
        202: {
            "description": "Queued. `Location` is the job's URL; poll it.",
            "headers": {"Location": {"schema": {"type": "string"}}},
        },
        **problems(
            400,
            404,
            413,
            422,
            503,
            s400="The body could not be read as UTF-8 JSON.",
            s404="Unknown model or version (`field` is `request.model`, as the endpoint "
            "names `model`).",
            s413="The request is over a limit, checked before any work, as its endpoint checks it.",
            s422="`operation` is not an endpoint, or `request` fails its checks "
            "(`field` names `request.<field>`).",
            s503="The job queue (HESSIAN_MAX_QUEUED_JOBS) or store (HESSIAN_MAX_JOBS) is "
            "full: retry after `Retry-After` seconds.",
        ),
    },
    operation_id="submit_job",
    summary="Run any derivative request as a job: 202, then poll its progress",
)
async def submit_job(
    jobs: JobsDep, job: Annotated[JobRequest, Body(openapi_examples=job_examples())]
) -> Response:
    """Checks `request` exactly as its endpoint does, then queues it. The job runs in
    chunks (a few samples of a dense /hessian or /jacobian; the operators' own chunks of
    products), reports products done, and can be cancelled between chunks."""
    submitted = await anyio.to_thread.run_sync(_submit, jobs, job)
    return _json(job_body(jobs, submitted), 202, {"Location": f"/jobs/{submitted.id}"})


@router.get(
    "/jobs",
    response_model=JobList,
    operation_id="list_jobs",
    summary="Every kept job, oldest first",
)
async def list_jobs(jobs: JobsDep) -> Response:
    limits = jobs.limits
    return _json(
        {
            "jobs": [job_body(jobs, job) for job in jobs.jobs()],
            "persistent": jobs.persistent,
            "max_jobs": limits.max_jobs,
            "max_queued_jobs": limits.max_queued,
            "ttl_s": limits.ttl_s,
        }
    )


_UNKNOWN = "No such job: never submitted, deleted, or expired (`field` is `path`)."


@router.get(
    "/jobs/{job_id}",
    response_model=JobBody,
    responses=problems(404, s404=_UNKNOWN),
    operation_id="get_job",
    summary="A job's state and progress (products done, seconds left)",
)
async def get_job(job_id: str, jobs: JobsDep) -> Response:
    return _json(job_body(jobs, jobs.get(job_id)))


@router.get(
    "/jobs/{job_id}/result",
    responses={
        200: {
            "description": "The endpoint's own response body (e.g. DerivativeResponse), in "
            "the encoding asked for: application/json, or with `binary` "
            "application/octet-stream (the JSON header of `Inference-Header-Content-Length` "
            "bytes, then each output's raw bytes).",
            "content": {
                JSON_CONTENT_TYPE: {"schema": {"type": "object"}},
                BINARY_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}},
            },
            "headers": {HEADER_LENGTH: {"schema": {"type": "integer"}}},
        },
        **problems(404, 422, s404=_UNKNOWN, s422="`encoding` is not json, base64 or binary."),
        409: problem_response(
            "Not finished yet, or cancelled: `state` says which; no result to fetch"
        ),
        "4XX": problem_response(
            "A failed job: the problem its endpoint would have answered (e.g. 413, 504)"
        ),
    },
    operation_id="get_job_result",
    summary="A finished job's result, exactly as its endpoint answers it, in any encoding",
)
async def get_job_result(
    job_id: str,
    jobs: JobsDep,
    encoding: Annotated[
        Literal["json", "base64", "binary"] | None,
        Query(description="Default: the encoding of the job's request."),
    ] = None,
) -> Response:
    try:
        encoded = await anyio.to_thread.run_sync(jobs.result, job_id, encoding)
    except StoredProblem as failed:
        return Response(
            codec.dumps(failed.body), status_code=failed.status, media_type=PROBLEM_CONTENT_TYPE
        )
    return Response(encoded.body, media_type=encoded.media_type, headers=encoded.headers)


@router.delete(
    "/jobs/{job_id}",
    status_code=202,
    response_model=JobBody,
    responses={
        202: {
            "description": "Cancelling: a queued job at once, a running one at its next "
            "chunk. Not deleted: the job stays kept, and GET /jobs/{job_id} shows how it "
            "ended (`cancelled`, or `succeeded` when its last chunk ended first), until a "
            "DELETE of the finished job or HESSIAN_JOB_TTL_S."
        },
        204: {"description": "A finished job, and its result, deleted: then 404."},
        **problems(404, s404=_UNKNOWN),
    },
    operation_id="cancel_job",
    summary="Cancel a live job (frees its worker at the next chunk), or delete a finished one",
)
async def cancel_job(job_id: str, jobs: JobsDep) -> Response:
    cancelled = jobs.cancel(job_id)
    if cancelled is None:
        return Response(status_code=204)
    return _json(job_body(jobs, cancelled), 202)
