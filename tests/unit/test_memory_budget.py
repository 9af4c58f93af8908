"""A small memory budget bounds the working memory of a Hessian, and changes nothing else.

Peak memory is measured in a fresh process: the kernel's peak-RSS mark (VmHWM) is reset
after a warm-up, and the peak of the call is read against the RSS at that moment, so
pages that other tests touched cannot hide or inflate it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

MiB = 1 << 20
SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from hessian_service import engine
    from hessian_service.repository.zoo import build

    method, budget = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = build("digits_cnn").double().eval().requires_grad_(False)
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    engine.hessian(model, x[:1], output_index=0,
                   method=method, memory_budget_bytes=budget)  # warm-up
    def status(field):
        with open("/proc/self/status") as lines:
            for line in lines:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak (VmHWM) to the current resident size
    base = status("VmRSS")
    result = engine.compute_hessian(model, x, output_index=2, method=method,
                                    memory_budget_bytes=budget)
    peak = status("VmHWM")
    plan = result.plan
    print(json.dumps({"extra": peak - base, "result": result.matrix.numel() * 8,
                      "basis_chunk": plan.basis_chunk, "batch_chunk": plan.batch_chunk,
                      "checksum": float(result.matrix.abs().sum()),
                      "sample": result.matrix[3, 0, 100:110, 100:110].flatten().tolist()}))
    """
)


def run(method: str, budget: int) -> dict[str, float]:
    env = {"PATH": "", "MALLOC_ARENA_MAX": "1"}  # plain glibc: freed pages go back
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT, method, str(budget)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env=env,
    )
    result: dict[str, float] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.slow
@pytest.mark.parametrize("method", ["generic", "structured"])
def test_small_budget_bounds_peak_memory_and_keeps_the_result(method: str) -> None:
    roomy = run(method, 2048 * MiB)
    tight = run(method, 24 * MiB)
    assert (
        tight["batch_chunk"] < roomy["batch_chunk"] or tight["basis_chunk"] < roomy["basis_chunk"]
    )
    assert tight["sample"] == pytest.approx(roomy["sample"], rel=1e-12, abs=1e-15)
    assert tight["checksum"] == pytest.approx(roomy["checksum"], rel=1e-12)
    # The result itself must be held; the working memory on top of it stays near the budget
    # (plus 64 MiB for the allocator's and torch's own slack).
    assert tight["extra"] <= tight["result"] + 24 * MiB + 64 * MiB, tight
    if method == "generic":  # its working memory dwarfs the result: the budget shows
        assert tight["extra"] < roomy["extra"] / 2, (tight, roomy)
