#!/usr/bin/env bash
# The project's GPU check, one command on a CUDA machine (about 5 minutes on one GPU):
# the engine's CUDA tests, the API and end-to-end tests with the service on CUDA, then
# the benchmark on CUDA. Prints the card's name first; report figures with it.
set -euo pipefail
cd "$(dirname "$0")/.."
make setup-dev >/dev/null
PY=.venv/bin/python
$PY - <<'PY'
import torch
assert torch.cuda.is_available(), "bench/gpu_check.sh needs a CUDA device"
print("# device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY
export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=1000000000000
HESSIAN_TEST_DEVICE=cuda timeout 240 $PY -m pytest -q -x tests/unit/test_cuda.py tests/api tests/e2e/test_server.py
timeout 300 $PY -m bench.run --quick --device cuda --skip-http
