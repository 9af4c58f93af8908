"""Products known to be symmetric, computed as their upper block triangle plus a mirror.

``A^T H A`` is symmetric, so its lower triangle is a transpose of its upper one. torch
exposes no ``syrk``; splitting the rows into a few blocks and computing each block row
only from the diagonal rightwards does ``(k + 1) / 2k`` of the flops of one product
(5/8 for ``k = 4``) in ``k`` large matmuls, then mirrors the rest. On a shared 2-core
CPU a 784 x 256 x 784 product took 9-18% less time this way in interleaved runs on one
day, and on a busier day the whole mlp_tanh Hessian took the same time either way
(within 8%, either side): smaller products run further from peak under load, and the
mirror is a transposed copy (torch's is slow; numpy's, used for one matrix, about twice
as fast). Block bounds sit on multiples of ``ALIGN`` rows, so
each block's rows and columns start on a cache line: one mlp_tanh Hessian took 3-7% less
time than with bounds at ``i * n / 4`` (784: 192/384/592 instead of 196/392/588),
interleaved in one process; 8- and 32-row alignment gained less. Below ``MIN_SIZE``
the smaller products lose to one big product. GPUs keep one product: the split was not
measured on one (no GPU was at hand), and there a single large product is the
known-good choice.

Tried instead, and not kept: a cyclic split into 7 equal block rows of 4 blocks each,
computed as ONE batched product (4/7 of the flops, and at full speed, since the batch
runs one block row per core); putting its blocks and their transposes in place cost as
much as that saved.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import torch

BLOCKS = 4
ALIGN = 16  # block bounds on 64-byte (cache line) boundaries for float32
NUMPY_DTYPES = (torch.float32, torch.float64)
MIN_SIZE = 512  # below this, one product is faster (measured on 2 CPU cores)


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
    right of it. For one matrix, numpy's strided copy does this in about half the time
    of torch's ``copy_`` (0.17 vs 0.36 ms for 784 x 784 float32; the whole symmetric
    product 4% faster, interleaved on 2 CPU cores); ``out`` shares its memory with the
    array, so nothing is copied back. A batch keeps torch's copy, which uses both
    cores (numpy's took 5% longer for 8 matrices)."""
    if out.dim() == 2 and out.dtype in NUMPY_DTYPES:
        array = out.numpy()
        for start, stop in pairwise(bounds):
            np.copyto(array[stop:, start:stop], array[start:stop, stop:].T)
        return
    for start, stop in pairwise(bounds):
        out[..., stop:, start:stop] = out[..., start:stop, stop:].transpose(-1, -2)
