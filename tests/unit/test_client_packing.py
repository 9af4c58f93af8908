"""The client's unpacking of the packed layout and its decoding of FP16 / BF16 results,
against numpy's own triangle indices and torch's bfloat16 (independent of the server)."""

from __future__ import annotations

import base64

import numpy as np
import torch
from hessian_client import unpack
from hessian_client._wire import decode_array

from hessian_service.wire import packing


def test_unpack_inverts_the_servers_packing_for_a_batch() -> None:
    n = 7
    a = torch.randn(3, n, n, dtype=torch.float64)
    sym = a + a.transpose(1, 2)
    packed = packing.pack_rows(sym)
    assert packed.shape == (3, n * (n + 1) // 2)
    rows, cols = np.triu_indices(n)
    assert np.array_equal(packed.numpy(), sym.numpy()[:, rows, cols])  # numpy's order
    assert np.array_equal(unpack(packed.numpy(), n), sym.numpy())
    segment = packing.pack_rows(sym[:, 2:5], 2)
    start, stop = packing.row_offset(n, 2), packing.row_offset(n, 5)
    assert np.array_equal(segment.numpy(), packed.numpy()[:, start:stop])


def test_half_precision_results_decode_to_their_values() -> None:
    values = torch.tensor([1.0, -2.5, 3.140625, 1e-3, 6.0e4])
    for dtype, name in ((torch.float16, "FP16"), (torch.bfloat16, "BF16")):
        rounded = values.to(dtype)
        raw = rounded.view(torch.int16).numpy().tobytes()
        as_base64 = {
            "name": "h",
            "shape": [5],
            "datatype": name,
            "data": base64.b64encode(raw).decode(),
        }
        as_numbers = {"name": "h", "shape": [5], "datatype": name, "data": rounded.float().tolist()}
        expected = rounded.float().numpy()
        assert np.array_equal(decode_array(as_base64).astype(np.float32), expected)
        assert np.array_equal(decode_array(as_numbers).astype(np.float32), expected)
        assert np.array_equal(decode_array(as_base64, raw).astype(np.float32), expected)
