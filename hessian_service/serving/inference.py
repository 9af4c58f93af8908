"""Open Inference Protocol v2 on the registry's models: metadata, the forward pass, and
derivative outputs.

``infer`` takes the raw body (JSON, or JSON header + bytes with the binary tensor
extension), checks it against the model -- input names, datatypes, ``[B, *input_shape]``,
every byte count, the outputs asked for and their parameters -- before any work, runs
the model's forward pass without autograd in a worker thread and each derivative output
through the derivative service (``serving.oip_derivatives``), and encodes every output
as JSON numbers or raw bytes, as the request asked. Nothing here knows HTTP beyond the
framing header's value.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import orjson
import torch
from pydantic import ValidationError

from hessian_service.errors import InvalidInput
from hessian_service.repository.registry import LoadedModel, Registry, version_key
from hessian_service.serving import oip_derivatives
from hessian_service.serving.oip_derivatives import DERIVED, VECTORS_NAME, DerivedOutput
from hessian_service.serving.service import DerivativeService
from hessian_service.wire import binary, codec
from hessian_service.wire.oip_schemas import (
    INPUT_NAME,
    OUTPUT_NAME,
    InferInput,
    InferRequest,
    ModelMetadata,
    TensorMetadata,
)
from hessian_service.wire.schemas import TensorObject

PLATFORM = "pytorch"


def lookup(registry: Registry, name: str, version: str | None = None) -> LoadedModel:
    """The loaded model ``name`` (its latest version), or that ``version`` of it."""
    return registry.get(name if version is None else f"{name}@{version}")


def versions_of(registry: Registry, model: LoadedModel) -> list[str]:
    """Every loaded version of ``model``'s name, as Open Inference Protocol lists them."""
    loaded = registry.versions.get(model.manifest.name, {})
    return sorted(loaded, key=version_key) or [model.manifest.version]


def model_metadata(model: LoadedModel, versions: list[str] | None = None) -> ModelMetadata:
    """Name, versions, platform and tensors, the batch dimension as -1: the input ``x``,
    the forward ``output`` and the derivative outputs (``oip_derivatives.metadata_outputs``)."""
    manifest = model.manifest
    input_shape, output_shape = list(manifest.input_shape), list(manifest.output_shape)
    derived = oip_derivatives.metadata_outputs(input_shape, output_shape)
    return ModelMetadata(
        name=manifest.name,
        versions=versions or [manifest.version],
        platform=PLATFORM,
        # ``vectors`` (read by hvp alone) is not listed: tools that send every listed
        # input (perf_analyzer) would send it with every request.
        inputs=[TensorMetadata(name=INPUT_NAME, datatype="FP32", shape=[-1, *input_shape])],
        outputs=[
            TensorMetadata(name=OUTPUT_NAME, datatype="FP32", shape=[-1, *output_shape]),
            *(TensorMetadata.model_validate(tensor) for tensor in derived),
        ],
    )


@dataclass(frozen=True)
class PreparedInfer:
    """An inference request checked against its model: ready to run."""

    model: LoadedModel
    x: torch.Tensor  # [B, *input_shape], float32, on the model's device
    request_id: str | None
    # The outputs in the order asked for: (name, as raw bytes); the forward output's name
    # is OUTPUT_NAME, every other one's is in ``derived``.
    outputs: tuple[tuple[str, bool], ...]
    derived: tuple[DerivedOutput, ...] = ()

    @property
    def wants_output(self) -> bool:
        return any(name == OUTPUT_NAME for name, _ in self.outputs)


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


OUTPUT_NAMES = (OUTPUT_NAME, *DERIVED)


def _requested(request: InferRequest) -> list[tuple[str, bool, dict[str, Any]]]:
    """(name, as raw bytes, the output's own parameters) per output asked for; the
    forward output alone when the request names none."""
    default = bool((request.parameters or {}).get("binary_data_output", False))
    if not request.outputs:
        return [(OUTPUT_NAME, default, {})]
    requested, seen = [], set()
    for i, output in enumerate(request.outputs):
        if output.name not in OUTPUT_NAMES:
            raise InvalidInput(
                f"outputs[{i}].name: the model's outputs are "
                f"{', '.join(map(repr, OUTPUT_NAMES))}; got "
                f"{output.name!r}",
                field=f"outputs[{i}].name",
            )
        if output.name in seen:
            raise InvalidInput(
                f"outputs[{i}].name: {output.name!r} is asked for twice",
                field=f"outputs[{i}].name",
            )
        seen.add(output.name)
        parameters = output.parameters or {}
        requested.append((output.name, bool(parameters.get("binary_data", default)), parameters))
    return requested


def _decode(tensor: InferInput, raw_slice: memoryview | None, i: int) -> torch.Tensor:
    """Input ``i``'s numbers, from the binary tail or its ``data``, in its datatype."""
    if tensor.datatype not in codec.FLOAT_DATATYPES:
        why = "; BYTES tensors are not supported" if tensor.datatype == "BYTES" else ""
        raise InvalidInput(
            f"inputs[{i}].datatype: expected one of {', '.join(codec.FLOAT_DATATYPES)}, got "
            f"{tensor.datatype!r}{why}",
            field=f"inputs[{i}].datatype",
        )
    if raw_slice is not None:
        where = f"inputs[{i}].parameters.{binary.BINARY_DATA_SIZE}"
        return codec.decode_binary(raw_slice, tensor.datatype, tensor.shape, where)
    if tensor.data is not None:
        obj = TensorObject.model_validate(
            {
                "name": tensor.name,
                "shape": tensor.shape,
                "datatype": tensor.datatype,
                "data": tensor.data,
            }
        )
        return codec.decode_tensor(obj, f"inputs[{i}]")
    raise InvalidInput(
        f"inputs[{i}].data: missing; send data or parameters.{binary.BINARY_DATA_SIZE} "
        "with the bytes after the JSON header",
        field=f"inputs[{i}].data",
    )


