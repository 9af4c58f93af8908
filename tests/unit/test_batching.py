"""serving.batching: merging, size and delay limits, slicing, cancellation, a full queue.

The batches run the real engine (``compute_jacobian`` / ``compute_hessian``) on small
networks; every caller's slice is checked against the same computation done alone, in
float64. Where a test needs a batch to stay busy, ``run_batch`` waits on a
``threading.Event`` the test sets (the batcher's worker is a real thread).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Hashable, Sequence

import pytest
import torch
from torch import nn

from hessian_service.engine import compute_hessian
from hessian_service.serving.batching import (
    Abandoned,
    Batcher,
    BatchStats,
    DeadlineExceeded,
    QueueFull,
)

N = 5


def _network() -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(N, 7), nn.Tanh(), nn.Linear(7, 3))
    return net.double().eval().requires_grad_(False)


NET = _network()


def _alone(x: torch.Tensor, index: int) -> torch.Tensor:
    """The reference: the Hessians of x's samples computed with nobody else."""
    return compute_hessian(NET, x, output_index=index).matrix[:, 0]


class Engine:
    """A ``run_batch`` on the real engine that records every batch it ran."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[tuple[Hashable, list[int]]] = []
        self.gate = gate

    def __call__(self, key: Hashable, xs: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        if self.gate is not None:
            assert self.gate.wait(timeout=30), "the test never opened the gate"
        assert isinstance(key, int)
        self.batches.append((key, [int(x.shape[0]) for x in xs]))
        merged = compute_hessian(NET, torch.cat(xs), output_index=key).matrix[:, 0]
        return list(torch.split(merged, [int(x.shape[0]) for x in xs]))


def _samples(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, N, generator=generator, dtype=torch.float64)


def test_concurrent_jobs_are_merged_and_each_gets_its_own_slice() -> None:
    engine = Engine()
    stats: list[BatchStats] = []
    batcher = Batcher(
        engine, max_batch_size=64, max_delay_s=0.2, max_queue=64, on_batch=stats.append
    )
    inputs = [_samples(1 + i % 3, seed=i) for i in range(12)]  # 1-3 samples each

    async def main() -> list[torch.Tensor]:
        outcomes = await asyncio.gather(*(batcher.submit(2, x, int(x.shape[0])) for x in inputs))
        return [outcome.result for outcome in outcomes]

    try:
        results = asyncio.run(main())
    finally:
        batcher.close()
    assert engine.batches == [(2, [int(x.shape[0]) for x in inputs])]  # one batch, in order
    assert stats[0].samples == sum(int(x.shape[0]) for x in inputs) and stats[0].jobs == 12
    for x, got in zip(inputs, results, strict=True):
        torch.testing.assert_close(got, _alone(x, 2), rtol=1e-12, atol=1e-12)
    # Different inputs: a mix-up would have been seen.
    assert (results[0][0] - results[1][0]).abs().max() > 1e-3


def test_different_keys_are_never_merged() -> None:
    engine = Engine()
    batcher = Batcher(engine, max_batch_size=64, max_delay_s=0.1, max_queue=64)
    jobs = [(i % 3, _samples(1, seed=100 + i)) for i in range(12)]  # output 0, 1, 2 interleaved

    async def main() -> list[torch.Tensor]:
        outcomes = await asyncio.gather(*(batcher.submit(k, x) for k, x in jobs))
        return [outcome.result for outcome in outcomes]

    try:
        results = asyncio.run(main())
    finally:
        batcher.close()
    assert sorted(key for key, _ in engine.batches) == [0, 1, 2]
    assert all(sizes == [1, 1, 1, 1] for _, sizes in engine.batches)
    for (key, x), got in zip(jobs, results, strict=True):
        torch.testing.assert_close(got, _alone(x, key), rtol=1e-12, atol=1e-12)


def test_max_batch_size_caps_the_samples_of_a_batch() -> None:
    engine = Engine()
    batcher = Batcher(engine, max_batch_size=4, max_delay_s=0.3, max_queue=64)
    sizes = [1, 1, 1, 1, 1, 1, 2, 6, 1]  # 6 > 4 runs alone; 2 fits after two ones
    inputs = [_samples(n, seed=i) for i, n in enumerate(sizes)]

    async def main() -> list[torch.Tensor]:
        jobs = [batcher.submit(1, x, int(x.shape[0])) for x in inputs]
        outcomes = await asyncio.wait_for(asyncio.gather(*jobs), timeout=30)
        return [outcome.result for outcome in outcomes]

    try:
        results = asyncio.run(main())
    finally:
        batcher.close()
    assert [batch for _, batch in engine.batches] == [[1, 1, 1, 1], [1, 1, 2], [6], [1]]
    for x, got in zip(inputs, results, strict=True):
        torch.testing.assert_close(got, _alone(x, 1), rtol=1e-12, atol=1e-12)


def test_max_delay_bounds_the_wait_for_company() -> None:
    batcher = Batcher(Engine(), max_batch_size=64, max_delay_s=0.15, max_queue=8)
    alone = Batcher(Engine(), max_batch_size=1, max_delay_s=0.15, max_queue=8)

    async def main() -> tuple[float, float]:
        waited = (await batcher.submit(0, _samples(1, seed=0))).queue_s
        unmerged = (await alone.submit(0, _samples(1, seed=0))).queue_s
        return waited, unmerged

    try:
        waited, unmerged = asyncio.run(main())
    finally:
        batcher.close()
        alone.close()
    assert 0.15 <= waited < 1.0  # waited for company, then ran with none
    assert unmerged < 0.1  # max_batch_size=1: a batch is full at once, no waiting


def test_a_full_queue_refuses_at_once_and_recovers() -> None:
    gate = threading.Event()
    engine = Engine(gate)
    batcher = Batcher(engine, max_batch_size=1, max_delay_s=0.0, max_queue=3)

    async def main() -> list[torch.Tensor]:
        running = asyncio.ensure_future(batcher.submit(0, _samples(1, seed=0)))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(batcher.submit(0, _samples(1, seed=i))) for i in (1, 2, 3)]
        await asyncio.sleep(0.05)
        assert batcher.depth == 3 and batcher.running == 1
        started = time.perf_counter()
        with pytest.raises(QueueFull):
            await batcher.submit(0, _samples(1, seed=4))
        assert time.perf_counter() - started < 0.05
        gate.set()
        outcomes = await asyncio.wait_for(asyncio.gather(running, *queued), timeout=30)
        after = await batcher.submit(0, _samples(1, seed=5))  # normal service again
        return [o.result for o in [*outcomes, after]]

    try:
        results = asyncio.run(main())
    finally:
        batcher.close()
    assert batcher.counters["queue_full"] == 1
    for seed, got in zip([0, 1, 2, 3, 5], results, strict=True):
        torch.testing.assert_close(got, _alone(_samples(1, seed=seed), 0), rtol=1e-12, atol=1e-12)


def test_deadline_frees_a_queued_slot_and_discards_a_running_result() -> None:
    gate = threading.Event()
    engine = Engine(gate)
    batcher = Batcher(engine, max_batch_size=1, max_delay_s=0.0, max_queue=1)

    async def main() -> None:
        started = time.perf_counter()
        running = asyncio.ensure_future(batcher.submit(0, _samples(1, seed=0), timeout_s=0.2))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.submit(0, _samples(1, seed=1), timeout_s=0.1))
        await asyncio.sleep(0.01)
        assert batcher.depth == 1
        with pytest.raises(DeadlineExceeded):
            await queued
        assert 0.1 <= time.perf_counter() - started < 0.5
        assert batcher.depth == 0  # its slot is free again: a new job is accepted
        waiting = asyncio.ensure_future(batcher.submit(0, _samples(1, seed=2), timeout_s=30))
        with pytest.raises(DeadlineExceeded):
            await running  # still computing (gate closed) when its deadline passed
        gate.set()
        outcome = await waiting
        torch.testing.assert_close(outcome.result, _alone(_samples(1, seed=2), 0))

    try:
        asyncio.run(main())
    finally:
        batcher.close()
    # The timed-out queued job never ran; the running one ran and its result was dropped.
    assert [batch for _, batch in engine.batches] == [[1], [1]]
    assert batcher.counters == {"queue_full": 0, "deadline": 2, "abandoned": 0, "discarded": 1}


def test_disconnected_and_cancelled_jobs_are_dropped_from_the_queue() -> None:
    gate = threading.Event()
    engine = Engine(gate)
    batcher = Batcher(engine, max_batch_size=1, max_delay_s=0.0, max_queue=8)
    gone = asyncio.Event()

    async def disconnected() -> bool:
        return gone.is_set()

    async def main() -> torch.Tensor:
        running = asyncio.ensure_future(batcher.submit(0, _samples(1, seed=0)))
        await asyncio.sleep(0.05)
        left = asyncio.ensure_future(
            batcher.submit(0, _samples(2, seed=1), 2, disconnected=disconnected, poll_s=0.01)
        )
        cancelled = asyncio.ensure_future(batcher.submit(0, _samples(3, seed=2), 3))
        stays = asyncio.ensure_future(batcher.submit(0, _samples(1, seed=3)))
        await asyncio.sleep(0.05)
        assert batcher.depth == 3
        gone.set()
        with pytest.raises(Abandoned):
            await asyncio.wait_for(left, timeout=5)
        cancelled.cancel()
        await asyncio.sleep(0.01)
        assert batcher.depth == 1
        gate.set()
        await running
        return (await stays).result

    try:
        result = asyncio.run(main())
    finally:
        batcher.close()
    # Only the first and the last job ever reached the engine (sizes 1; never 2 or 3).
    assert [batch for _, batch in engine.batches] == [[1], [1]]
    torch.testing.assert_close(result, _alone(_samples(1, seed=3), 0))
    assert batcher.counters["abandoned"] == 1


def test_an_error_reaches_every_job_of_its_batch_and_the_next_batch_runs() -> None:
    def failing_then_fine(key: Hashable, xs: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        if key == "bad":
            compute_hessian(NET, torch.cat(xs), output_index=99)  # out of range: ValueError
        return [compute_hessian(NET, x, output_index=0).matrix[:, 0] for x in xs]

    batcher = Batcher(failing_then_fine, max_batch_size=8, max_delay_s=0.05, max_queue=8)

    async def main() -> list[object]:
        bad = [batcher.submit("bad", _samples(1, seed=i)) for i in range(3)]
        outcomes = await asyncio.gather(*bad, return_exceptions=True)
        good = await batcher.submit("good", _samples(1, seed=7))
        return [*outcomes, good.result]

    try:
        *errors, good = asyncio.run(main())
    finally:
        batcher.close()
    assert all(isinstance(e, ValueError) and "output_index 99" in str(e) for e in errors), errors
    assert isinstance(good, torch.Tensor)
    torch.testing.assert_close(good, _alone(_samples(1, seed=7), 0))
