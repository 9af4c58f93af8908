"""Choose a derivative method and chunk sizes from sizes and a memory budget.

The vectorized methods trade memory for speed: pushing ``c`` basis vectors through the
network at once costs about ``c`` times the activation memory of one pass. The planner
picks the largest chunks that fit the budget, so a small budget gives the same result,
only in more (smaller) pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

from hessian_service.engine.methods import Algorithm

# Bytes kept alive per activation element and per basis vector, relative to one forward
# pass: a reverse pass keeps the forward's activations and their cotangents, a
# forward-over-reverse pass adds the tangents of both. Measured on the bundled models
# (peak RSS growth / (chunk * activation bytes)), rounded up.
FIRST_ORDER_FACTOR = 4
SECOND_ORDER_FACTOR = 10
DEFAULT_MEMORY_BUDGET_BYTES = 1 << 30


@dataclass(frozen=True)
class Plan:
    """How to compute one request's derivatives.

    ``basis_chunk`` basis vectors go through the network at once for one sample, and
    ``batch_chunk`` samples at once; ``estimated_bytes`` is the working memory the plan
    expects (results excluded).
    """

    method: Algorithm
    basis_chunk: int
    batch_chunk: int
    estimated_bytes: int
    basis: int = 0  # basis vectors in all (0: unknown)
    batch: int = 0  # samples in all (0: unknown)

    @property
    def basis_chunk_or_all(self) -> int | None:
        """``chunk_size`` for torch.func: None (one pass, no chunking) when it is all."""
        return None if self.basis_chunk >= self.basis > 0 else self.basis_chunk

    @property
    def batch_chunk_or_all(self) -> int | None:
        return None if self.batch_chunk >= self.batch > 0 else self.batch_chunk


def _chunks(
    *, basis: int, batch: int, per_vector_bytes: int, result_bytes_per_sample: int, budget: int
) -> tuple[int, int]:
    basis_chunk = max(1, min(basis, budget // max(per_vector_bytes, 1)))
    if basis_chunk < basis:
        return basis_chunk, 1
    per_sample = basis * per_vector_bytes + result_bytes_per_sample
    return basis, max(1, min(batch, budget // max(per_sample, 1)))


def plan_hessian(
    *,
    n: int,
    batch: int,
    activation_numel: int,
    itemsize: int,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    num_scalars: int = 1,
) -> Plan:
    """Plan a forward-over-reverse Hessian of ``num_scalars`` scalars over ``n`` inputs."""
    per_vector = (activation_numel + n) * itemsize * SECOND_ORDER_FACTOR * num_scalars
    basis_chunk, batch_chunk = _chunks(
        basis=n,
        batch=batch,
        per_vector_bytes=per_vector,
        result_bytes_per_sample=num_scalars * n * n * itemsize,
        budget=memory_budget_bytes,
    )
    return Plan(
        method=Algorithm.FORWARD_OVER_REVERSE,
        basis_chunk=basis_chunk,
        batch_chunk=batch_chunk,
        estimated_bytes=per_vector * basis_chunk * batch_chunk,
        basis=n,
        batch=batch,
    )


def plan_jacobian(
    *,
    n: int,
    rows: int,
    batch: int,
    activation_numel: int,
    itemsize: int,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> Plan:
    """Plan a ``rows x n`` Jacobian: reverse mode when rows <= n, forward mode otherwise.

    Reverse mode costs one backward pass per output row, forward mode one forward pass
    per input; the smaller count wins.
    """
    reverse = rows <= n
    basis = rows if reverse else n
    per_vector = (activation_numel + n) * itemsize * FIRST_ORDER_FACTOR
    basis_chunk, batch_chunk = _chunks(
        basis=basis,
        batch=batch,
        per_vector_bytes=per_vector,
        result_bytes_per_sample=rows * n * itemsize,
        budget=memory_budget_bytes,
    )
    return Plan(
        method=Algorithm.REVERSE if reverse else Algorithm.FORWARD,
        basis_chunk=basis_chunk,
        batch_chunk=batch_chunk,
        estimated_bytes=per_vector * basis_chunk * batch_chunk,
        basis=basis,
        batch=batch,
    )


def _samples_per_chunk(batch: int, per_sample_bytes: int, budget: int) -> int:
    return max(1, min(batch, budget // max(per_sample_bytes, 1)))


def plan_structured_hessian(
    *,
    n: int,
    batch: int,
    itemsize: int,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    num_scalars: int = 1,
) -> Plan:
    """Plan the structured Hessian: whole samples at a time, as many as the budget holds.

    Per sample it holds the result and about as much again in intermediate products
    (``A^T H_h A``, scattered blocks), so ``2 k n^2`` entries.
    """
    per_sample = 2 * num_scalars * n * n * itemsize
    batch_chunk = _samples_per_chunk(batch, per_sample, memory_budget_bytes)
    return Plan(
        method=Algorithm.STRUCTURED,
        basis_chunk=n,
        batch_chunk=batch_chunk,
        estimated_bytes=per_sample * batch_chunk,
    )


def plan_structured_jacobian(
    *,
    n: int,
    batch: int,
    rows: int,
    itemsize: int,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> Plan:
    """Plan the structured Jacobian: one backward pass of ``rows`` one-hot rows per sample."""
    per_sample = 4 * rows * n * itemsize
    batch_chunk = _samples_per_chunk(batch, per_sample, memory_budget_bytes)
    return Plan(
        method=Algorithm.STRUCTURED,
        basis_chunk=rows,
        batch_chunk=batch_chunk,
        estimated_bytes=per_sample * batch_chunk,
    )
