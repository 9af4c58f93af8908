"""Request and response bodies of the matrix-free operators (pydantic only, no torch).

``/hvp``, ``/jvp``, ``/vjp``, ``/hessian/diagonal``, ``/hessian/trace`` and
``/hessian/eigen`` name their model, input and scalar as ``/hessian`` does
(``schemas.SampleRequest``) and add what each operator needs: the vectors to multiply, or
an exactness request and a product budget, or how many eigenpairs to what tolerance. The
results are tensors in the input's shape, written in the requested encoding (JSON numbers,
base64 or the binary extension: the codec of ``/hessian``), with the cost in products.

Bounds that depend on the server's settings (how many vectors, products, eigenpairs)
are checked against the model in ``serving.operator_request``; the bounds here are the
ones no setting can lift.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, StrictBool, StrictFloat, StrictInt

from hessian_service.wire.schemas import OutputTensor, SampleRequest, TensorObject

# The most a seed may be (torch.Generator.manual_seed takes 64 bits; 32 are plenty).
MAX_SEED = 2**32 - 1
# Eigen tolerances: relative residual norms; 1 or more asks nothing, below 1e-15 is
# under float64's resolution.
MIN_TOL = 1e-15
MAX_TOL = 1.0

OperatorEncoding = Literal["json", "base64", "binary"]


class OperatorRequest(SampleRequest):
    """What every operator request carries besides the model, input and scalar."""

    encoding: OperatorEncoding = Field(
        "json",
        description="How result tensors' `data` is written: json numbers, base64 of the "
        "little-endian bytes, or binary (the Open Inference Protocol binary tensor "
        "extension: an application/octet-stream body whose first "
        "`Inference-Header-Content-Length` bytes are this JSON response, each output "
        "carrying `parameters.binary_data_size` instead of `data`, followed by the "
        "outputs' raw little-endian row-major bytes in order).",
    )
    precision: Literal["float32", "float64"] = Field("float32", description="Compute dtype.")


class ProductRequest(OperatorRequest):
    """Body of ``POST /hvp``, ``POST /jvp`` and ``POST /vjp``."""

    vectors: TensorObject = Field(
        ...,
        description="The m vectors to multiply, as a tensor object (JSON numbers or "
        "base64, any float datatype). /hvp and /jvp: [m, *input_shape] (the same m "
        "vectors for every sample) or [B, m, *input_shape] (m per sample of a batch "
        "[B, *input_shape]); /vjp: [m, *output_shape] or [B, m, *output_shape]. m is "
        "at most the server's HESSIAN_MAX_OPERATOR_VECTORS.",
    )


class EstimateRequest(OperatorRequest):
    """Body of ``POST /hessian/diagonal`` and ``POST /hessian/trace``."""

    exact: StrictBool | None = Field(
        None,
        description="true: the exact value or an error (413 when it would not fit the "
        "server's budgets); false: a stochastic estimate (with its standard error) in "
        "`max_products` products; null: exact when the planner says it fits, else "
        "estimated.",
    )
    max_products: StrictInt | None = Field(
        None,
        ge=1,
        description="Most Hessian-vector products in all (over the batch); an estimate "
        "uses all of them. At most the server's HESSIAN_MAX_OPERATOR_PRODUCTS. Null: "
        "exact up to the planner's limit, else 64 products a sample.",
    )
    seed: StrictInt = Field(
        0, ge=0, le=MAX_SEED, description="Seed of an estimate's random probe vectors."
    )


class EigenRequest(OperatorRequest):
    """Body of ``POST /hessian/eigen``."""

    k: StrictInt = Field(
        5,
        ge=1,
        description="Eigenpairs wanted per sample; at most the server's "
        "HESSIAN_MAX_EIGEN_K and the number of inputs.",
    )
    which: Literal["largest", "smallest", "magnitude"] = Field(
        "largest",
        description="largest: the k algebraically largest eigenvalues; smallest: the k "
        "smallest; magnitude: the k of largest |value|.",
    )
    tol: StrictFloat = Field(
        1e-6,
        ge=MIN_TOL,
        le=MAX_TOL,
        allow_inf_nan=False,
        description="Converged when every pair's residual ||H v - lambda v|| is at most "
        "tol x the largest |eigenvalue| found.",
    )
    max_products: StrictInt | None = Field(
        None,
        ge=1,
        description="Most Hessian-vector products in all (over the batch); at most the "
        "server's HESSIAN_MAX_OPERATOR_PRODUCTS. Null: up to min(n, 300) Lanczos steps "
        "a sample. Reaching it ends the iteration with `converged: false`.",
    )
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED, description="Seed of the start vector.")


class OperatorMetadata(BaseModel):
    """What an operator computed, how, and at what cost."""

    output_index: int | list[int] | None
    objective: str
    sample_shape: list[int]
    batch_size: int | None = Field(description="B for a batched input, null for one sample.")
    method: str = Field(description="The algorithm that ran (e.g. hutch++, lanczos).")
    device: str
    precision: str
    compute_ms: float
    products: int = Field(
        description="Products computed (Hessian-, Jacobian- or vector-Jacobian-vector), "
        "over all samples: the cost of the answer."
    )
    exact: bool = Field(
        description="true: exact to rounding; false: an estimate, its standard error in "
        "the `standard_error` output."
    )
    converged: bool | None = Field(
        None, description="/hessian/eigen: every residual within tol; null elsewhere."
    )
    notes: list[str]


class OperatorResponse(BaseModel):
    """Body of a successful operator request: the values (named after the operator:
    `hvp`, `jvp`, `vjp`, `diagonal`, `trace`, or `eigenvalues`, `eigenvectors` and
    `residuals`), `standard_error` for an estimate, and the model's `output`."""

    model: str
    model_version: str
    outputs: list[OutputTensor]
    metadata: OperatorMetadata
