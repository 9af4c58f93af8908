"""The server's ``packed`` layout undone: upper triangle (row-major) -> symmetric matrix.

A ``/hessian`` asked for with ``layout="packed"`` carries each ``n x n`` symmetric matrix
as its upper triangle, row by row: ``n (n + 1) / 2`` numbers, the order
``numpy.triu_indices(n)`` enumerates (``metadata.packing.order`` is
``"upper_row_major"``). With ``rows`` the body holds the segment of that vector the rows
occupy, starting at ``metadata.packing.offset``; segments of consecutive row blocks
concatenate (``numpy.concatenate(..., axis=-1)``) to the whole triangle. The client's
``hessian`` unpacks complete packings by itself; ``unpack`` is for the rest.
"""

from __future__ import annotations

import numpy as np

PACKING_ORDER = "upper_row_major"


def packed_length(n: int) -> int:
    """Entries of the packed upper triangle of an ``n x n`` matrix."""
    return n * (n + 1) // 2


def unpack(packed: np.ndarray, n: int) -> np.ndarray:
    """Symmetric ``[..., n, n]`` matrices from packed upper triangles ``[..., n (n+1)/2]``
    (any leading axes: a batch, output indices). The values are copied unchanged, so the
    matrix is exactly the server's, in its dtype."""
    packed = np.asarray(packed)
    if packed.shape[-1] != packed_length(n):
        raise ValueError(
            f"unpack: {packed.shape[-1]} entries; a packed {n} x {n} matrix has "
            f"{packed_length(n)} (is it a segment of rows? concatenate the segments first)"
        )
    rows, cols = np.triu_indices(n)
    out = np.empty((*packed.shape[:-1], n, n), dtype=packed.dtype)
    out[..., rows, cols] = packed
    out[..., cols, rows] = packed
    return out
