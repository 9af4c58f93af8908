"""Parse an uploaded archive in a child process, under a memory limit and a timeout.

The scanner (``repository.archives``) and torch's own archive readers are parsers of
untrusted bytes, and a TorchScript or exported program's first forward pass is untrusted
compute. A parser bug, a decompression bomb, or a forward pass that allocates without
bound or never ends must not take the server down. So before the server loads an
uploaded archive, a fresh Python process (``python -m
hessian_service.repository.isolation``) does everything the server would do first: scan
the file, load it with torch (weights-only), and run one forward
pass on zeros of the manifest's input shape. The child's address space is capped with
``RLIMIT_AS`` before torch is imported, and it is killed at the timeout; the server loads
the file only when the child reports success, and the child's verdict (refused, failed,
killed, out of memory, out of time) becomes the upload's 422.

The child's answer is one JSON line on stdout; nothing the child sends is unpickled.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hessian_service.repository.archives import Format, UnsafeModelFile

# About 0.6 GiB of the address space is torch itself once imported (measured: VmPeak).
MIN_MEMORY_BYTES = 1 << 30


@dataclass(frozen=True)
class IsolationLimits:
    """What the checking process may use."""

    memory_bytes: int
    timeout_s: float


@dataclass(frozen=True)
class _Job:
    path: str
    format: Format
    input_shape: list[int]
    dtype: str
    memory_bytes: int
    max_unpacked_bytes: int


class ModelLoadFailed(ValueError):
    """The archive passed the scan, but torch could not load or run it."""


def check_in_child(
    path: Path,
    fmt: Format,
    *,
    input_shape: list[int],
    dtype: str,
    max_unpacked_bytes: int,
    limits: IsolationLimits,
) -> None:
    """Scan (inflating at most ``max_unpacked_bytes``), load and run ``path`` once in a
    child process; raise ``UnsafeModelFile`` (refused, or the child ran out of memory or
    time) or ``ModelLoadFailed``."""
    job = _Job(str(path), fmt, list(input_shape), dtype, limits.memory_bytes, max_unpacked_bytes)
    env = {
        **os.environ,
        "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1",
        "CUDA_VISIBLE_DEVICES": "",  # the check runs on the CPU, beside the server
        "OMP_NUM_THREADS": "1",
    }
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "hessian_service.repository.isolation", json.dumps(asdict(job))],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=limits.timeout_s,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise UnsafeModelFile(
            f"file: checking it (scan, load and one forward pass, in a separate process) took "
            f"over {limits.timeout_s:g} s, this server's limit; it is refused"
        ) from None
    verdict = _verdict(done.stdout)
    if done.returncode < 0 or verdict is None:
        raise UnsafeModelFile(_crash_message(done.returncode, done.stderr, limits.memory_bytes))
    if verdict.get("kind") == "unsafe":
        raise UnsafeModelFile(str(verdict["error"]))
    if verdict.get("kind") == "memory":
        raise UnsafeModelFile(
            f"file: checking it needed more than this server's limit of "
            f"{limits.memory_bytes} bytes of memory; it is refused"
        )
    if verdict.get("kind") == "load":
        raise ModelLoadFailed(str(verdict["error"]))


def _verdict(stdout: bytes) -> dict[str, Any] | None:
    lines = stdout.decode("utf-8", errors="replace").strip().splitlines()
    if not lines:
        return None
    try:
        verdict = json.loads(lines[-1])
    except ValueError:
        return None
    return verdict if isinstance(verdict, dict) and "kind" in verdict else None


def _crash_message(returncode: int, stderr: bytes, memory_bytes: int) -> str:
    if returncode < 0:
        how = f"was killed by {signal.Signals(-returncode).name}"
    else:
        how = f"exited with status {returncode} without a verdict"
    tail = stderr.decode("utf-8", errors="replace").strip().splitlines()[-1:] or [""]
    return (
        f"file: the process checking it {how} (its memory limit is {memory_bytes} bytes); "
        f"it is refused. {tail[0][:300]}"
    ).strip()


def _run_job(job: _Job) -> dict[str, Any]:
    """In the child: limit memory, then scan, load and run the model once."""
    limit = max(job.memory_bytes, MIN_MEMORY_BYTES)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        import torch

        from hessian_service.repository.loaders import freeze, load_module

        module = load_module(
            Path(job.path), job.format, architecture=None, max_unpacked_bytes=job.max_unpacked_bytes
        )
        freeze(module)
        dtype = getattr(torch, job.dtype)
        with torch.no_grad():
            module.to(dtype)(torch.zeros(1, *job.input_shape, dtype=dtype))
    except UnsafeModelFile as error:
        return {"kind": "unsafe", "error": str(error)}
    except MemoryError:
        return {"kind": "memory", "error": "out of memory"}
    except Exception as error:  # whatever torch or the model's own code raised
        if "can't allocate memory" in str(error) or "DefaultCPUAllocator" in str(error):
            return {"kind": "memory", "error": str(error)[:500]}
        return {"kind": "load", "error": f"{type(error).__name__}: {str(error)[:2000]}"}
    return {"kind": "ok"}


def main(argv: list[str]) -> int:
    job = _Job(**json.loads(argv[0]))
    print(json.dumps(_run_job(job)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
