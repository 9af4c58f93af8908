"""The bulk call over 2,000 mlp_tanh inputs (4.9 GB of float32 Hessians), end to end.

The client runs in its own process so that its peak memory (``VmHWM``) is its own.
The server is stopped while the run is under way: the run must fail cleanly -- no
``h.npy``, only ``h.npy.partial`` and a record of the finished batches -- and a second
run with ``resume=True`` against a new server sends only the missing batches and
renames the file into place. Every Hessian in it is then checked against the engine
run here, and a sample against single requests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hessian_client import Client
from safetensors.torch import load_file

from hessian_service import engine
from hessian_service.config import BUNDLED_MODELS_DIR
from hessian_service.repository import zoo
from tests.e2e.conftest import ROOT, running_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SAMPLES = 2000
BATCH = 16
BATCHES = SAMPLES // BATCH
PEAK_LIMIT_MB = 300
STOP_AFTER_BATCHES = 30

BULK = """
import json, sys
from hessian_client import Client, HessianServiceError

url, inputs, out, resume = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
error = ""
try:
    with Client(url, retries=2, backoff=0.2, trust_env=False) as client:
        client.bulk_hessian(
            "mlp_tanh", inputs, out=out, output_index=2, batch_size=16, concurrency=2,
            resume=resume,
        )
except HessianServiceError as exc:
    error = str(exc)
# VmHWM, not ru_maxrss: ru_maxrss keeps the parent's peak across fork and exec.
(peak_kb,) = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")]
peak_mb = peak_kb / 1024
print(json.dumps({"peak_mb": peak_mb, "error": error}))
sys.exit(3 if error else 0)
"""


def finished_batches(record: Path) -> set[int]:
    lines = record.read_text().splitlines() if record.exists() else []
    return {int(line) for line in lines[1:] if line.strip().isdigit()}


def bulk_process(url: str, inputs: Path, out: Path, resume: bool) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", BULK, url, str(inputs), str(out), "1" if resume else "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_bulk_2000_hessians_fail_cleanly_resume_and_match(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((SAMPLES, 1, 28, 28), dtype=np.float32)
    inputs, out = tmp_path / "x.npy", tmp_path / "h.npy"
    np.save(inputs, x)
    partial = tmp_path / "h.npy.partial"
    record = tmp_path / "h.npy.partial.json"
    try:
        # 1. The server goes away midway: a clean failure, nothing passed off as complete.
        with running_server() as url:
            first = bulk_process(url, inputs, out, resume=False)
            deadline = time.monotonic() + 240
            while len(finished_batches(record)) < STOP_AFTER_BATCHES:
                assert first.poll() is None, first.communicate()
                assert time.monotonic() < deadline, "the bulk run made no progress"
                time.sleep(0.1)
        stdout, stderr = first.communicate(timeout=120)
        assert first.returncode == 3, (stdout, stderr[-2000:])
        report = json.loads(stdout)
        assert "resume=True" in report["error"] and "h.npy.partial" in report["error"]
        assert not out.exists()
        assert partial.exists()
        saved = finished_batches(record)
        assert STOP_AFTER_BATCHES <= len(saved) < BATCHES
        assert report["peak_mb"] < PEAK_LIMIT_MB, report
        print(f"client peak RSS: {report['peak_mb']:.0f} MB")

        # 2. resume=True on a new server: only the missing batches, then the rename.
        with running_server() as url:
            second = bulk_process(url, inputs, out, resume=True)
            stdout, stderr = second.communicate(timeout=600)
            assert second.returncode == 0, (stdout, stderr[-2000:])
            report = json.loads(stdout)
            assert report["peak_mb"] < PEAK_LIMIT_MB, report
            print(f"client peak RSS: {report['peak_mb']:.0f} MB")
            assert f" {len(saved) * BATCH}/{SAMPLES} " in stderr  # the bar starts there
            assert out.exists() and not partial.exists() and not record.exists()
            hessians = np.load(out, mmap_mode="r")
            assert hessians.shape == (SAMPLES, 784, 784) and hessians.dtype == np.float32

            # 3a. A sample against single requests: before the stop, after it, the ends.
            before = min(saved)
            after = min(set(range(BATCHES)) - saved)
            sample = [0, before * BATCH + 5, after * BATCH + 11, SAMPLES - 1]
            with Client(url, trust_env=False) as client:
                for i in sample:
                    single = client.hessian("mlp_tanh", x[i], output_index=2, as_numpy=True)
                    np.testing.assert_allclose(hessians[i], single, rtol=1e-5, atol=1e-7)

        # 3b. Every Hessian against the engine run here on the bundled weights.
        model = zoo.build("mlp_tanh")
        model.load_state_dict(
            load_file(str(BUNDLED_MODELS_DIR / "mlp_tanh" / "weights.safetensors"))
        )
        model.eval().requires_grad_(False)
        worst = 0.0
        for start in range(0, SAMPLES, 100):
            local = engine.hessian(model, torch.from_numpy(x[start : start + 100]), output_index=2)
            got = torch.from_numpy(np.array(hessians[start : start + 100]))
            worst = max(worst, float((got - local.reshape(got.shape)).abs().max()))
            scale = float(local.abs().max())
        assert worst <= 1e-6 * max(scale, 1.0), (worst, scale)
    finally:
        for path in (out, partial, record, inputs):
            path.unlink(missing_ok=True)
