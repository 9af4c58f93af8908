"""Tensor objects <-> tensors: every datatype round-trips; every malformed object is a 422."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from app import codec
from app.errors import InvalidInput
from app.schemas import TensorObject


@pytest.mark.parametrize("datatype", sorted(codec.TORCH_DTYPES))
def test_base64_round_trip_for_every_datatype(datatype: str) -> None:
    dtype = codec.TORCH_DTYPES[datatype]
    source = (torch.arange(6) % 2).to(dtype) if dtype == torch.bool else torch.arange(6).to(dtype)
    encoded = codec.tensor_object("t", source.reshape(2, 3), "base64")
    assert encoded["datatype"] == datatype and encoded["shape"] == [2, 3]
    decoded = codec.decode_tensor(TensorObject.model_validate(encoded), "t")
    assert decoded.dtype == dtype and torch.equal(decoded, source.reshape(2, 3))


def test_json_numbers_flat_or_nested_decode_alike() -> None:
    flat = TensorObject(shape=[2, 2], datatype="FP32", data=[1, 2.5, -3, 4])
    nested = TensorObject(shape=[2, 2], datatype="FP32", data=[[1, 2.5], [-3, 4]])
    expected = torch.tensor([[1, 2.5], [-3, 4]])
    assert torch.equal(codec.decode_tensor(flat, "x"), expected)
    assert torch.equal(codec.decode_tensor(nested, "x"), expected)


def test_json_and_base64_encodings_carry_identical_float32_values() -> None:
    values = torch.randn(1000, dtype=torch.float32)
    as_json = codec.dumps(codec.tensor_object("t", values, "json"))
    parsed = np.asarray(__import__("orjson").loads(as_json)["data"], dtype=np.float32)
    raw = base64.b64decode(codec.tensor_object("t", values, "base64")["data"])
    assert np.array_equal(parsed, np.frombuffer(raw, dtype="<f4"))


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (TensorObject(shape=[3], data=[1, 2]), "inputs[0].data: holds 2 numbers; shape expects 3"),
        (TensorObject(shape=[2], data="!!notbase64"), "inputs[0].data: malformed base64"),
        (
            TensorObject(shape=[2], data=base64.b64encode(b"\x00" * 4).decode()),
            "expect 2 x 4 = 8 bytes",
        ),
        (TensorObject(shape=[2], data=[1.0, float("nan")]), "inputs[0].data: contains NaN or Inf"),
        (TensorObject(shape=[1], data=[float("inf")]), "contains NaN or Inf"),
        (TensorObject(shape=[2], data=["a", "b"]), "expected numbers"),
        (TensorObject(shape=[2, 2], data=[[1, 2], [3]]), "expected numbers"),
        (TensorObject(shape=[2], datatype="INT64", data=[1.5, 2]), "INT64 expects integers"),
        (TensorObject(shape=[2], datatype="INT8", data=[1, 300]), "INT8 holds integers from -128"),
        (TensorObject(shape=[4], data=[[1, 1], [1, 1]]), "nested as [2, 2]; shape says [4]"),
        (TensorObject(shape=[1], data=[1e300]), "a value is outside the range of FP32"),
    ],
)
def test_malformed_tensor_objects_name_the_field(obj: TensorObject, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        codec.decode_tensor(obj, "inputs[0]")
    assert message in info.value.detail
    assert info.value.field == "inputs[0].data"
