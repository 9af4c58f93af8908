"""Products known to be symmetric, computed as their upper block triangle plus a mirror.

``A^T H A`` is symmetric, so its lower triangle is a transpose of its upper one, and
torch exposes no ``syrk`` to skip it. Splitting the rows into ``BLOCKS`` blocks and
computing each block row only from the diagonal rightwards does ``(k + 1) / 2k`` of the
flops of one product (5/8 for ``k = 4``) in ``k`` large matmuls; the rest is a mirror (a
transposed copy). Block bounds sit on multiples of ``ALIGN`` rows, so that each block's
rows and columns start on a cache line. Below ``MIN_SIZE`` rows, and off the CPU, one
product is used: the smaller products lose there, and the split was not measured on a
GPU, where one large product is the known-good choice.

Measurements, and what was tried and not kept: docs/engine.md ("The symmetric product").
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import torch

BLOCKS = 4
ALIGN = 16  # block bounds on 64-byte (cache line) boundaries for float32
NUMPY_DTYPES = (torch.float32, torch.float64)
MIN_SIZE = 512  # below this, one product is faster (docs/engine.md)


def symmetric_matmul(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ right`` for ``[..., n, h] @ [..., h, n]`` whose result the caller knows
    to be symmetric (as ``A^T (H A)`` with symmetric ``H``); batch dims broadcast.
    Not differentiable (``out=``): the engine runs it under ``no_grad``."""
    n = left.shape[-2]
    if n < MIN_SIZE or left.device.type != "cpu":
        return left @ right
    bounds = [round(i * n / BLOCKS / ALIGN) * ALIGN for i in range(BLOCKS)] + [n]
    batch = left.shape[:-2]
    if batch != right.shape[:-2]:
        batch = torch.broadcast_shapes(batch, right.shape[:-2])  # type: ignore[no-untyped-call]
    single = all(size == 1 for size in batch)
    if single:  # one matrix: 2-D views dispatch fewer ops, and numpy can mirror them
        left, right = left.reshape(n, -1), right.reshape(-1, n)
    out = left.new_empty(n, n) if single else left.new_empty(*batch, n, n)
    for start, stop in pairwise(bounds):
        # Straight into the block (its row stride is a valid BLAS leading dimension),
        # which saves a copy of each block.
        block = out[..., start:stop, start:]
        torch.matmul(left[..., start:stop, :], right[..., :, start:], out=block)
    _mirror_upper_blocks(out, bounds)
    return out.reshape(*batch, n, n)


def _mirror_upper_blocks(out: torch.Tensor, bounds: list[int]) -> None:
    """Fill each block column below the diagonal with the transpose of the block row
    right of it. One matrix is mirrored with numpy's strided copy, faster there than
    torch's ``copy_``; ``out`` shares its memory with the array, so nothing is copied
    back. A batch keeps torch's copy, which uses every core (docs/engine.md)."""
    if out.dim() == 2 and out.dtype in NUMPY_DTYPES:
        array = out.numpy()
        for start, stop in pairwise(bounds):
            np.copyto(array[stop:, start:stop], array[start:stop, stop:].T)
        return
    for start, stop in pairwise(bounds):
        out[..., stop:, start:stop] = out[..., start:stop, stop:].transpose(-1, -2)
