"""Service settings, read from the environment with the ``HESSIAN_`` prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# The bundled models ship inside the package, so an installed wheel serves them too.
BUNDLED_MODELS_DIR = Path(__file__).resolve().parent / "repository" / "models"
MiB = 1 << 20


class Settings(BaseSettings):
    """Everything an operator can set; every limit is checked before work starts."""

    model_config = SettingsConfigDict(env_prefix="HESSIAN_", extra="ignore")

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where models run: auto picks CUDA when it is available."
    )
    models_dir: Path = Field(BUNDLED_MODELS_DIR, description="Folder of model folders.")
    ready_requires: Literal["any", "all"] = Field(
        "any",
        description="What /health/ready (and /v2/health/ready) needs to answer 200: any: "
        "at least one model can serve; all: every model folder found loaded, none failed.",
    )
    max_body_bytes: int = Field(64 * MiB, gt=0, description="Largest request body accepted.")
    max_json_number_bytes: int = Field(
        2 * MiB,
        gt=0,
        description="Most bytes of a JSON body outside its string literals (numbers and "
        "their punctuation). One parse holds the GIL for all of them, 5-13 ms a MiB "
        "(bench/json_body_gil.py), so this bounds how long one request stalls the others; "
        "base64 and binary data do not count and may fill max_body_bytes.",
    )
    max_result_bytes: int = Field(
        512 * MiB, gt=0, description="Largest result (all matrices of one request) computed."
    )
    memory_budget_bytes: int = Field(
        1024 * MiB, gt=0, description="Working memory one computation may plan for."
    )
    compile_after: int = Field(
        3,
        ge=0,
        description="A /hessian/diagonal or /hessian/trace answered by the graph engine's "
        "forward-Laplacian pass, asked this many times with one input shape, is compiled by "
        "torch.compile on a background thread (requests keep being answered eagerly until "
        "it is ready; then about 2x faster: a PINN training loop's Laplacian). Needs a C++ "
        "compiler; without one the compile fails once and the eager pass stays. 0: never.",
    )
    max_samples_per_request: int = Field(
        65536,
        gt=0,
        description="Largest batch in one request: a ceiling only; what a request may cost "
        "is bounded by max_result_bytes (its result) and max_work_per_request (its compute), "
        "so a 4096-point PINN batch is served while 4096 784-input Hessians are not.",
    )
    max_work_per_request: int = Field(
        10_000_000_000,
        gt=0,
        description="Largest estimated compute of one request, in activation elements: "
        "samples x passes per sample (inputs x scalars for a Hessian, min(rows, inputs) for "
        "a Jacobian) x the elements one forward pass of one sample creates. The default "
        "admits every request the bundled models could take at the old 256-sample limit "
        "(digits_cnn's largest, 218 Hessians within max_result_bytes: 3.2e9).",
    )
    max_output_indices: int = Field(64, gt=0, description="Longest output_index list.")
    # The matrix-free operators (/hvp, /jvp, /vjp, /hessian/diagonal|trace|eigen): their
    # own inputs' limits; their results and compute are bounded as above too.
    max_operator_vectors: int = Field(
        256, gt=0, description="Most vectors m per sample of one /hvp, /jvp or /vjp request."
    )
    max_operator_products: int = Field(
        100_000,
        gt=0,
        description="Most products (Hessian-vector, Jacobian-vector or vector-Jacobian "
        "products) one request of /hvp, /jvp, /vjp or /hessian/diagonal|trace|eigen may "
        "compute, over all its samples, and the most its `max_products` may ask for. An "
        "exact diagonal or trace by products needs one per input and sample (12,288 for "
        "one 3x64x64 image).",
    )
    max_eigen_k: int = Field(64, gt=0, description="Most eigenpairs k of /hessian/eigen.")
    min_eigen_tol: float = Field(
        1e-12,
        gt=0,
        description="Smallest `tol` of /hessian/eigen: below what the compute dtype "
        "resolves, a tolerance only spends the product budget.",
    )
    torch_threads: int | None = Field(
        None, gt=0, description="torch intra-op threads; default: torch's own choice."
    )
    # Model management (POST/DELETE /models): off unless a token is set.
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token of the model-management API; unset: the API answers 403.",
    )
    max_upload_bytes: int = Field(
        512 * MiB, gt=0, description="Largest POST /models body (manifest and file)."
    )
    upload_check_memory_bytes: int = Field(
        3 << 30,
        gt=0,
        description="Address space of the child process that scans, loads and runs an "
        "uploaded archive once before the server loads it (hessian_service.repository.isolation).",
    )
    upload_check_timeout_s: float = Field(
        120.0, gt=0, description="Time that child process may take; then it is killed."
    )
    upload_dir: Path | None = Field(
        None,
        description="Where uploaded models are stored and reloaded from at start-up; "
        "unset: a temporary folder, so uploads last until the process stops.",
    )
    # Concurrency (hessian_service.serving.batching): merging, backpressure, deadlines, access log.
    max_batch_size: int = Field(
        32, gt=0, description="Most samples merged into one computation; 1 turns merging off."
    )
    max_batch_delay_ms: float = Field(
        2.0, ge=0, description="Longest a request waits for others to merge with."
    )
    max_queue: int = Field(
        64, gt=0, description="Most requests waiting to compute; more get 503 + Retry-After."
    )
    request_timeout_s: float = Field(
        60.0, gt=0, description="Per-request deadline for queueing and computing (504)."
    )
    access_log: bool = Field(True, description="One JSON line per request on stderr.")
    # Jobs (POST /jobs, hessian_service.serving.jobs): long derivative work run in chunks
    # with progress, on the jobs' own threads, bounded in number, queue, time and bytes.
    max_jobs: int = Field(
        64,
        gt=0,
        description="Most jobs kept (queued, running and finished); a full store evicts "
        "its oldest finished job, and answers 503 when every kept job is still live.",
    )
    max_queued_jobs: int = Field(
        16, gt=0, description="Most jobs waiting to start; more get 503 + Retry-After."
    )
    job_workers: int = Field(1, gt=0, description="Jobs running at once (each on its own thread).")
    job_ttl_s: float = Field(
        3600.0,
        gt=0,
        description="How long a finished job (and its result) is kept after it finished.",
    )
    job_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="Longest a job may run; then it stops at its next chunk and fails (504).",
    )
    job_chunk_products: int = Field(
        1024,
        gt=0,
        description="Products per chunk of a dense /jacobian or /hessian job (one product: "
        "one matrix row; at least one sample a chunk): how often it reports progress, "
        "can be cancelled, and lets other requests in.",
    )
    max_job_result_bytes: int = Field(
        2048 * MiB,
        gt=0,
        description="Most bytes of results all kept jobs hold together (in memory, or in "
        "job_dir); a new result evicts the oldest finished ones to fit.",
    )
    job_dir: Path | None = Field(
        None,
        description="Folder where finished jobs' states and results are written and "
        "reloaded from at start-up; unset: jobs live in memory and survive no restart.",
    )
