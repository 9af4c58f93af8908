"""The block-triangular symmetric product equals one plain product."""

from __future__ import annotations

import pytest
import torch

from hessian_service.engine.symmetric import MIN_SIZE, symmetric_matmul


@pytest.mark.parametrize(
    ("left_batch", "right_batch", "n"),
    [
        ((), (), MIN_SIZE),
        ((1, 1), (1, 1), 600),  # one matrix in a batch: the 2-D path
        ((1, 1), (3, 2), 777),
        ((2,), (2,), 1031),
        ((), (), 17),
    ],
)
def test_equals_the_plain_product(
    left_batch: tuple[int, ...], right_batch: tuple[int, ...], n: int
) -> None:
    generator = torch.Generator().manual_seed(n)
    h = 40
    a = torch.randn(*left_batch, h, n, dtype=torch.float64, generator=generator)
    s = torch.randn(*right_batch, h, h, dtype=torch.float64, generator=generator)
    s = s + s.transpose(-1, -2)
    left, right = a.transpose(-1, -2), s @ a
    result = symmetric_matmul(left, right)
    expected = left @ right
    assert result.shape == expected.shape
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mirror_is_exact_in_each_dtype(dtype: torch.dtype) -> None:
    """The lower triangle is an exact copy of the upper one, whichever copy path ran
    (numpy's for float32, torch's for dtypes numpy lacks)."""
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(24, MIN_SIZE + 5, generator=generator).to(dtype)
    result = symmetric_matmul(a.transpose(-1, -2), a)
    upper = torch.triu(result, diagonal=1)
    assert torch.equal(upper.transpose(-1, -2), torch.tril(result, diagonal=-1))
    expected = a.transpose(-1, -2) @ a  # the upper triangle is what the blocks computed
    torch.testing.assert_close(torch.triu(result), torch.triu(expected))
