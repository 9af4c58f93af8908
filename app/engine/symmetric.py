"""Products known to be symmetric, computed as their upper block triangle plus a mirror.

``A^T H A`` is symmetric, so its lower triangle is a transpose of its upper one. torch
exposes no ``syrk``; splitting the rows into a few blocks and computing each block row
only from the diagonal rightwards does ``(k + 1) / 2k`` of the flops of one product
(5/8 for ``k = 4``) in ``k`` large matmuls, then mirrors the rest. On a shared 2-core
CPU a 784 x 256 x 784 product took 9-18% less time this way in interleaved runs on one
day, and on a busier day the whole mlp_tanh Hessian took the same time either way
(within 8%, either side): smaller products run further from peak under load, and the
mirror is a slow transposed copy. Block bounds sit on multiples of ``ALIGN`` rows, so
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

import torch

BLOCKS = 4
ALIGN = 16  # block bounds on 64-byte (cache line) boundaries for float32
MIN_SIZE = 512  # below this, one product is faster (measured on 2 CPU cores)


def symmetric_matmul(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ right`` for ``[..., n, h] @ [..., h, n]`` whose result the caller knows
    to be symmetric (as ``A^T (H A)`` with symmetric ``H``); batch dims broadcast.
    Not differentiable (``out=``): the engine runs it under ``no_grad``."""
    n = left.shape[-2]
    if n < MIN_SIZE or left.device.type != "cpu":
        return left @ right
    bounds = [round(i * n / BLOCKS / ALIGN) * ALIGN for i in range(BLOCKS)] + [n]
    batch = torch.broadcast_shapes(left.shape[:-2], right.shape[:-2])  # type: ignore[no-untyped-call]
    out = left.new_empty(*batch, n, n)
    for start, stop in pairwise(bounds):
        # Straight into the block (its row stride is a valid BLAS leading dimension),
        # which saves a copy of each block.
        block = out[..., start:stop, start:]
        torch.matmul(left[..., start:stop, :], right[..., :, start:], out=block)
    for start, stop in pairwise(bounds):
        out[..., stop:, start:stop] = out[..., start:stop, stop:].transpose(-1, -2)
    return out
