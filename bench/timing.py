"""Timing for the benchmarks: interleaved medians, peak memory, the device to sync.

Shared by bench/run.py (the engine against torch's own ways) and bench/peer_table.py (the
graph engine's rows against torch.func, torch.compile and JAX), so that every figure of one
``make bench`` run is measured the same way. Methods return a torch tensor or anything
``numpy.asarray`` reads (a JAX array); each is called until its result is ready.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

_DEVICE = torch.device("cpu")


def set_device(device: torch.device) -> None:
    """The device whose queued work ``sync`` waits for (bench/run.py's ``--device``)."""
    global _DEVICE
    _DEVICE = device


def device() -> torch.device:
    return _DEVICE


def sync() -> None:
    """Wait for queued GPU work, so that wall times mean something on CUDA."""
    if _DEVICE.type == "cuda":
        torch.cuda.synchronize(_DEVICE)


def cpu_busy_fraction(seconds: float = 1.0) -> float:
    """The share of the machine's CPU time spent by anything (this process included) over
    ``seconds``, from /proc/stat: near 0 on a quiet machine. Two threads of torch's
    OpenMP pool slow down several-fold when other processes hold the cores (its barriers
    spin), where XLA's pool slows down about in proportion, so figures taken on a busy
    machine are not fair to the torch methods; the JSON line reports this next to them."""

    def ticks() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    busy_0, total_0 = ticks()
    time.sleep(seconds)
    busy_1, total_1 = ticks()
    return (busy_1 - busy_0) / max(total_1 - total_0, 1)


def as_torch(result: object) -> torch.Tensor:
    """A method's result as a CPU torch tensor (JAX arrays through numpy), for its error."""
    if isinstance(result, torch.Tensor):
        return result.detach().cpu()
    return torch.from_numpy(np.array(result))


class PeakMemory:
    """Peak resident memory added while the block runs, sampled every millisecond."""

    def __init__(self) -> None:
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread: threading.Thread | None = None
        self._cuda_base = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self._page

    def _sample(self, base: int) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._rss() - base)
            time.sleep(0.001)

    def __enter__(self) -> PeakMemory:
        if _DEVICE.type == "cuda":  # device memory: the allocator's own peak counter
            torch.cuda.reset_peak_memory_stats(_DEVICE)
            self._cuda_base = torch.cuda.memory_allocated(_DEVICE)
            self._thread = None
            return self
        base = self._rss()
        self._thread = threading.Thread(target=self._sample, args=(base,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            sync()
            self.peak_bytes = torch.cuda.max_memory_allocated(_DEVICE) - self._cuda_base
            return
        self._stop.set()
        self._thread.join()


def median_ms(
    fn: Callable[[], object], *, repeats: int, budget_s: float, warm_up: bool = True
) -> float:
    """Median wall time of ``fn`` (after one warm-up call), bounded by a time budget."""
    if warm_up:
        fn()
        sync()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < repeats and (not times or time.perf_counter() < deadline):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


@dataclass
class Measured:
    ms: float
    error: float
    peak_mb: float


# A timed sample is a run of back-to-back calls lasting at least SAMPLE_MS (as timeit's
# autorange does), so that a short hiccup of the shared machine weighs on a 2 ms method
# as little as on a 200 ms one; the sample's time per call is what the median is over.
# Methods faster than WARM_MS get an untimed call before each sample, so that no method
# is timed cold right after another one left caches and worker threads behind.
SAMPLE_MS = 25.0
WARM_MS = 100.0


def measure_all(
    methods: Mapping[str, Callable[[], object]],
    reference: torch.Tensor,
    *,
    repeats: int,
    budget_s: float,
    failed: dict[str, str] | None = None,
) -> dict[str, Measured]:
    """Each method's error (against the reference's leading samples) and peak memory
    from its first call, which is also its warm-up; then the median time per call over
    its timed samples.

    Timing is interleaved in rounds, one sample of each method per round, so that a
    change in the machine's speed during the run (other tenants, clocks) reaches every
    method alike and the ratios stay fair. A method stops being timed after ``repeats``
    samples or once its samples have taken ``budget_s`` (at least one sample each). A
    method whose first call alone took longer than ``budget_s`` (a row loop of 500
    backward passes) is timed by that call: another would only repeat it.

    With ``failed`` given, a method whose first call raises is left out of the timing and
    its error is recorded there (``"TypeName: message"``) instead of propagating.
    """
    errors, peaks, fastest_ms = {}, {}, {}
    live: dict[str, Callable[[], object]] = {}
    for label, fn in methods.items():
        try:
            with PeakMemory() as memory:
                start = time.perf_counter()
                result = fn()
                sync()
                fastest_ms[label] = (time.perf_counter() - start) * 1000
        except Exception as error:
            if failed is None:
                raise
            failed[label] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            continue
        live[label] = fn
        checked = as_torch(result).reshape(-1, *reference.shape[1:])[: reference.shape[0]]
        errors[label] = float((checked.double() - reference).abs().max())
        peaks[label] = memory.peak_bytes / 2**20
        del result, checked
    per_call: dict[str, list[float]] = {
        label: [fastest_ms[label]] if fastest_ms[label] > budget_s * 1000 else [] for label in live
    }
    spent = {label: sum(per_call[label]) / 1000 for label in live}

    def due(label: str) -> bool:
        done = per_call[label]
        return len(done) < repeats and (not done or spent[label] < budget_s)

    while any(due(label) for label in live):
        for label, fn in live.items():
            if not due(label):
                continue
            if fastest_ms[label] < WARM_MS:
                fn()
                sync()
            calls = max(1, math.ceil(SAMPLE_MS / max(fastest_ms[label], 1e-3)))
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            elapsed = time.perf_counter() - start
            per_call[label].append(elapsed * 1000 / calls)
            fastest_ms[label] = min(fastest_ms[label], per_call[label][-1])
            spent[label] += elapsed
    return {
        label: Measured(statistics.median(per_call[label]), errors[label], peaks[label])
        for label in live
    }
