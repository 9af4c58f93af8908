"""Tensor objects <-> tensors: every datatype round-trips; every malformed object is a 422."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from hessian_service.errors import InvalidInput
from hessian_service.wire import codec
from hessian_service.wire.schemas import TensorObject


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


@pytest.mark.parametrize("size", [0, 1, 2, 3, 5, 6, 7, 12, 13, 30])
def test_base64_in_slices_decodes_as_one_call(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    """With an 8-character step every slice boundary is exercised; the result is what one
    strict ``b64decode`` gives, and padding anywhere but the end is refused as it is."""
    monkeypatch.setattr(codec, "BASE64_STEP", 8)
    raw = bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8))
    text = base64.b64encode(raw).decode()
    assert codec._b64decode(text).tobytes() == base64.b64decode(text, validate=True) == raw
    for bad in (text + "Q", "QQ==" + text, text[:4] + "QQ==" + text[4:]):
        if len(bad) <= 8 or bad.endswith("QQ=="):
            continue  # one slice, or padding only at the end: no slicing involved
        with pytest.raises(ValueError):
            base64.b64decode(bad, validate=True)
        with pytest.raises(ValueError):
            codec._b64decode(bad)


def test_long_base64_of_the_wrong_length_is_refused_before_decoding() -> None:
    text = "A" * (codec.BASE64_STEP + 4)
    with pytest.raises(
        InvalidInput, match=rf"base64 data of {len(text)} characters; .* 16 bytes, 24 characters"
    ):
        codec.decode_tensor(TensorObject(shape=[4], datatype="FP32", data=text), "inputs[0]")


def test_decoding_64_mib_of_base64_lets_other_threads_run() -> None:
    """A thread decoding a 64 MiB base64 tensor (one call held the GIL for about 0.3 s)
    while this one ticks every millisecond: no tick waits 50 ms."""
    import threading
    import time

    values = np.random.default_rng(0).standard_normal(12 << 20).astype(np.float32)
    text = base64.b64encode(values.tobytes()).decode()
    tensor = TensorObject(shape=[values.size], datatype="FP32", data=text)
    worker = threading.Thread(target=codec.decode_tensor, args=(tensor, "x"))
    gaps: list[float] = []
    worker.start()
    last = time.perf_counter()
    while worker.is_alive():
        time.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    worker.join()
    assert len(text) >= 64 << 20
    assert max(gaps) < 0.05, f"longest wait {max(gaps) * 1000:.0f} ms over {len(gaps)} ticks"
