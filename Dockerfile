# hessian-service: exact input Jacobians/Hessians of neural networks over HTTP.
#
# CPU image (default):
#   docker build -t hessian-service:cpu .
# CUDA image (torch wheels bundle the CUDA runtime; the host needs the NVIDIA
# driver and container toolkit):
#   docker build --build-arg TORCH_VARIANT=cu128 -t hessian-service:cuda .
# A mirror or another wheel index can replace the whole URL with
#   --build-arg TORCH_INDEX_URL=<index url>

ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------------------
# builder: a virtualenv holding torch and the project (non-editable install)
# ---------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS builder

# Keep TORCH_VERSION in step with the torch pin used by CI.
ARG TORCH_VERSION=2.13.0
# Wheel variant on the torch index: cpu, cu126, cu128, ...
ARG TORCH_VARIANT=cpu
# When set, used as-is instead of the index derived from TORCH_VARIANT.
ARG TORCH_INDEX_URL=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# torch first, in its own layer, from the chosen index: it is by far the
# largest dependency and changes far less often than the application.
RUN python -m venv "$VIRTUAL_ENV" \
 && index_url="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/${TORCH_VARIANT}}" \
 && pip install --no-cache-dir --index-url "$index_url" "torch==${TORCH_VERSION}"

WORKDIR /src
# README* is optional: the glob lets the build go on while there is none.
COPY pyproject.toml README* ./
COPY hessian_service/ ./hessian_service/
# The Python client installs with the service (the `hessian-service` command uses it).
COPY clients/python/hessian_client/ ./clients/python/hessian_client/
# The torch installed above already satisfies the project's torch range, so
# pip keeps it; the constraint makes sure no resolver step swaps it out.
RUN echo "torch==${TORCH_VERSION}" > /tmp/torch-constraint.txt \
 && pip install --no-cache-dir --constraint /tmp/torch-constraint.txt . \
 && rm /tmp/torch-constraint.txt

# ---------------------------------------------------------------------------
# runtime: the virtualenv, the bundled models and an unprivileged user
# ---------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS runtime

LABEL org.opencontainers.image.title="hessian-service" \
      org.opencontainers.image.description="Exact Jacobians and Hessians of neural-network outputs with respect to their inputs, over HTTP." \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 hessian \
 && useradd --system --no-log-init --uid 10001 --gid hessian \
        --create-home --home-dir /home/hessian --shell /usr/sbin/nologin hessian

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HESSIAN_MODELS_DIR=/app/models

# glibc allocator: keep large tensor buffers on the heap instead of a fresh
# mmap/munmap pair per call, and never trim the heap back; measured to make
# the vectorized derivative code 2-10x faster.
ENV MALLOC_MMAP_THRESHOLD_=4294967296 \
    MALLOC_TRIM_THRESHOLD_=1000000000000

# torch's OpenMP threads sleep when idle instead of spinning: beside a busy neighbour on
# the host, spinning threads stall each parallel region (bench/contention.py). libgomp
# reads it when torch loads; `docker run -e OMP_WAIT_POLICY=ACTIVE` overrides it.
ENV OMP_WAIT_POLICY=PASSIVE

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
COPY hessian_service/repository/models/ /app/models/
# The uploads folder (HESSIAN_UPLOAD_DIR in docker-compose.yml), owned by the service's user:
# Docker gives an empty named volume mounted here this folder's owner, so uploads can be written.
RUN install -d -o 10001 -g 10001 /app/uploads

# Numeric, so that runtimes enforcing runAsNonRoot can check it.
USER 10001:10001

EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=4); sys.exit(0 if r.status == 200 else 1)"]

CMD ["uvicorn", "hessian_service.main:app", "--host", "0.0.0.0", "--port", "8000"]
