"""Open Inference Protocol v2 (KServe v2 / Triton) request and response bodies.

Only the JSON part: with the binary tensor extension a tensor's bytes follow the JSON
header and the tensor object carries ``parameters.binary_data_size`` instead of ``data``
(``hessian_service.wire.binary``). Field names are the protocol's, so that existing clients such as
``tritonclient.http`` work unchanged.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from hessian_service.wire.schemas import Count

INPUT_NAME = "x"
OUTPUT_NAME = "output"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InferInput(_Strict):
    """``$request_input``: one input tensor."""

    name: str = Field(
        ...,
        max_length=128,
        description=f"The model's input: {INPUT_NAME!r}; or, second, 'vectors' (for hvp).",
    )
    shape: list[Count] = Field(
        ..., max_length=16, description="[B, *input_shape]: a batch, as the metadata says."
    )
    datatype: str = Field(..., max_length=16, description="FP32, FP64, FP16 or BF16.")
    parameters: dict[str, Any] | None = Field(
        None, description='`{"binary_data_size": <bytes>}` when the data follows the header.'
    )
    data: list[Any] | None = Field(None, description="Row-major numbers, flat or nested.")


class InferRequestedOutput(_Strict):
    """``$request_output``: an output to return, and whether as binary data."""

    name: str = Field(..., max_length=128)
    parameters: dict[str, Any] | None = Field(
        None,
        description='`{"binary_data": true}` returns this output as raw bytes; a '
        "derivative output's fields (output_index, objective, ...) override the "
        "request's for it.",
    )


class InferRequest(_Strict):
    """``$inference_request``: body of ``POST /v2/models/{name}/infer``."""

    id: str | None = Field(None, max_length=256, description="Echoed in the response.")
    model_name: str | None = Field(
        None, max_length=256, description="As KServe's client sends it: the URL's model."
    )
    model_version: str | None = Field(
        None, max_length=64, description="As KServe's client may send it: the URL's version."
    )
    parameters: dict[str, Any] | None = Field(
        None,
        description='`{"binary_data_output": true}`: every output as raw bytes. For the '
        "derivative outputs (jacobian, hessian, hvp, hessian_diagonal, hessian_trace): "
        "the fields of that endpoint's body, e.g. "
        '`{"output_index": 2}` or `{"objective": {"type": "cross_entropy", "target": 3}}`.',
    )
    inputs: list[InferInput] = Field(
        ..., min_length=1, max_length=2, description="`x`; and `vectors` for hvp."
    )
    outputs: list[InferRequestedOutput] | None = Field(None, max_length=8)


class InferOutput(BaseModel):
    """``$response_output``."""

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    """``$inference_response``."""

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutput]


class TensorMetadata(BaseModel):
    """``$metadata_tensor``: -1 marks the batch dimension."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """``$metadata_model_response``."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    """``$metadata_server_response``."""

    name: str
    version: str
    extensions: list[str]


class ServerLive(BaseModel):
    """``GET /v2/health/live``: 200 and this body (KServe's client reads ``live``)."""

    live: bool


class ServerReady(BaseModel):
    """``GET /v2/health/ready``: 200 and this body (KServe's client reads ``ready``)."""

    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class ErrorBody(BaseModel):
    """``$inference_error_response`` (and every other /v2 error): what tritonclient reads."""

    error: str
