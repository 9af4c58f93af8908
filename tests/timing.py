"""How much slower this machine runs Python right now than the development machine idle.

Latency bounds in the tests (``/health/live`` under 50 ms while bodies are parsed) are
figures for a machine running at its usual speed. A shared host sometimes runs the same
code several times slower (seen here: a fixed pure-Python loop took 2.8x its usual
time, and every probe latency with it). ``slowdown()`` times such a loop and returns
how many times its usual time it took (at least 1), so that a test can hold the bound
scaled by it -- and print the factor -- instead of failing on the host's state. A real
regression is far larger than any such factor: the first release's probes waited
2.6-4.4 s.
"""

from __future__ import annotations

import time

# 1,000,000 iterations of ``total += i`` on the 2-core development machine (CPython 3.11)
# when it runs at its usual speed.
USUAL_LOOP_S = 0.06


def _loop_s() -> float:
    start = time.perf_counter()
    total = 0
    for i in range(1_000_000):
        total += i
    return time.perf_counter() - start


def slowdown() -> float:
    """This machine's slowdown now: the fastest of five timed loops over the usual time."""
    return max(1.0, min(_loop_s() for _ in range(5)) / USUAL_LOOP_S)
