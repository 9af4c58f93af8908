"""The ``hessian-service`` command against a real server on 127.0.0.1.

The README's round trip (``hessian --model quadratic4 --input x.npy --output-index 2
--out h.npy`` gives diag(0, 0, 4, 0) at x = 2*ones(4)) runs as written; many inputs go
to safetensors with a progress bar; ``serve`` starts a server with the allocator
settings; every subcommand's ``--help`` explains each option.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import load_file

from hessian_service.local_server import free_port
from tests.e2e.conftest import ROOT

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
COMMAND = str(BIN / "hessian-service")
README = ROOT / "README.md"


def cli(
    *args: str, url: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    if url:
        env["HESSIAN_URL"] = url
    return subprocess.run(
        [COMMAND, *args], capture_output=True, text=True, timeout=120, env=env, cwd=cwd
    )


def test_readme_round_trip_gives_diag_0_0_4_0(server_url: str, tmp_path: Path) -> None:
    (block,) = [
        b
        for b in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
        if "hessian-service hessian" in b
    ]
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "HESSIAN_URL": server_url,
    }
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    expected = np.diag([0.0, 0.0, 4.0, 0.0])
    assert result.stdout.strip() == str(expected.tolist())
    hessian = np.load(tmp_path / "h.npy")
    assert hessian.dtype == np.float32 and np.array_equal(hessian, expected)
    assert not (tmp_path / "h.npy.partial").exists()


def test_single_sample_to_safetensors_and_float64(server_url: str, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", 2 * np.ones(4, dtype=np.float32))
    result = cli(
        "hessian",
        "--url",
        server_url,
        "--model",
        "quadratic4",
        "--input",
        str(tmp_path / "x.npy"),
        "--output-index",
        "1",
        "2",
        "--precision",
        "float64",
        "--out",
        str(tmp_path / "h.safetensors"),
    )
    assert result.returncode == 0, result.stderr
    hessian = load_file(str(tmp_path / "h.safetensors"))["hessian"]
    assert hessian.dtype == np.float64
    assert np.array_equal(hessian, np.stack([np.diag([0.0, 2, 0, 0]), np.diag([0.0, 0, 4, 0])]))


def test_many_inputs_stream_to_the_file_with_progress(server_url: str, tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(37, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = cli(
        "jacobian",
        "--model",
        "quadratic4",
        "--input",
        str(tmp_path / "x.npy"),
        "--batch-size",
        "8",
        "--concurrency",
        "3",
        "--out",
        str(tmp_path / "j.npy"),
        url=server_url,
    )
    assert result.returncode == 0, result.stderr
    assert "37/37" in result.stderr and "100.0%" in result.stderr
    jacobians = np.load(tmp_path / "j.npy")
    expected = np.stack([np.diag(2 * row * np.arange(4)) for row in x.astype(np.float64)])
    np.testing.assert_allclose(jacobians, expected, rtol=1e-6, atol=1e-6)


def test_errors_exit_1_with_the_servers_message(server_url: str, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones(4, dtype=np.float32))
    result = cli(
        "hessian",
        "--model",
        "no_such_model",
        "--input",
        str(tmp_path / "x.npy"),
        "--out",
        str(tmp_path / "h.npy"),
        url=server_url,
    )
    assert result.returncode == 1
    assert "404" in result.stderr and "no_such_model" in result.stderr
    assert not (tmp_path / "h.npy").exists()


def test_models_lists_the_bundled_models(server_url: str) -> None:
    result = cli("models", url=server_url)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[1:]}
    assert rows["quadratic4"] == ["1", "4", "4", "True"]
    assert rows["digits_cnn"] == ["1", "1x28x28", "10", "True"]


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("serve", ["--host", "--port", "--workers", "--no-access-log"]),
        ("models", ["--json", "--url", "--retries"]),
        *[
            (
                kind,
                [
                    "--model",
                    "--input",
                    "--out",
                    "--output-index",
                    "--objective",
                    "--layout",
                    "--precision",
                    "--batch-size",
                    "--concurrency",
                    "--resume",
                    "--no-progress",
                    "--url",
                    "--retries",
                ],
            )
            for kind in ("hessian", "jacobian")
        ],
    ],
)
def test_help_explains_every_option(command: str, options: list[str]) -> None:
    result = cli(command, "--help")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for option in options:
        i = next(i for i, line in enumerate(lines) if line.strip().startswith(option))
        # argparse: "  --opt METAVAR   words" or the words on the next, indented line
        parts = re.split(r"\s{2,}", lines[i].strip(), maxsplit=1)
        words = parts[1] if len(parts) > 1 else lines[i + 1].strip()
        assert len(words.split()) >= 2, (option, words)
    top = cli("--help")
    assert all(name in top.stdout for name in ("serve", "models", "jacobian", "hessian"))


def test_serve_runs_the_server_with_the_allocator_settings() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "HESSIAN_"))}
    env["HESSIAN_DEVICE"] = "cpu"
    process = subprocess.Popen(
        [COMMAND, "serve", "--port", str(port), "--no-access-log"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, "serve exited"
            try:
                if httpx.get(
                    f"http://127.0.0.1:{port}/v2/health/ready", trust_env=False
                ).is_success:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve was not ready in 60 s"
            time.sleep(0.2)
        environ = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
        assert b"MALLOC_MMAP_THRESHOLD_=4294967296" in environ
        assert b"MALLOC_TRIM_THRESHOLD_=1000000000000" in environ
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_serve_refuses_several_workers_and_points_to_replicas() -> None:
    """Workers would each keep their own models, uploads and metrics (a model uploaded to
    one is a 404 on the others), so the offered flag refuses more than one, at once."""
    result = cli("serve", "--workers", "2", "--port", "1")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "--workers 2 is not supported" in result.stderr
    assert "deploy/nginx.conf" in result.stderr and "replicas" in result.stderr
