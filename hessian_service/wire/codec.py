"""Tensor objects (JSON numbers, base64 or binary) <-> ``torch.Tensor``, and response bodies.

Decoding checks everything a tensor object can get wrong -- datatype, shape against the
data length, malformed base64, NaN or Inf -- and names the field at fault. Encoding writes
the body with orjson straight from contiguous numpy buffers: FastAPI's default encoder
took about a second for one 784x784 Hessian as nested lists.
"""

from __future__ import annotations

import base64
import binascii
import math
import sys
from typing import Any

import numpy as np
import orjson
import torch

from hessian_service.errors import InvalidInput
from hessian_service.wire import binary
from hessian_service.wire.schemas import TensorObject

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "FP32": torch.float32,
    "FP64": torch.float64,
}
DATATYPES: dict[torch.dtype, str] = {dtype: name for name, dtype in TORCH_DTYPES.items()}
# The floating-point datatypes an input (or an operator's vectors) may be sent in.
FLOAT_DATATYPES = ("FP32", "FP64", "FP16", "BF16")
_INTEGER_DATATYPES = {"BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64"}

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise RuntimeError("the base64 tensor encoding assumes a little-endian host")


# Characters of base64 decoded per call: each call holds the GIL (about 1 ms here), and a
# whole 64 MiB string in one call held it for 0.3 s, stalling the event loop.
BASE64_STEP = 1 << 20


