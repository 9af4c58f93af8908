"""HTTP request and response bodies (pydantic only, no torch).

Tensor objects follow the Open Inference Protocol (KServe v2 / Triton) layout: ``name``,
``shape``, ``datatype``, ``data``; ``data`` is a flat or nested list of numbers in
row-major order, or a base64 string of the little-endian row-major bytes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from hessian_service.names import REF_PATTERN

Datatype = Literal[
    "BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "BF16", "FP32", "FP64"
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Bounds of DerivativeRequest.image_size, the longest side of a png picture in pixels.
MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 2048

# Counts and indices are JSON integers: not true/false (pydantic's lax int takes them as
# 1/0), not "3", not 2.0.
Count = Annotated[StrictInt, Field(ge=0)]


class TensorObject(_Strict):
    """A tensor in the Open Inference Protocol layout."""

    name: str = Field("x", description="Tensor name.", max_length=128)
    shape: list[Count] = Field(..., description="Dimensions, e.g. [1, 1, 28, 28].", max_length=16)
    datatype: Datatype = Field("FP32", description="Element type of `data`.")
    data: list[Any] | str = Field(
        ...,
        description="Row-major numbers (flat or nested), or base64 of the little-endian "
        "row-major bytes.",
    )


class SumObjective(_Strict):
    """``sum(output)``."""

    type: Literal["sum"]


class LogSoftmaxObjective(_Strict):
    """``log_softmax(output)[index]``."""

    type: Literal["log_softmax"]
    index: Count


class MseObjective(_Strict):
    """``mean((output - target)**2)``; a number target is broadcast to the output shape."""

    type: Literal["mse"]
    target: StrictFloat | list[Any] | TensorObject = Field(
        ..., description="A number, a list shaped like the output, or a tensor object."
    )


class CrossEntropyObjective(_Strict):
    """``-log_softmax(output)[target]``, one class index or one per sample."""

    type: Literal["cross_entropy"]
    target: Count | list[Count]


class WeightedSumObjective(_Strict):
    """``sum(weights * output)``: the output weighted by a sensitivity vector (UM-Bridge's
    ``sens``); its gradient is the vector-Jacobian product ``weights^T J``."""

    type: Literal["weighted_sum"]
    weights: list[Any] | TensorObject = Field(
        ...,
        description="One weight per output (a list shaped like the output, or a tensor "
        "object), or one row per sample of a batch.",
    )


ObjectiveSpec = Annotated[
    SumObjective
    | LogSoftmaxObjective
    | MseObjective
    | CrossEntropyObjective
    | WeightedSumObjective,
    Field(discriminator="type"),
]


class SampleRequest(_Strict):
    """What every derivative request names: the model, its input, and the scalar(s) to
    derive (``DerivativeRequest`` for the dense matrices, ``OperatorRequest`` for the
    matrix-free operators)."""

    model: str = Field(
        ...,
        pattern=REF_PATTERN,
        description="A loaded model (see GET /models): `name` (its latest version) or "
        "`name@version`.",
    )
    inputs: list[TensorObject] = Field(
        ...,
        min_length=1,
        max_length=1,
        description="One tensor: one sample shaped like the model's input_shape, or a "
        "batch [B, *input_shape].",
    )
    output_index: StrictInt | list[StrictInt] | None = Field(
        None,
        description="Index (or list of indices) into the flattened per-sample output. "
        "/hessian needs one unless the model has one output or an objective is given; "
        "/jacobian without it returns all outputs.",
    )
    objective: ObjectiveSpec | None = Field(
        None, description="A scalar built on the output, replacing output_index."
    )


class RowRange(_Strict):
    """A block of matrix rows: ``start`` included, ``stop`` excluded."""

    start: Count = Field(..., description="First row, 0-based.")
    stop: Count = Field(..., description="One past the last row; at most n.")


class DerivativeRequest(SampleRequest):
    """Body of ``POST /jacobian`` and ``POST /hessian``."""

    encoding: Literal["json", "base64", "binary", "png"] = Field(
        "json",
        description="How result tensors' `data` is written: json numbers, base64 of the "
        "little-endian bytes, or binary (the Open Inference Protocol binary tensor "
        "extension: an application/octet-stream body whose first "
        "`Inference-Header-Content-Length` bytes are this JSON response, each output "
        "carrying `parameters.binary_data_size` instead of `data`, followed by the "
        "outputs' raw little-endian row-major bytes in order); or png: an image/png "
        "heatmap of the result of one sample (the /hessian [n, n]; the /jacobian [k, n] "
        "rows, one row of an image model drawn as its H x W image), blue < 0 < red on "
        "[-X-Value-Limit, X-Value-Limit], white at zero, with headers X-Value-Limit, "
        "X-Matrix-Shape (rows x cols drawn), X-Derivative-Method and "
        "X-Non-Finite-Entries. Pixel column p of W shows column "
        "floor((2p + 1) * cols / (2W)), rows likewise. Without this field, "
        "`Accept: image/png` (preferred over application/json) selects png.",
    )
    image_size: StrictInt | None = Field(
        None,
        ge=MIN_IMAGE_SIZE,
        le=MAX_IMAGE_SIZE,
        description="png only: the picture's longest side in pixels, nearest-neighbour "
        "scaled. Default: one pixel per entry (a multiple of that up to 256 px for "
        "small matrices), at most 1024.",
    )
    image_limit: StrictFloat | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="png only: the colour range [-image_limit, image_limit] (larger "
        "values saturate). Default: the result's largest |value|.",
    )
    layout: Literal["matrix", "tensor", "packed"] = Field(
        "matrix",
        description="matrix: [n, n] with n = prod(input_shape); tensor: input_shape + "
        "input_shape, as torch.autograd.functional returns it (with `rows`: [b - a] + "
        "input_shape); packed (/hessian only): the symmetric matrix's upper triangle, "
        "row-major, n (n + 1) / 2 numbers per matrix, half the bytes; with `rows` the "
        "segment of that vector rows a..b occupy (metadata.packing says where), so that "
        "segments of consecutive row blocks concatenate to the whole triangle.",
    )
    precision: Literal["float32", "float64"] = Field("float32", description="Compute dtype.")
    rows: RowRange | None = Field(
        None,
        description="/hessian only: rows start..stop (stop excluded) of each n x n Hessian, "
        "[B, stop - start, n]; computed as Hessian-vector products with the basis vectors "
        "e_start..e_(stop-1) where that is cheaper than the whole matrix. The size limit "
        "applies to the rows, so a large Hessian can be fetched in blocks. Default: all.",
    )
    result_precision: Literal["float16", "bfloat16", "float32", "float64"] | None = Field(
        None,
        description="The precision the result is sent in, after computing in `precision`: "
        "float16 / bfloat16 halve float32's bytes (datatype FP16 / BF16 with base64 and "
        "binary; json numbers rounded to it). Never wider than `precision`. A finite entry "
        "beyond float16's range (65,504) is refused with 422 naming this field. Default: "
        "the compute precision. Applies to the derivative, not to the model output.",
    )


class ResponseMetadata(BaseModel):
    """What was computed, and how."""

    output_index: int | list[int] | None
    objective: str
    sample_shape: list[int]
    batch_size: int | None = Field(description="B for a batched input, null for one sample.")
    method: str
    device: str
    precision: str
    layout: str
    rows: dict[str, int] | None = Field(
        None, description='With `rows`: {"start": a, "stop": b, "n": n}, the rows sent.'
    )
    packing: dict[str, Any] | None = Field(
        None,
        description='With layout packed: {"order": "upper_row_major", "n": n, "offset": '
        'where this segment starts in the n (n + 1) / 2 vector, "length": its entries, '
        '"complete": whether it is the whole triangle}.',
    )
    result_precision: str | None = Field(
        None, description="The precision the derivative is sent in, when it was rounded."
    )
    compute_ms: float
    zero: bool = Field(description="True when every entry of the result is exactly zero.")
    notes: list[str]


class OutputTensor(BaseModel):
    """A result tensor: ``data`` inline, or (``encoding: "binary"``) its byte count in
    ``parameters.binary_data_size`` and its bytes after the JSON header."""

    name: str
    shape: list[int]
    datatype: Datatype
    data: list[Any] | str | None = Field(
        None, description="Numbers or base64; absent with the binary encoding."
    )
    parameters: dict[str, Any] | None = Field(
        None, description='`{"binary_data_size": <bytes>}` with the binary encoding.'
    )


class DerivativeResponse(BaseModel):
    """Body of a successful ``POST /jacobian`` or ``POST /hessian``."""

    model: str
    model_version: str
    outputs: list[OutputTensor]
    metadata: ResponseMetadata


class CapabilityReport(BaseModel):
    """What the load-time probe found; the derivative endpoints use its methods."""

    device: str
    dtype: str = Field(description="The dtype the model was loaded in.")
    precisions: list[str] = Field(description="Request precisions the model runs in.")
    batch: Literal["any", "one"] = Field(
        description="any: the model takes a batch; one: exported with a fixed batch of 1, "
        "so a batch runs one sample at a time."
    )
    vmap: bool = Field(
        description="torch.func.vmap over samples of the model's gradient works (as the "
        "engine vectorizes)."
    )
    forward_mode: bool = Field(description="Forward-mode AD (torch.func.jvp) works.")
    engine_path: Literal["structured", "graph", "generic", "autograd"] = Field(
        description="The path method auto took on the probe's trial sample. structured: "
        "layer-wise curvature propagation; graph: node rules on the model's captured ATen "
        "graph (any Python, TorchScript or torch.export model it can trace); generic: "
        "vectorized torch.func; autograd: a per-row torch.autograd loop (slow) for models "
        "the automatic path cannot transform."
    )
    hessian_method: str = Field(
        description="The engine method /hessian uses: auto, or autograd when a trial of "
        "auto failed at load."
    )
    jacobian_method: str = Field(description="The engine method /jacobian uses.")
    curvature: Literal["affine", "piecewise_linear", "general"]
    hessian_zero: Literal["everywhere", "almost_everywhere", "no"] = Field(
        description="everywhere: affine model; almost_everywhere: all non-linearities are "
        "piecewise linear (ReLU, max-pool): zero except on the kinks."
    )
    random_ops: bool = Field(description="The forward pass is random (e.g. active dropout).")
    random_evidence: list[str]
    parameters: int
    parameter_bytes: int
    buffer_bytes: int
    notes: list[str] = Field(description="Why a probe failed, where one did.")
    graph: dict[str, Any] = Field(
        default_factory=dict,
        description="The graph engine's plan for the output-0 Hessian: supported, "
        "nodes_by_rule, curvature_ops, cut_size, cut_is_input, executor (direct or vmap), "
        "reason (why not, or why the vmap executor), fallback_node (the node at fault).",
    )


class ModelInfo(BaseModel):
    """A model as ``GET /models`` lists it."""

    name: str
    version: str
    description: str
    input_shape: list[int]
    output_shape: list[int]
    device: str | None
    ready: bool
    curvature: str | None = Field(
        None, description="affine | piecewise_linear | general: what the Hessian can be."
    )
    error: str | None = None
    training: dict[str, Any] | None = None
    format: str | None = Field(None, description="zoo | torchscript | export")
    latest: bool | None = Field(None, description="This version is what `name` resolves to.")
    source: str | None = Field(None, description="models_dir | upload")
    capabilities: CapabilityReport | None = None


class ModelList(BaseModel):
    models: list[ModelInfo]


class HealthStatus(BaseModel):
    status: Literal["ok", "loading"]
    models_loaded: int
    models_failed: int


class FailedModelInfo(BaseModel):
    """A model folder that failed to load, and why."""

    name: str
    error: str


class FieldError(BaseModel):
    """One failed check of a request: where, and what was expected."""

    field: str = Field(description="The request field, e.g. `inputs[0].data`.")
    message: str


class Problem(BaseModel):
    """An RFC 9457 ``application/problem+json`` body: every error outside ``/v2``.

    ``field`` is always present: the request field at fault, or null where no part of
    the request is (overloaded, not ready, out of time). The other extras appear on the
    errors that have them.
    """

    model_config = ConfigDict(extra="allow")

    type: str = Field("about:blank", description="Always about:blank: the title says it all.")
    title: str = Field(description="Not found, Invalid input, Too large, Overloaded, ...")
    status: int = Field(description="The HTTP status, repeated.")
    detail: str = Field(description="What was wrong and what was expected.")
    field: str | None = Field(
        description="The request field at fault (`model`, `inputs[0].shape`, `body`, "
        "`path`, `method`, `Authorization`, ...), or null when no field is."
    )
    errors: list[FieldError] | None = Field(
        None, description="Every failed check of a 422 from request validation."
    )
    limit_bytes: int | None = Field(None, description="413: the limit that was exceeded.")
    estimated_bytes: int | None = Field(None, description="413: the result's size.")
    json_number_bytes: int | None = Field(
        None, description="413: the body's bytes outside JSON strings, as counted."
    )
    setting: str | None = Field(None, description="413: the setting that holds the limit.")
    estimated_products: int | None = Field(
        None, description="413 from an operator: the products the request would compute."
    )
    limit_products: int | None = Field(
        None, description="413: the product limit (HESSIAN_MAX_OPERATOR_PRODUCTS)."
    )
    alternatives: list[dict[str, Any]] | None = Field(
        None,
        description="413 for a dense Hessian: the operations that would fit, each with "
        "`route`, `ask` (what to send), `estimated_bytes` (its result), "
        "`estimated_products` and `method`.",
    )
    retry_after_s: int | None = Field(None, description="503 Overloaded: retry after.")
    failed: list[FailedModelInfo] | None = Field(
        None, description="503 from /health/ready: the model folders that failed to load."
    )
    models_loaded: int | None = Field(None, description="503 from /health/ready.")
    models_failed: int | None = Field(None, description="503 from /health/ready.")
