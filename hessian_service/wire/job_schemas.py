"""Bodies of the job API (``POST /jobs``, ``GET /jobs/{id}``, ``GET /jobs``): pydantic only.

A job carries the body its endpoint takes, unchanged, under ``request``, and names the
endpoint in ``operation``; ``GET /jobs/{id}/result`` answers that endpoint's response body
(``DerivativeResponse`` and its siblings), so it has no schema of its own here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobStateName = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobRequest(BaseModel):
    """Body of ``POST /jobs``: which operation, and the body its endpoint takes."""

    model_config = ConfigDict(extra="forbid")

    operation: str = Field(
        ...,
        max_length=64,
        description="The endpoint the request is for: its path (`/hessian`, `/jacobian`, "
        "`/hvp`, `/hessian/trace`, ...) or its kind (`hessian`, `hessian/trace`, "
        "`hessian_trace`).",
        examples=["/hessian"],
    )
    request: dict[str, Any] = Field(
        ...,
        description="Exactly the body that endpoint takes, checked as the endpoint checks "
        "it (404, 413 and 422 come back at once, before any work). Its `encoding` (json, "
        "base64 or binary; not png) is what the result is fetched in unless "
        "`GET /jobs/{id}/result?encoding=` says otherwise.",
    )


class JobProgressBody(BaseModel):
    """Work done, in products (one Hessian-, Jacobian- or vector-Jacobian product, or one
    row of a dense matrix), of the planned total, and the time left at the rate so far."""

    done: int
    total: int = Field(description="Planned products (it may grow while an estimator runs).")
    fraction: float = Field(description="done / total, 0 to 1.")
    seconds_left: float | None = Field(
        description="Estimated from the rate so far; null before the first chunk, when "
        "queued, failed or cancelled; 0 once succeeded."
    )
    elapsed_s: float = Field(description="Seconds the job has been (or was) running.")
    unit: Literal["products"] = "products"


class JobLinks(BaseModel):
    self: str = Field(description="`/jobs/{id}`: poll it.")
    result: str = Field(description="`/jobs/{id}/result`: the result once succeeded.")


class JobBody(BaseModel):
    """A job: what it computes, where it is, and when."""

    id: str
    state: JobStateName = Field(
        description="queued -> running -> succeeded | failed | cancelled (a queued job "
        "can go straight to cancelled)."
    )
    operation: str = Field(description="The kind: `hessian`, `jacobian`, `hessian/trace`, ...")
    model: str
    model_version: str
    samples: int = Field(description="Samples in the request's batch.")
    encoding: str = Field(description="What GET /jobs/{id}/result answers in by default.")
    progress: JobProgressBody
    created: str = Field(description="ISO 8601, UTC.")
    started: str | None
    finished: str | None
    expires: str | None = Field(
        description="When a finished job is forgotten (HESSIAN_JOB_TTL_S after it finished)."
    )
    cancel_requested: bool = Field(
        description="DELETE was sent while it was live: it stops at its next chunk."
    )
    persistent: bool = Field(
        description="False: jobs live in this server process's memory and survive no "
        "restart; true: records and results are kept in HESSIAN_JOB_DIR and reloaded."
    )
    result_bytes: int | None = Field(description="Size of the kept result (binary encoding).")
    problem: dict[str, Any] | None = Field(
        description="failed: the problem body the endpoint itself would have answered."
    )
    links: JobLinks


class JobList(BaseModel):
    """``GET /jobs``: every kept job, oldest first."""

    jobs: list[JobBody]
    persistent: bool
    max_jobs: int
    max_queued_jobs: int
    ttl_s: float
