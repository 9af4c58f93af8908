"""KServe's Python client (the ``kserve`` package's ``InferenceRESTClient``) against a
real server on 127.0.0.1: readiness, a forward pass and a Hessian of digits_cnn, with the
binary tensor extension on and off.

kserve lives in a venv of its own (``make test`` creates ``.venv-kserve``: it pins
protobuf below 7, which the [ray] extra's grpcio-reflection does not allow), so the client
runs as a child process (tests/e2e/clients/kserve_infer.py) and prints what it decoded.
The forward pass must equal the model loaded here independently; the Hessian must equal
``/hessian``'s answer for the same input bit for bit.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.e2e.test_triton_client import base64_input, local_logits, service_tensor

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
KSERVE_PYTHON = ROOT / ".venv-kserve" / "bin" / "python"
SCRIPT = Path(__file__).with_name("clients") / "kserve_infer.py"


def decoded(tensor: dict[str, object]) -> np.ndarray:
    assert tensor["datatype"] == "FP32"
    raw = np.frombuffer(base64.b64decode(str(tensor["bytes"])), dtype=np.float32)
    return raw.reshape(tensor["shape"])  # type: ignore[arg-type]


@pytest.mark.skipif(
    not KSERVE_PYTHON.exists(),
    reason="no .venv-kserve: `make test` creates it (make .venv-kserve/.kserve)",
)
def test_kserve_client_gets_a_forward_pass_and_a_hessian(
    server_url: str, client: httpx.Client, tmp_path: Path
) -> None:
    x = np.random.default_rng(11).random((2, 1, 28, 28), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run(
        [str(KSERVE_PYTHON), str(SCRIPT), server_url, str(tmp_path / "x.npy")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["server_ready"] is True and report["model_ready"] is True
    want = service_tensor(
        client,
        "/hessian",
        {"model": "digits_cnn", "inputs": [base64_input(x)], "output_index": 2},
        "hessian",
    )
    assert np.abs(want).max() > 1e-3
    for encoding in ("binary", "json"):
        outputs = report[encoding]
        np.testing.assert_allclose(
            decoded(outputs["output"]), local_logits(x), rtol=1e-5, atol=1e-5
        )
        hessian = decoded(outputs["hessian"])
        assert hessian.shape == (2, 784, 784)
        assert hessian.tobytes() == want.tobytes(), encoding  # bit for bit
