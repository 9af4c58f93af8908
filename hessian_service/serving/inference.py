"""Open Inference Protocol v2 on the registry's models: metadata and the forward pass.

``infer`` takes the raw body (JSON, or JSON header + bytes with the binary tensor
extension), checks it against the model -- input name, datatype, ``[B, *input_shape]``,
every byte count -- before any work, runs the model's forward pass without autograd in
a worker thread, and encodes the logits as JSON numbers or raw bytes per output, as the
request asked. Nothing here knows HTTP beyond the framing header's value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio
import orjson
import torch
from pydantic import ValidationError

from hessian_service.errors import InvalidInput
from hessian_service.repository.registry import LoadedModel, Registry, version_key
from hessian_service.wire import binary, codec
from hessian_service.wire.oip_schemas import (
    INPUT_NAME,
    OUTPUT_NAME,
    InferRequest,
    ModelMetadata,
    TensorMetadata,
)
from hessian_service.wire.schemas import TensorObject

PLATFORM = "pytorch"
FLOAT_DATATYPES = ("FP32", "FP64", "FP16", "BF16")


def lookup(registry: Registry, name: str, version: str | None = None) -> LoadedModel:
    """The loaded model ``name`` (its latest version), or that ``version`` of it."""
    return registry.get(name if version is None else f"{name}@{version}")


def versions_of(registry: Registry, model: LoadedModel) -> list[str]:
    """Every loaded version of ``model``'s name, as Open Inference Protocol lists them."""
    loaded = registry.versions.get(model.manifest.name, {})
    return sorted(loaded, key=version_key) or [model.manifest.version]


def model_metadata(model: LoadedModel, versions: list[str] | None = None) -> ModelMetadata:
    """Name, versions, platform and tensors, the batch dimension as -1."""
    manifest = model.manifest
    return ModelMetadata(
        name=manifest.name,
        versions=versions or [manifest.version],
        platform=PLATFORM,
        inputs=[
            TensorMetadata(name=INPUT_NAME, datatype="FP32", shape=[-1, *manifest.input_shape])
        ],
        outputs=[
            TensorMetadata(name=OUTPUT_NAME, datatype="FP32", shape=[-1, *manifest.output_shape])
        ],
    )


@dataclass(frozen=True)
class PreparedInfer:
    """An inference request checked against its model: ready to run."""

    model: LoadedModel
    x: torch.Tensor  # [B, *input_shape], float32, on the model's device
    request_id: str | None
    binary_outputs: bool  # the one output as raw bytes


def _field(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in map(str, loc):
        text += f"[{part}]" if part.isdigit() else (f".{part}" if text else part)
    return text or "body"


def _parse(header: bytes) -> tuple[dict[str, Any], InferRequest]:
    try:
        raw = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"body: invalid JSON ({exc})", field="body") from None
    if not isinstance(raw, dict):
        raise InvalidInput("body: expected a JSON object", field="body")
    try:
        return raw, InferRequest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = _field(tuple(first["loc"]))
        raise InvalidInput(f"{where}: {first['msg']}", field=where) from None


def _wants_binary(request: InferRequest) -> bool:
    default = bool((request.parameters or {}).get("binary_data_output", False))
    if not request.outputs:
        return default
    for i, output in enumerate(request.outputs):
        if output.name != OUTPUT_NAME:
            raise InvalidInput(
                f"outputs[{i}].name: the model has one output, {OUTPUT_NAME!r}; got "
                f"{output.name!r}",
                field=f"outputs[{i}].name",
            )
    parameters = request.outputs[0].parameters or {}
    return bool(parameters.get("binary_data", default))


def prepare(
    model: LoadedModel, body: bytes, header_length: str | None, max_samples: int
) -> PreparedInfer:
    """Split, parse and check a request body; decode its input. Raises before any work."""
    header, tail = binary.split_body(body, header_length)
    raw, request = _parse(header)
    (raw_slice,) = binary.take_binary(raw["inputs"], tail, "inputs")
    (tensor,) = request.inputs
    if tensor.name != INPUT_NAME:
        raise InvalidInput(
            f"inputs[0].name: the model's input is {INPUT_NAME!r}, got {tensor.name!r}",
            field="inputs[0].name",
        )
    if tensor.datatype not in FLOAT_DATATYPES:
        why = "; BYTES tensors are not supported" if tensor.datatype == "BYTES" else ""
        raise InvalidInput(
            f"inputs[0].datatype: expected one of {', '.join(FLOAT_DATATYPES)}, got "
            f"{tensor.datatype!r}{why}",
            field="inputs[0].datatype",
        )
    sample_shape = list(model.manifest.input_shape)
    if len(tensor.shape) != len(sample_shape) + 1 or tensor.shape[1:] != sample_shape:
        raise InvalidInput(
            f"inputs[0].shape: expected [B, {', '.join(map(str, sample_shape))}] (the "
            f"metadata's [-1, ...]), got {tensor.shape}",
            field="inputs[0].shape",
        )
    if not 1 <= tensor.shape[0] <= max_samples:
        raise InvalidInput(
            f"inputs[0].shape: batch size must be between 1 and {max_samples}, got "
            f"{tensor.shape[0]}",
            field="inputs[0].shape",
        )
    if raw_slice is not None:
        where = f"inputs[0].parameters.{binary.BINARY_DATA_SIZE}"
        x = codec.decode_binary(raw_slice, tensor.datatype, tensor.shape, where)
    elif tensor.data is not None:
        obj = TensorObject.model_validate(
            {
                "name": tensor.name,
                "shape": tensor.shape,
                "datatype": tensor.datatype,
                "data": tensor.data,
            }
        )
        x = codec.decode_tensor(obj, "inputs[0]")
    else:
        raise InvalidInput(
            f"inputs[0].data: missing; send data or parameters.{binary.BINARY_DATA_SIZE} "
            "with the bytes after the JSON header",
            field="inputs[0].data",
        )
    return PreparedInfer(
        model=model,
        x=x.to(device=model.device, dtype=torch.float32),
        request_id=request.id,
        binary_outputs=_wants_binary(request),
    )


def forward(prepared: PreparedInfer) -> torch.Tensor:
    """The model's output for the batch, without autograd, on the CPU."""
    with torch.inference_mode():
        output: torch.Tensor = prepared.model.module(prepared.x)
    return output.reshape(prepared.x.shape[0], *prepared.model.manifest.output_shape).cpu()


def encode(prepared: PreparedInfer, output: torch.Tensor) -> binary.Encoded:
    """The ``$inference_response`` body, the output as numbers or raw bytes."""
    manifest = prepared.model.manifest
    encoding = "binary" if prepared.binary_outputs else "json"
    body: dict[str, Any] = {"model_name": manifest.name, "model_version": manifest.version}
    if prepared.request_id is not None:
        body["id"] = prepared.request_id
    body["outputs"] = [codec.tensor_object(OUTPUT_NAME, output, encoding)]
    return binary.encode(body, lambda _output: prepared.binary_outputs)


async def infer(
    registry: Registry,
    name: str,
    version: str | None,
    body: bytes,
    header_length: str | None,
    max_samples: int,
) -> binary.Encoded:
    """Check, run and encode one inference request; the work runs off the event loop."""
    model = lookup(registry, name, version)
    prepared = await anyio.to_thread.run_sync(prepare, model, body, header_length, max_samples)
    output = await anyio.to_thread.run_sync(forward, prepared)
    return await anyio.to_thread.run_sync(encode, prepared, output)
