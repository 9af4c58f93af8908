"""UM-Bridge protocol bodies (protocol version 1.0), pydantic only, no torch.

UM-Bridge (https://um-bridge-benchmarks.readthedocs.io) is the HTTP protocol that UQ
software -- MUQ, QMCPy, PyMC and tinyDA integrations, clients in Python, R, Julia, C++
and MATLAB -- uses to call a model ``F: R^n -> R^m`` and its derivatives. A model takes a
list of input vectors and returns a list of output vectors; every served network here
has one of each: its input flattened (``n = prod(input_shape)``) and its selected
outputs flattened. The field names are the protocol's (``outWrt``, ``inWrt1``, ...).

``config`` is the protocol's per-call model configuration; this service reads three
keys from it, each optional: ``output_index`` or ``objective`` (the scalars the model
outputs, as ``/jacobian`` takes them) and ``precision``. Any other key is refused, so
that a misspelt key is never silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from hessian_service.wire.schemas import ObjectiveSpec

PROTOCOL_VERSION = 1.0
# The protocol's paths, at the server's root: errors on them (a route's, or the server's
# own -- an unknown method, a body over the size limit) are the protocol's shape.
PATHS = frozenset(
    {
        "/Info",
        "/InputSizes",
        "/OutputSizes",
        "/ModelInfo",
        "/Evaluate",
        "/Gradient",
        "/ApplyJacobian",
        "/ApplyHessian",
    }
)

# A vector of the protocol: JSON numbers (ints are numbers too).
Vector = list[StrictFloat | StrictInt]


class UmbridgeConfig(BaseModel):
    """The keys of ``config`` this service reads; all optional."""

    model_config = ConfigDict(extra="forbid")

    output_index: StrictInt | list[StrictInt] | None = Field(
        None,
        description="The outputs the model returns: one index (an output of size 1), a "
        "list of k (size k), or none for every output (the output flattened).",
    )
    objective: ObjectiveSpec | None = Field(
        None,
        description="A scalar built on the output instead (an output of size 1), as "
        '/hessian takes it, e.g. {"type": "cross_entropy", "target": 3}.',
    )
    precision: Literal["float32", "float64"] = Field("float32", description="Compute dtype.")


class ModelCall(BaseModel):
    """What every call but ModelInfo names: the model, and its config."""

    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(..., description="A model of GET /Info.")
    config: dict[str, Any] = Field(
        default_factory=dict, description="output_index, objective, precision (all optional)."
    )


class NameRequest(BaseModel):
    """Body of ``POST /ModelInfo``."""

    name: str = Field(..., description="A model of GET /Info.")


class SizesRequest(ModelCall):
    """Body of ``POST /InputSizes`` and ``POST /OutputSizes``."""


class EvaluateRequest(ModelCall):
    """Body of ``POST /Evaluate``: ``F(input)``."""

    input: list[Vector] = Field(..., description="The input vectors (one here).")


class GradientRequest(EvaluateRequest):
    """Body of ``POST /Gradient``: ``sens^T J`` -- the gradient of ``sens^T F_outWrt``
    with respect to input ``inWrt``."""

    out_wrt: StrictInt = Field(..., alias="outWrt")
    in_wrt: StrictInt = Field(..., alias="inWrt")
    sens: Vector = Field(..., description="One number per output of output outWrt.")


class ApplyJacobianRequest(EvaluateRequest):
    """Body of ``POST /ApplyJacobian``: ``J vec`` of output ``outWrt`` by input ``inWrt``."""

    out_wrt: StrictInt = Field(..., alias="outWrt")
    in_wrt: StrictInt = Field(..., alias="inWrt")
    vec: Vector = Field(..., description="One number per input of input inWrt.")


class ApplyHessianRequest(EvaluateRequest):
    """Body of ``POST /ApplyHessian``: the Hessian of ``sens^T F_outWrt`` with respect to
    inputs ``inWrt1`` and ``inWrt2``, applied to ``vec``."""

    out_wrt: StrictInt = Field(..., alias="outWrt")
    in_wrt1: StrictInt = Field(..., alias="inWrt1")
    in_wrt2: StrictInt = Field(..., alias="inWrt2")
    sens: Vector = Field(..., description="One number per output of output outWrt.")
    vec: Vector = Field(..., description="One number per input of input inWrt2.")


class InfoResponse(BaseModel):
    """``GET /Info``."""

    protocolVersion: float = PROTOCOL_VERSION  # the protocol's names, camelCase
    models: list[str]


class Support(BaseModel):
    Evaluate: bool
    Gradient: bool
    ApplyJacobian: bool
    ApplyHessian: bool


class ModelInfoResponse(BaseModel):
    """``POST /ModelInfo``: what the model supports."""

    support: Support


class InputSizesResponse(BaseModel):
    inputSizes: list[int]


class OutputSizesResponse(BaseModel):
    outputSizes: list[int]


class EvaluateResponse(BaseModel):
    output: list[list[float]]


class VectorResponse(BaseModel):
    """``Gradient``, ``ApplyJacobian`` and ``ApplyHessian``: one vector."""

    output: list[float]


class ErrorDetail(BaseModel):
    type: str = Field(
        ...,
        description="InvalidInput, ModelNotFound, UnsupportedFeature (the protocol's), or "
        "TooLarge, Overloaded, Timeout, InsufficientStorage, InternalError.",
    )
    message: str


class ErrorResponse(BaseModel):
    """Every error, in the protocol's shape."""

    error: ErrorDetail


def error_body(kind: str, message: str) -> dict[str, Any]:
    """``{"error": {"type": kind, "message": message}}``, what UM-Bridge clients raise."""
    return {"error": {"type": kind, "message": message}}