def _b64decode(text: str) -> np.ndarray:
    """Strict base64 (``validate=True``) as uint8, in slices of ``BASE64_STEP`` characters
    so that other threads get the GIL between them; the slices are copied into one
    uninitialised buffer by numpy, which lets the GIL go while it copies. Padding may
    only end the whole text."""
    if len(text) <= BASE64_STEP:
        return np.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=np.uint8)
    if len(text) % 4:
        raise binascii.Error("Incorrect padding")
    if text.find("=", 0, len(text) - 2) >= 0:
        raise binascii.Error("Excess data after padding")
    padding = 2 if text.endswith("==") else 1 if text.endswith("=") else 0
    out = np.empty(len(text) // 4 * 3 - padding, dtype=np.uint8)
    at = 0
    for start in range(0, len(text), BASE64_STEP):
        part = base64.b64decode(text[start : start + BASE64_STEP], validate=True)
        out[at : at + len(part)] = np.frombuffer(part, dtype=np.uint8)
        at += len(part)
    return out


def _decode_base64(text: str, datatype: str, count: int, field: str) -> torch.Tensor:
    itemsize = torch.empty((), dtype=TORCH_DTYPES[datatype]).element_size()
    expected = 4 * math.ceil(count * itemsize / 3)
    if len(text) != expected and len(text) > BASE64_STEP:  # refused without decoding it
        raise InvalidInput(
            f"{field}: base64 data of {len(text)} characters; shape and datatype {datatype} "
            f"expect {count} x {itemsize} = {count * itemsize} bytes, {expected} characters",
            field=field,
        )
    try:
        raw = _b64decode(text)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{field}: malformed base64 ({exc})", field=field) from None
    return _from_bytes(raw, datatype, count, field, "base64 data")


def _from_bytes(
    raw: bytes | memoryview | np.ndarray, datatype: str, count: int, field: str, what: str
) -> torch.Tensor:
    dtype = TORCH_DTYPES[datatype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(raw) != count * itemsize:
        raise InvalidInput(
            f"{field}: {what} holds {len(raw)} bytes; shape and datatype {datatype} "
            f"expect {count} x {itemsize} = {count * itemsize} bytes",
            field=field,
        )
    if count == 0:
        return torch.empty(0, dtype=dtype)
    if isinstance(raw, np.ndarray):  # decoded here, writable: shared, not copied
        return torch.from_numpy(raw).view(dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype)


def decode_binary(raw: memoryview, datatype: str, shape: list[int], field: str) -> torch.Tensor:
    """A tensor from its raw little-endian bytes (the binary tensor extension).

    ``field`` names the tensor's ``binary_data_size`` parameter for error messages.
    """
    flat = _from_bytes(raw, datatype, math.prod(shape), field, "binary data")
    if flat.is_floating_point() and not bool(torch.isfinite(flat).all()):
        raise InvalidInput(f"{field}: the binary data contains NaN or Inf", field=field)
    return flat.reshape(shape)


def _check_integers(flat: np.ndarray, datatype: str, field: str) -> None:
    if (flat != np.round(flat)).any():
        raise InvalidInput(f"{field}: datatype {datatype} expects integers", field=field)
    dtype = TORCH_DTYPES[datatype]
    low, high = (0, 1) if dtype == torch.bool else (torch.iinfo(dtype).min, torch.iinfo(dtype).max)
    if flat.size and (flat.min() < low or flat.max() > high):
        raise InvalidInput(
            f"{field}: datatype {datatype} holds integers from {low} to {high}", field=field
        )


def _leaf_types(data: list[Any], depth: int = 0) -> set[type]:
    """The types of a (nested) list's leaves; one C-level pass per list (about 20 ms for
    a million numbers), so that one ``true`` among floats is found, not cast to 1.0."""
    types = set(map(type, data))
    if list in types and depth < 32:
        types.discard(list)
        for item in data:
            if type(item) is list:
                types |= _leaf_types(item, depth + 1)
    return types


def check_numbers(data: list[Any], field: str, *, booleans: bool = False) -> None:
    """Refuse JSON booleans (``true`` is not the number 1) and anything else that is not
    a number in a (nested) list; ``booleans`` allows them (a BOOL tensor)."""
    types = _leaf_types(data)
    if bool in types and not booleans:
        raise InvalidInput(
            f"{field}: expected numbers, got a JSON boolean (true/false); write 1 or 0, "
            "or send datatype BOOL",
            field=field,
        )
    if not types <= {int, float, bool}:
        raise InvalidInput(
            f"{field}: expected numbers in a flat or regularly nested list", field=field
        )


def _decode_numbers(data: list[Any], datatype: str, shape: list[int], field: str) -> torch.Tensor:
    count = math.prod(shape)
    check_numbers(data, field, booleans=datatype == "BOOL")
    try:
        array = np.asarray(data)
    except (ValueError, TypeError):
        array = np.asarray([None])  # ragged nesting: reported below as not numbers
    if array.dtype.kind not in "biuf" and array.size:
        raise InvalidInput(
            f"{field}: expected numbers in a flat or regularly nested list", field=field
        )
    array = array.astype(np.float64)
    if array.ndim > 1 and list(array.shape) != list(shape):
        raise InvalidInput(
            f"{field}: nested as {list(array.shape)}; shape says {list(shape)} "
            "(send a flat list, or nest it exactly as the shape)",
            field=field,
        )
    if array.size != count:
        raise InvalidInput(
            f"{field}: holds {array.size} numbers; shape expects {count}", field=field
        )
    flat = array.reshape(-1)
    if not np.isfinite(flat).all():
        raise InvalidInput(f"{field}: contains NaN or Inf", field=field)
    if datatype in _INTEGER_DATATYPES:
        _check_integers(flat, datatype, field)
    converted = torch.from_numpy(flat).to(TORCH_DTYPES[datatype])
    if converted.is_floating_point() and not bool(torch.isfinite(converted).all()):
        raise InvalidInput(f"{field}: a value is outside the range of {datatype}", field=field)
    return converted


def decode_tensor(obj: TensorObject, field: str) -> torch.Tensor:
    """A tensor object as a tensor of its declared shape and datatype.

    ``field`` is the object's place in the request (e.g. ``inputs[0]``) for error messages.
    """
    count = math.prod(obj.shape)
    data_field = f"{field}.data"
    if isinstance(obj.data, str):
        flat = _decode_base64(obj.data, obj.datatype, count, data_field)
    else:
        flat = _decode_numbers(obj.data, obj.datatype, obj.shape, data_field)
    if flat.is_floating_point() and not bool(torch.isfinite(flat).all()):
        raise InvalidInput(f"{data_field}: contains NaN or Inf", field=data_field)
    return flat.reshape(obj.shape)


def tensor_object(name: str, tensor: torch.Tensor, encoding: str) -> dict[str, Any]:
    """A tensor as a tensor object; ``data`` stays a numpy array for orjson to write."""
    cpu = tensor.detach().to("cpu").contiguous()
    datatype = DATATYPES[cpu.dtype]
    flat = cpu.reshape(-1)
    raw = flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat  # numpy has no bf16
    if encoding == "base64":
        data: Any = base64.b64encode(raw.numpy().tobytes()).decode("ascii")
    elif encoding == "binary":  # the raw bytes, written after the JSON header by encode_body
        data = raw.numpy()
    else:
        data = (flat.float() if flat.dtype == torch.bfloat16 else flat).numpy()
    return {"name": name, "shape": list(cpu.shape), "datatype": datatype, "data": data}


def dumps(body: dict[str, Any]) -> bytes:
    """Serialize a response body, numpy arrays included, with orjson."""
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def encode_body(body: dict[str, Any], encoding: str) -> binary.Encoded:
    """A response body in its encoding: JSON, or with ``binary`` every output's data as
    raw bytes after the JSON header (the Open Inference Protocol's binary extension)."""
    if encoding == "binary":
        return binary.encode(body, lambda _output: True)
    return binary.Encoded(dumps(body))
