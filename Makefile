# The two README commands: `make serve` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
# CPU build of torch: an unpinned torch resolves to a multi-GB CUDA build.
TORCH_VERSION := 2.13.0
# Keep freed pages: the vectorized derivative code otherwise spends its time in page faults.
export MALLOC_MMAP_THRESHOLD_ ?= 4294967296
export MALLOC_TRIM_THRESHOLD_ ?= 1000000000000

.PHONY: setup setup-dev serve test lint pytest bench bench-quick bench-load bench-contention soak browser nginx clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: $(PY) pyproject.toml
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e .
	touch $@

# The tests' tools, and the [ray] extra for the Ray Serve smoke test (tests/e2e/test_ray_serve.py):
# `make test` installs it, `make serve` (the runtime stamp alone) never does.
$(VENV)/.dev: $(VENV)/.runtime
	$(PY) -m pip install --quiet -e '.[dev,ray]'
	touch $@

# KServe's own Python client (the `kserve` package's InferenceRESTClient) for its test
# (tests/e2e/test_kserve_client.py), in a venv of its own: kserve pins protobuf<7, which
# Ray Serve's grpcio-reflection (the [ray] extra) cannot share. Only that test runs it.
KSERVE_VENV ?= .venv-kserve
KSERVE_VERSION := 0.21.0
$(KSERVE_VENV)/.kserve:
	$(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/python -m pip install --quiet kserve==$(KSERVE_VERSION)
	touch $@

# The benchmark's peers (JAX): the `bench` extra, in its own stamp so `make test` never needs it.
$(VENV)/.bench: $(VENV)/.dev
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $@

setup: $(VENV)/.runtime
setup-dev: $(VENV)/.dev

# OMP_WAIT_POLICY=PASSIVE (unless set): torch's OpenMP threads sleep instead of spinning when
# idle, which keeps latency near its fair share beside a busy neighbour (bench/contention.py).
serve: setup
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(VENV)/bin/hessian-service serve --host $(HOST) --port $(PORT)

# Headless Chromium for the /docs page test (Debian's package; needs root to install).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: the browser test will be skipped (CI installs it)"

# Debian's nginx for the replica test (tests/e2e/test_replicas.py runs deploy/nginx.conf on
# 127.0.0.1; it starts its own nginx, no service). Needs root; apt's lists are refreshed
# only when the install cannot find the package without it.
nginx:
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { [ "$$(id -u)" = 0 ] && \
		{ apt-get install -y -qq nginx >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq nginx >/dev/null; }; }; } || \
		echo "nginx not installed: the replica test will be skipped (CI installs it)"

# Style, types, then the import layering contracts (pyproject.toml [tool.importlinter]) and
# no import circle anywhere (scripts/check_import_cycles.py; lazy and TYPE_CHECKING imports count).
lint: setup-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy hessian_service clients/python/hessian_client bench
	$(VENV)/bin/lint-imports --no-cache
	$(PY) scripts/check_import_cycles.py

pytest: setup-dev browser nginx $(KSERVE_VENV)/.kserve
	$(PY) -m pytest

test: lint pytest

# The whole benchmark (within 15 minutes on 2 cores); bench-quick: the headline rows of the
# peer table alone (within 3 minutes). BENCH_ARGS="--rows pinn" runs the rows named so.
bench: $(VENV)/.bench
	$(PY) -m bench.run $(BENCH_ARGS)

bench-quick: $(VENV)/.bench
	$(PY) -m bench.run --quick $(BENCH_ARGS)

# One mlp_tanh Hessian and one 32-sample digits_cnn Hessian batch, idle and beside bounded
# neighbour processes (spin loop, torch matmuls, JAX jit, torch Hessians), for torch's OpenMP
# defaults vs the service's (bench/contention.py); a few minutes on 2 cores.
bench-contention: $(VENV)/.bench
	$(PY) -m bench.contention $(CONTENTION_ARGS)

# 32 concurrent clients of single-sample requests, dynamic batching on vs off (bench/load.py).
bench-load: setup-dev
	$(PY) -m bench.load $(LOAD_ARGS)

# 32 clients, 10,000 mixed requests (kinds, models, encodings, batches), answers checked, the
# server's RSS sampled every 1,000 (bench/soak.py); e.g. SOAK_ARGS="--requests 40000".
soak: setup-dev
	$(PY) -m bench.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) $(KSERVE_VENV) .pytest_cache .mypy_cache .ruff_cache
