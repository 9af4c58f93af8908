"""The Open Inference Protocol's binary tensor extension: a JSON header, then raw bytes.

A body in this framing is a JSON object of ``Inference-Header-Content-Length`` bytes
followed by the tensors' bytes, little-endian and row-major, in the order of the tensor
objects that carry ``parameters.binary_data_size`` (and no ``data``). Triton and KServe
use it for requests and responses; here it carries ``/v2/.../infer`` inputs and outputs
and the results of ``/jacobian`` and ``/hessian`` with ``encoding: "binary"``: one
784x784 float32 Hessian is 2,458,624 bytes instead of 7-12 MB of JSON numbers.

Splitting a request checks every size before anything is decoded: the header length
against the body, each ``binary_data_size`` against what is left, and their sum against
the body's tail, naming the field at fault.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from hessian_service.errors import InvalidInput

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/octet-stream"
JSON_CONTENT_TYPE = "application/json"
BINARY_DATA_SIZE = "binary_data_size"


@dataclass(frozen=True)
class Encoded:
    """A response body ready to send: its bytes, content type and extra headers."""

    body: bytes
    media_type: str = JSON_CONTENT_TYPE
    headers: dict[str, str] = field(default_factory=dict)


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON header and the binary tail of a request body.

    With no ``Inference-Header-Content-Length`` the whole body is JSON and the tail is
    empty.
    """
    if header_length is None:
        return body, memoryview(b"")
    text = header_length.strip()
    if not text.isdigit():
        raise InvalidInput(
            f"{HEADER_LENGTH}: expected the JSON header's length in bytes, got {header_length!r}",
            field=HEADER_LENGTH,
        )
    length = int(text)
    if not 0 < length <= len(body):
        raise InvalidInput(
            f"{HEADER_LENGTH}: {length} is outside the body's {len(body)} bytes",
            field=HEADER_LENGTH,
        )
    return body[:length], memoryview(body)[length:]


def binary_data_size(tensor: dict[str, Any], field: str) -> int | None:
    """The tensor object's ``parameters.binary_data_size`` (checked), or None."""
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict) or BINARY_DATA_SIZE not in parameters:
        return None
    size = parameters[BINARY_DATA_SIZE]
    where = f"{field}.parameters.{BINARY_DATA_SIZE}"
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidInput(f"{where}: expected a byte count (an integer >= 0)", field=where)
    if "data" in tensor:
        raise InvalidInput(
            f"{field}.data: a tensor with {BINARY_DATA_SIZE} carries its data after the JSON "
            "header; remove data",
            field=f"{field}.data",
        )
    return size


def take_binary(
    tensors: Sequence[dict[str, Any]], tail: memoryview, prefix: str
) -> list[memoryview | None]:
    """Each tensor's slice of the binary tail (None for those that carry ``data``).

    ``prefix`` names the list in errors, e.g. ``inputs`` gives ``inputs[1].parameters...``.
    The sizes must add up to the tail exactly: bytes left over mean the header and the
    body disagree, and are refused rather than guessed at.
    """
    slices: list[memoryview | None] = []
    offset = 0
    for i, tensor in enumerate(tensors):
        size = binary_data_size(tensor, f"{prefix}[{i}]")
        if size is None:
            slices.append(None)
            continue
        if offset + size > len(tail):
            where = f"{prefix}[{i}].parameters.{BINARY_DATA_SIZE}"
            raise InvalidInput(
                f"{where}: {size} bytes, but only {len(tail) - offset} bytes of binary data "
                f"are left after the JSON header",
                field=where,
            )
        slices.append(tail[offset : offset + size])
        offset += size
    if offset != len(tail):
        raise InvalidInput(
            f"{HEADER_LENGTH}: the body holds {len(tail)} bytes after the JSON header, but "
            f"the tensors' {BINARY_DATA_SIZE} add up to {offset}",
            field=HEADER_LENGTH,
        )
    return slices


def encode(body: dict[str, Any], binary: Callable[[dict[str, Any]], bool]) -> Encoded:
    """Write ``body`` with the ``outputs`` that ``binary`` selects as raw bytes.

    Each output's ``data`` is a numpy array (``codec.tensor_object`` leaves it so); a
    selected output gets ``parameters.binary_data_size`` instead of ``data`` and its
    bytes follow the JSON header in output order. With no output selected the body is
    plain JSON.
    """
    buffers: list[memoryview] = []
    outputs: list[dict[str, Any]] = []
    for output in body.get("outputs", []):
        if not binary(output):
            outputs.append(output)
            continue
        raw = np.ascontiguousarray(output["data"]).reshape(-1).view(np.uint8).data
        buffers.append(raw)
        parameters = {**(output.get("parameters") or {}), BINARY_DATA_SIZE: raw.nbytes}
        outputs.append(
            {key: value for key, value in output.items() if key != "data"}
            | {"parameters": parameters}
        )
    header = orjson.dumps({**body, "outputs": outputs}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not buffers:
        return Encoded(header)
    return Encoded(
        b"".join([header, *buffers]),
        BINARY_CONTENT_TYPE,
        {HEADER_LENGTH: str(len(header))},
    )
