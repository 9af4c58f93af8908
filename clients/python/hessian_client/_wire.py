"""What goes over the wire: request bodies, response decoding, errors (numpy only).

The client does not import the service: it reads the same formats on its own -- JSON
numbers, base64, and the Open Inference Protocol binary framing (a JSON header of
``Inference-Header-Content-Length`` bytes, then each output's raw little-endian bytes) --
so that it stays light (httpx + numpy) and its tests check the server independently.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_DATA_SIZE = "binary_data_size"
NUMPY_DTYPES: dict[str, str] = {
    "FP64": "<f8",
    "FP32": "<f4",
    "FP16": "<f2",
    "INT64": "<i8",
    "INT32": "<i4",
    "INT16": "<i2",
    "INT8": "i1",
    "UINT8": "u1",
    "BOOL": "?",
    "BF16": "<u2",  # raw bfloat16 bits; widened to float32 by decode_array
}


class HessianServiceError(Exception):
    """Every failure the client reports: an HTTP error with the server's problem details,
    or a transport failure (``status`` None) after the retries ran out.

    ``problem`` is the RFC 9457 body (``title``, ``status``, ``detail``, ``field``, ...)
    when the server sent one.
    """

    def __init__(
        self, message: str, *, status: int | None = None, problem: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.problem = problem or {}

    @property
    def detail(self) -> str:
        return str(self.problem.get("detail", self))

    @property
    def field(self) -> str | None:
        value = self.problem.get("field")
        return None if value is None else str(value)


def error_from(status: int, content: bytes, what: str) -> HessianServiceError:
    """The exception for an HTTP error response, with its problem details when it has them."""
    try:
        problem = json.loads(content)
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        problem = {"status": status, "detail": content[:500].decode(errors="replace")}
    detail = problem.get("detail") or problem.get("error") or ""
    title = problem.get("title", "error")
    return HessianServiceError(
        f"{what}: {status} {title}: {detail}", status=status, problem=problem
    )


def datatype_of(array: np.ndarray) -> tuple[np.ndarray, str]:
    """The array as it is sent: float64 stays FP64, everything else becomes FP32."""
    if array.dtype == np.float64:
        return np.ascontiguousarray(array, dtype="<f8"), "FP64"
    return np.ascontiguousarray(array, dtype="<f4"), "FP32"


def tensor_object(array: np.ndarray, name: str = "x") -> dict[str, Any]:
    """An input tensor object with base64 data (compact, and exact for every float)."""
    sent, datatype = datatype_of(array)
    return {
        "name": name,
        "shape": list(sent.shape),
        "datatype": datatype,
        "data": base64.b64encode(sent.tobytes()).decode("ascii"),
    }


def derivative_body(
    model: str,
    x: np.ndarray,
    *,
    output_index: int | list[int] | None,
    objective: dict[str, Any] | None,
    encoding: str,
    layout: str,
    precision: str,
    rows: tuple[int, int] | None = None,
    result_precision: str | None = None,
) -> dict[str, Any]:
    """The body of ``POST /hessian`` or ``POST /jacobian``; ``rows`` is ``(start, stop)``."""
    body: dict[str, Any] = {
        "model": model,
        "inputs": [tensor_object(x)],
        "encoding": encoding,
        "layout": layout,
        "precision": precision,
    }
    if output_index is not None:
        body["output_index"] = output_index
    if objective is not None:
        body["objective"] = objective
    if rows is not None:
        body["rows"] = {"start": int(rows[0]), "stop": int(rows[1])}
    if result_precision is not None:
        body["result_precision"] = result_precision
    return body


def decode_array(obj: Mapping[str, Any], raw: bytes | memoryview | None = None) -> np.ndarray:
    """A tensor object (numbers, base64, or ``raw`` bytes from the binary framing) as an
    array of its shape; BF16 comes back as float32."""
    datatype = obj["datatype"]
    if datatype not in NUMPY_DTYPES:
        raise HessianServiceError(f"unsupported datatype {datatype!r} in the response")
    dtype = np.dtype(NUMPY_DTYPES[datatype])
    shape = [int(d) for d in obj["shape"]]
    count = math.prod(shape)
    if raw is not None:
        array = np.frombuffer(raw, dtype=dtype)
    elif isinstance(obj.get("data"), str):
        array = np.frombuffer(base64.b64decode(obj["data"]), dtype=dtype)
    elif datatype == "BF16":  # json numbers are the bfloat16 values: exact in float32
        array = np.asarray(obj.get("data", []), dtype=np.float32).reshape(-1)
        dtype = np.dtype("<f4")
    else:
        array = np.asarray(obj.get("data", []), dtype=np.float64).astype(dtype).reshape(-1)
    if array.size != count:
        raise HessianServiceError(
            f"response tensor {obj.get('name')!r}: {array.size} values for shape {shape}"
        )
    if datatype == "BF16" and dtype == np.uint16:  # raw bits: the high half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.reshape(shape)


@dataclass(frozen=True)
class Decoded:
    """A response: its JSON part and each output as an array, by name."""

    body: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def binary_layout(body: Mapping[str, Any]) -> list[tuple[dict[str, Any], int, int]]:
    """(tensor object, offset, size) of each output carried as bytes after the header."""
    layout = []
    offset = 0
    for output in body.get("outputs", []):
        size = (output.get("parameters") or {}).get(BINARY_DATA_SIZE)
        if size is not None:
            layout.append((output, offset, int(size)))
            offset += int(size)
    return layout


def decode_response(content: bytes, headers: Mapping[str, str]) -> Decoded:
    """Decode a JSON or binary-framed response into its outputs."""
    header_length = headers.get(HEADER_LENGTH)
    if header_length is None:
        body = json.loads(content)
        return Decoded(body, {o["name"]: decode_array(o) for o in body.get("outputs", [])})
    length = int(header_length)
    body = json.loads(content[:length])
    tail = memoryview(content)[length:]
    layout = binary_layout(body)
    if sum(size for _, _, size in layout) != len(tail):
        raise HessianServiceError(
            f"binary response: {len(tail)} bytes after the header, but the outputs' "
            f"{BINARY_DATA_SIZE} add up to {sum(size for _, _, size in layout)}"
        )
    raws = {output["name"]: tail[offset : offset + size] for output, offset, size in layout}
    arrays = {o["name"]: decode_array(o, raws.get(o["name"])) for o in body.get("outputs", [])}
    return Decoded(body, arrays)
