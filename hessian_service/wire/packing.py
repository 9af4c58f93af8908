"""The ``packed`` layout: a symmetric matrix's upper triangle, row-major, half the bytes.

Row ``i`` of an ``n x n`` symmetric matrix contributes its entries ``j >= i``, so the
packed vector holds ``n (n + 1) / 2`` numbers and row ``i`` starts at
``row_offset(n, i) = i n - i (i - 1) / 2``. A block of rows ``a..b`` packs to the
segment ``[row_offset(n, a), row_offset(n, b))`` of that vector: the segments of
consecutive blocks concatenate to the whole triangle, so a large Hessian can be fetched
in pieces and unpacked once. This is LAPACK's "upper, row-major" packing (``UPLO='L'``
in its column-major terms), the order ``numpy.triu_indices(n)`` enumerates.

Pure tensor code (torch only): the response builder calls ``pack_rows``; the tests and
the client (which has its own numpy copy) unpack.
"""

from __future__ import annotations

import torch

PACKING_ORDER = "upper_row_major"


def packed_length(n: int) -> int:
    """Entries of the packed upper triangle of an ``n x n`` matrix."""
    return n * (n + 1) // 2


def row_offset(n: int, row: int) -> int:
    """Where row ``row`` of an ``n x n`` matrix starts in its packed upper triangle."""
    return row * n - row * (row - 1) // 2


def segment_length(n: int, start: int, stop: int) -> int:
    """Entries rows ``start..stop`` (stop excluded) take in the packed triangle."""
    return row_offset(n, stop) - row_offset(n, start)


def pack_rows(rows: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Rows ``start .. start + r`` of symmetric ``n x n`` matrices, ``[..., r, n]``, as
    their segment of the packed upper triangle, ``[..., segment_length(n, start, start + r)]``.

    ``pack_rows(matrix)`` of whole ``[..., n, n]`` matrices is the full packing. Written
    row by row into one preallocated tensor, so the peak is the input plus its packing
    (an index tensor for ``n = 12,288`` would itself take 1.2 GB).
    """
    r, n = rows.shape[-2], rows.shape[-1]
    if start < 0 or start + r > n:
        raise ValueError(f"pack_rows: rows {start}..{start + r} of a {n}-column matrix")
    out = rows.new_empty(*rows.shape[:-2], segment_length(n, start, start + r))
    at = 0
    for i in range(r):
        width = n - (start + i)
        out[..., at : at + width] = rows[..., i, start + i :]
        at += width
    return out


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The symmetric ``[..., n, n]`` matrices of a full packing ``[..., n (n + 1) / 2]``."""
    if packed.shape[-1] != packed_length(n):
        raise ValueError(
            f"unpack: {packed.shape[-1]} entries; a packed {n} x {n} matrix has {packed_length(n)}"
        )
    out = packed.new_empty(*packed.shape[:-1], n, n)
    at = 0
    for i in range(n):
        width = n - i
        out[..., i, i:] = packed[..., at : at + width]
        out[..., i:, i] = packed[..., at : at + width]
        at += width
    return out