def _check_input_shape(tensor: InferInput, model: LoadedModel, max_samples: int) -> None:
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


def _inputs(request: InferRequest) -> tuple[InferInput, InferInput | None]:
    """``x`` first, then ``vectors`` if sent; any other input is refused."""
    names = [tensor.name for tensor in request.inputs]
    if names[0] != INPUT_NAME:
        raise InvalidInput(
            f"inputs[0].name: the model's input is {INPUT_NAME!r}, got {names[0]!r}",
            field="inputs[0].name",
        )
    if len(names) == 2 and names[1] != VECTORS_NAME:
        raise InvalidInput(
            f"inputs[1].name: the second input can only be {VECTORS_NAME!r} (for hvp), got "
            f"{names[1]!r}",
            field="inputs[1].name",
        )
    return request.inputs[0], request.inputs[1] if len(names) == 2 else None


def _check_names(request: InferRequest, model: LoadedModel) -> None:
    """A body that names its model (KServe's client does) must name the URL's."""
    manifest = model.manifest
    for field, named, actual in (
        ("model_name", request.model_name, manifest.name),
        ("model_version", request.model_version, manifest.version),
    ):
        if named not in (None, "", actual):
            raise InvalidInput(
                f"{field}: the body names {named!r}, the URL {actual!r}", field=field
            )


def prepare(
    service: DerivativeService,
    model: LoadedModel,
    body: bytes,
    header_length: str | None,
    max_samples: int,
) -> PreparedInfer:
    """Split, parse and check a request body; decode its inputs; validate and prepare
    every derivative output it asks for, their sizes together too. Raises before any work."""
    header, tail = binary.split_body(body, header_length)
    raw, request = _parse(header)
    _check_names(request, model)
    slices = binary.take_binary(raw["inputs"], tail, "inputs")
    tensor, vectors_tensor = _inputs(request)
    _check_input_shape(tensor, model, max_samples)
    source = _decode(tensor, slices[0], 0)
    vectors = None if vectors_tensor is None else _decode(vectors_tensor, slices[1], 1)
    requested = _requested(request)
    shared = oip_derivatives.fields_of(request.parameters or {}, "parameters")
    names = [name for name, _, _ in requested if name != OUTPUT_NAME]
    key = oip_derivatives.unread(names, shared)
    if key is not None:
        wanted = ", ".join(names) if names else "none"
        raise InvalidInput(
            f"parameters.{key}: no derivative output asked for takes it (asked for: "
            f"{wanted}; the derivative outputs are {', '.join(DERIVED)})",
            field=f"parameters.{key}",
        )
    if vectors is not None and "hvp" not in names:
        raise InvalidInput(
            f"inputs[1]: {VECTORS_NAME!r} is read by the hvp output only; ask for hvp in "
            "outputs, or leave it out",
            field="inputs[1]",
        )
    derived = []
    for i, (name, binary_output, parameters) in enumerate(requested):
        if name == OUTPUT_NAME:
            continue
        own = oip_derivatives.fields_of(parameters, f"outputs[{i}].parameters")
        derived.append(
            oip_derivatives.derived_output(
                service, i, name, binary_output, shared, own, model, source, vectors
            )
        )
    oip_derivatives.check_total(derived, service.settings.max_result_bytes)
    return PreparedInfer(
        model=model,
        x=source.to(device=model.device, dtype=torch.float32),
        request_id=request.id,
        outputs=tuple((name, binary_output) for name, binary_output, _ in requested),
        derived=tuple(derived),
    )


def forward(prepared: PreparedInfer) -> torch.Tensor:
    """The model's output for the batch, without autograd, on the CPU."""
    with torch.inference_mode():
        output: torch.Tensor = prepared.model.module(prepared.x)
    return output.reshape(prepared.x.shape[0], *prepared.model.manifest.output_shape).cpu()


def encode(prepared: PreparedInfer, tensors: dict[str, torch.Tensor]) -> binary.Encoded:
    """The ``$inference_response`` body: each output asked for, in order, as numbers or
    raw bytes."""
    manifest = prepared.model.manifest
    body: dict[str, Any] = {"model_name": manifest.name, "model_version": manifest.version}
    if prepared.request_id is not None:
        body["id"] = prepared.request_id
    as_bytes = dict(prepared.outputs)
    body["outputs"] = [
        codec.tensor_object(name, tensors[name], "binary" if raw else "json")
        for name, raw in prepared.outputs
    ]
    return binary.encode(body, lambda output: as_bytes[output["name"]])


async def infer(
    registry: Registry,
    service: DerivativeService,
    name: str,
    version: str | None,
    body: bytes,
    header_length: str | None,
    max_samples: int,
    disconnected: Callable[[], Awaitable[bool]] | None = None,
) -> binary.Encoded:
    """Check, run and encode one inference request; the work runs off the event loop
    (the derivative outputs through the service's queue, one after another, within one
    deadline; dropped if ``disconnected`` says the client went away)."""
    started = time.perf_counter()
    model = lookup(registry, name, version)
    prepared = await anyio.to_thread.run_sync(
        prepare, service, model, body, header_length, max_samples
    )
    tensors: dict[str, torch.Tensor] = {}
    if prepared.wants_output:
        tensors[OUTPUT_NAME] = await anyio.to_thread.run_sync(forward, prepared)
    for derived in prepared.derived:
        tensors[derived.name] = await oip_derivatives.compute(
            service, derived, started=started, disconnected=disconnected
        )
    return await anyio.to_thread.run_sync(encode, prepared, tensors)
