"""The binary framing both ways, the client's files, and its retry delays.

The server's encoder (``wire.binary``) and the client's decoder (``hessian_client._wire``)
are written separately; each test checks one against the other and against numpy's and
safetensors' own readers, value for value.
"""

from __future__ import annotations

import json
import re
import time
from email.utils import formatdate
from pathlib import Path

import numpy as np
import pytest
import torch
from hessian_client._retry import RetryPolicy, retry_after_seconds
from hessian_client._wire import HEADER_LENGTH, HessianServiceError, decode_response
from hessian_client.files import Inputs, OutputFile, save
from safetensors.numpy import load_file, save_file

from hessian_service.errors import InvalidInput
from hessian_service.wire import binary, codec

TENSORS = {
    "fp32": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7,
    "fp64": torch.linspace(-1, 1, 5, dtype=torch.float64),
    "int64": torch.tensor([[-(2**40), 3]], dtype=torch.int64),
    "bool": torch.tensor([True, False, True]),
    "fp16": torch.tensor([0.5, -2.25], dtype=torch.float16),
}


def test_encode_then_decode_gives_every_tensor_back_bit_for_bit() -> None:
    outputs = [codec.tensor_object(name, t, "binary") for name, t in TENSORS.items()]
    encoded = codec.encode_body({"model": "m", "outputs": outputs}, "binary")
    assert encoded.media_type == "application/octet-stream"
    length = int(encoded.headers[HEADER_LENGTH])
    header = json.loads(encoded.body[:length])
    assert [o["parameters"]["binary_data_size"] for o in header["outputs"]] == [
        t.numel() * t.element_size() for t in TENSORS.values()
    ]
    assert all("data" not in o for o in header["outputs"])
    decoded = decode_response(encoded.body, encoded.headers)
    for name, tensor in TENSORS.items():
        assert decoded.arrays[name].dtype == tensor.numpy().dtype
        assert np.array_equal(decoded.arrays[name], tensor.numpy()), name


def test_bf16_travels_as_its_raw_bits() -> None:
    tensor = torch.tensor([1.5, -0.03125, 3.0e38], dtype=torch.bfloat16)
    encoded = codec.encode_body({"outputs": [codec.tensor_object("b", tensor, "binary")]}, "binary")
    assert len(encoded.body) - int(encoded.headers[HEADER_LENGTH]) == 6
    decoded = decode_response(encoded.body, encoded.headers).arrays["b"]
    assert np.array_equal(decoded, tensor.float().numpy())


def test_only_selected_outputs_become_binary_and_json_stays_json() -> None:
    outputs = [
        codec.tensor_object("a", TENSORS["fp32"], "binary"),
        codec.tensor_object("b", TENSORS["fp64"], "binary"),
    ]
    encoded = binary.encode({"outputs": outputs}, lambda o: o["name"] == "b")
    decoded = decode_response(encoded.body, encoded.headers)
    assert "data" in decoded.body["outputs"][0]
    assert np.array_equal(decoded.arrays["a"], TENSORS["fp32"].numpy())
    assert np.array_equal(decoded.arrays["b"], TENSORS["fp64"].numpy())
    plain = codec.encode_body(
        {"outputs": [codec.tensor_object("a", TENSORS["fp32"], "json")]}, "json"
    )
    assert plain.media_type == "application/json" and plain.headers == {}


def test_split_and_take_check_every_length() -> None:
    header = json.dumps(
        {
            "inputs": [
                {"parameters": {"binary_data_size": 4}},
                {"data": [1]},
                {"parameters": {"binary_data_size": 2}},
            ]
        }
    ).encode()
    body = header + b"abcdXY"
    head, tail = binary.split_body(body, str(len(header)))
    assert head == header
    slices = binary.take_binary(json.loads(head)["inputs"], tail, "inputs")
    assert [None if s is None else bytes(s) for s in slices] == [b"abcd", None, b"XY"]
    with pytest.raises(
        InvalidInput, match=re.escape("inputs[2].parameters.binary_data_size: 2 bytes")
    ):
        binary.take_binary(json.loads(head)["inputs"], tail[:5], "inputs")
    with pytest.raises(InvalidInput, match="add up to 6"):
        binary.take_binary(json.loads(head)["inputs"], memoryview(b"abcdXYZ"), "inputs")
    with pytest.raises(InvalidInput, match="binary_data_size: expected a byte count"):
        binary.take_binary([{"parameters": {"binary_data_size": True}}], tail, "inputs")


def test_client_refuses_a_truncated_binary_response() -> None:
    encoded = codec.encode_body(
        {"outputs": [codec.tensor_object("a", TENSORS["fp32"], "binary")]}, "binary"
    )
    with pytest.raises(HessianServiceError, match="add up to 48"):
        decode_response(encoded.body[:-4], encoded.headers)


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_output_file_writes_in_place_and_renames_when_finished(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    full = rng.random((5, 3, 3)).astype(np.float32)
    path = tmp_path / f"h{suffix}"
    output = OutputFile(path, full.shape, full.dtype, "hessian")
    for index in (3, 0, 4, 1, 2):  # out of order, as concurrent batches finish
        raw = full[index].tobytes()
        output.write(index, 0, raw[:10])
        output.write(index, 10, raw[10:])
    assert not path.exists() and output.partial.exists()
    assert output.finish() == path
    assert not output.partial.exists()
    read = np.load(path) if suffix == ".npy" else load_file(str(path))["hessian"]
    assert read.dtype == np.float32 and np.array_equal(read, full)


def test_save_writes_one_array_readable_by_numpy_and_safetensors(tmp_path: Path) -> None:
    array = np.diag([0.0, 0.0, 4.0, 0.0])
    assert np.array_equal(np.load(save(tmp_path / "a.npy", array, "hessian")), array)
    safetensors = load_file(str(save(tmp_path / "a.safetensors", array, "hessian")))
    assert np.array_equal(safetensors["hessian"], array)


def test_inputs_read_batches_from_npy_and_safetensors(tmp_path: Path) -> None:
    data = np.random.default_rng(1).random((7, 2, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    save_file({"x": data}, str(tmp_path / "x.safetensors"))
    for source in (data, tmp_path / "x.npy", tmp_path / "x.safetensors"):
        inputs = Inputs(source)
        assert inputs.shape == (7, 2, 3) and len(inputs) == 7
        assert np.array_equal(inputs.batch(2, 6), data[2:6])
        assert np.array_equal(inputs.batch(6, 7), data[6:7])
    save_file({"x": data, "y": data}, str(tmp_path / "two.safetensors"))
    with pytest.raises(HessianServiceError, match="name the one to use"):
        Inputs(tmp_path / "two.safetensors")
    assert np.array_equal(Inputs(tmp_path / "two.safetensors", key="y").batch(0, 1), data[:1])


def test_retry_delays_follow_retry_after_else_grow_exponentially() -> None:
    policy = RetryPolicy(retries=5, backoff=0.5, max_backoff=4.0)
    assert policy.delay(0, "3") == 3.0
    assert policy.delay(0, "120") == 4.0  # capped
    for attempt, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (6, 4.0)]:
        delays = [policy.delay(attempt) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, min(delays), max(delays))
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    in_ten = retry_after_seconds(formatdate(time.time() + 10, usegmt=True))
    assert in_ten is not None and 8 <= in_ten <= 10
