"""The two installs a user makes, each into a fresh venv, never the checkout.

- The server's wheel (``pip install .``: torch 2.13.0 first, as ``make setup`` does) holds
  the bundled models and their samples; its ``hessian-service serve``, called by
  absolute path from another folder with no ``HESSIAN_MODELS_DIR``, serves the six
  bundled models from the venv's site-packages.
- The client alone (``pip install ./clients/python``) brings neither torch nor FastAPI nor
  uvicorn; the README's numpy block gets numpy arrays with ``as_numpy=True``, and asking
  for a tensor raises ``TorchNotInstalledError`` before any request is sent.

Both wheels are built once from a clean copy of the working tree (no ``build/`` left
over from an earlier build can slip into them). Packages come from the configured
package index through pip; the venvs are deleted when their tests end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hessian_client._arrays import TORCH_MISSING
from prometheus_client.parser import text_string_to_metric_families

from hessian_service.local_server import local_server_process
from tests.e2e.conftest import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TORCH_PIN = "torch==2.13.0"  # the Makefile's TORCH_VERSION: a CPU build, not CUDA's
BUNDLED_MODELS = [
    "digits_cnn",
    "linear4",
    "mlp_relu",
    "mlp_tanh",
    "photo_digits_cnn",
    "quadratic4",
]
# quadratic4 at x = 2 * ones(4), output_index 2: diag(0, 0, 4, 0), as README's curl block.
QUADRATIC4_HESSIAN_2 = [0.0] * 10 + [4.0] + [0.0] * 5
QUICK_START_URL = "http://127.0.0.1:8000"
# What a build copies: everything but caches, venvs, VCS data and earlier build outputs.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
    ".hypothesis", "shared", "tmp",
)  # fmt: skip

# The "client alone" block of README.md and clients/python/README.md.
CLIENT_ONLY_EXAMPLE = """\
import numpy as np
from hessian_client import Client

client = Client("http://127.0.0.1:8000")
x = 2 * np.ones(4, dtype=np.float32)
H = client.hessian("quadratic4", x, output_index=2, as_numpy=True)
print(type(H).__name__, H.dtype, H.shape)  # ndarray float32 (4, 4)
print(H.diagonal().tolist(), np.count_nonzero(H))  # [0.0, 0.0, 4.0, 0.0] 1
image = np.random.default_rng(0).random((1, 28, 28), dtype=np.float32)
print(client.hessian("digits_cnn", image, output_index=2, as_numpy=True).shape)  # (784, 784)
print(client.jacobian("digits_cnn", image, as_numpy=True).shape)  # (10, 784)
client.close()
"""

# Three samples to a .npy file by the bulk path, in the client-only venv.
BULK_WITHOUT_TORCH = """\
import sys

import numpy as np
from hessian_client import Client

with Client(sys.argv[1]) as client:
    x = 2 * np.ones((3, 4), dtype=np.float32)
    path = client.bulk_hessian("quadratic4", x, out=sys.argv[2], output_index=2, progress=False)
H = np.load(path)
print(H.shape, H.dtype)
print(all(np.array_equal(h, np.diag([0.0, 0.0, 4.0, 0.0])) for h in H))
"""

# Every call that returns a tensor, without torch: each must raise before it sends.
TENSOR_WITHOUT_TORCH = """\
import asyncio
import sys

from hessian_client import AsyncClient, Client, HessianServiceError, TorchNotInstalledError

URL, x = sys.argv[1], [2.0, 2.0, 2.0, 2.0]


def raised(call):
    try:
        call()
    except TorchNotInstalledError as error:
        return error
    raise AssertionError("no TorchNotInstalledError")


async def both(kind):
    async with AsyncClient(URL, retries=0) as client:
        await getattr(client, kind)("quadratic4", x, output_index=2)


with Client(URL, retries=0) as client:
    errors = [
        raised(lambda: client.hessian("quadratic4", x, output_index=2)),
        raised(lambda: client.jacobian("quadratic4", x, output_index=2)),
        raised(lambda: asyncio.run(both("hessian"))),
        raised(lambda: asyncio.run(both("jacobian"))),
    ]
for error in errors:
    print(isinstance(error, HessianServiceError), isinstance(error, ImportError), error.name)
    print(error)
"""


class Venv:
    """A fresh virtual environment without pip: this interpreter's pip installs into it
    (``pip --python``), which saves creating pip in every venv."""

    def __init__(self, path: Path) -> None:
        venv.create(path, with_pip=False, symlinks=True)
        self.path = path
        self.python = path / "bin" / "python"

    def install(self, *requirements: str | Path) -> None:
        command = [sys.executable, "-m", "pip", "--python", str(self.python), "install"]
        # --no-compile: torch's thousands of .pyc would cost more than the imports do.
        command += ["--quiet", "--no-compile", *map(str, requirements)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]

    def run(
        self, *args: str | Path, cwd: Path, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.python), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=cwd,
            env=env if env is not None else _clean_env(),
        )


def _clean_env() -> dict[str, str]:
    """This environment without what would point Python or the server back at the
    checkout (PYTHONPATH, PYTHONHOME, HESSIAN_*); PATH stays as it is."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("HESSIAN_")}


def _check_prints(code: str, stdout: str) -> None:
    """Each top-level ``print(...)  # expected`` line printed what its comment says."""
    prints = [line for line in code.splitlines() if line.startswith("print(")]
    printed = stdout.splitlines()
    assert len(printed) == len(prints), stdout
    for line, output in zip(prints, printed, strict=True):
        assert output.strip() == line.split("#", 1)[1].strip(), (line, output)


def _derivative_requests(url: str) -> float:
    """``hessian_requests_total`` on /hessian and /jacobian, every status: what the
    server was sent."""
    text = httpx.get(f"{url}/metrics", trust_env=False, timeout=30).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "hessian_requests_total"
        and sample.labels.get("route") in ("/hessian", "/jacobian")
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean copy of the working tree: what ``pip install .`` in a fresh clone builds."""
    tree = tmp_path_factory.mktemp("source")
    shutil.copytree(ROOT, tree, ignore=NOT_SOURCE, dirs_exist_ok=True)
    return tree


@pytest.fixture(scope="module")
def wheels(source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The server's wheel and the client's, built as pip builds them (isolated)."""
    out = tmp_path_factory.mktemp("wheels")
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out)]
    result = subprocess.run(
        [*command, str(source), str(source / "clients" / "python")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (server,) = out.glob("hessian_service-*.whl")
    (client,) = out.glob("hessian_client-*.whl")
    return {"server": server, "client": client}


@pytest.fixture(scope="module")
def client_venv(
    wheels: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Venv]:
    """A venv holding the client wheel and what it depends on, nothing else."""
    path = tmp_path_factory.mktemp("client-venv")
    environment = Venv(path)
    environment.install(wheels["client"])
    yield environment
    shutil.rmtree(path, ignore_errors=True)


def test_the_wheels_hold_what_they_need(wheels: dict[str, Path]) -> None:
    server = set(zipfile.ZipFile(wheels["server"]).namelist())
    models = "hessian_service/repository/models"
    for name in BUNDLED_MODELS:
        assert {f"{models}/{name}/manifest.json", f"{models}/{name}/weights.safetensors"} <= server
    assert f"{models}/digits_sample.json" in server
    assert f"{models}/photo_digits_sample.json" in server
    client_files = {
        f"hessian_client/{name}"
        for name in ("__init__.py", "client.py", "bulk.py", "_arrays.py", "py.typed")
    }
    assert client_files <= server
    client = set(zipfile.ZipFile(wheels["client"]).namelist())
    packaged = {name.split("/")[0] for name in client if ".dist-info/" not in name}
    assert packaged == {"hessian_client"} and client_files <= client
    metadata = zipfile.ZipFile(wheels["client"]).read(
        next(name for name in client if name.endswith(".dist-info/METADATA"))
    )
    requires = sorted(
        line.split(":", 1)[1].strip()
        for line in metadata.decode().splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    )
    assert requires == ["httpx>=0.27", "numpy>=1.26"]


def test_installed_server_serves_the_bundled_models_from_another_folder(
    wheels: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    environment = Venv(tmp_path / "server-venv")
    try:
        environment.install(TORCH_PIN, wheels["server"])
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            monkeypatch.delenv(name, raising=False)  # the server inherits os.environ
        command = environment.path / "bin" / "hessian-service"  # absolute; PATH unchanged
        launcher = [str(command), "serve"]
        with local_server_process(launcher=launcher, cwd=elsewhere, ready_timeout_s=180) as (
            url,
            process,
        ):
            with httpx.Client(base_url=url, timeout=120, trust_env=False) as http:
                models = http.get("/models").json()["models"]
                assert sorted(model["name"] for model in models) == BUNDLED_MODELS
                body = {
                    "model": "quadratic4",
                    "inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": [2] * 4}],
                    "output_index": 2,
                }
                hessian = http.post("/hessian", json=body).json()["outputs"][0]
            assert (hessian["shape"], hessian["data"]) == ([4, 4], QUADRATIC4_HESSIAN_2)
            # The server runs the venv's interpreter (serve execs sys.executable -m
            # uvicorn in the same process) with the venv's torch mapped in.
            maps = Path(f"/proc/{process.pid}/maps").read_text()
            torch_libraries = {line.split()[-1] for line in maps.splitlines() if "libtorch" in line}
            assert torch_libraries
            assert all(Path(p).is_relative_to(environment.path.resolve()) for p in torch_libraries)
            # The client commands of the same script, by absolute path too.
            listed = subprocess.run(
                [str(command), "models", "--url", url, "--json"],
                capture_output=True,
                text=True,
                timeout=120,
                cwd=elsewhere,
            )
            assert listed.returncode == 0, listed.stderr
            assert sorted(model["name"] for model in json.loads(listed.stdout)) == BUNDLED_MODELS
        assert process.poll() is not None  # stopped
        # The packages that served come from the venv's site-packages, not the checkout.
        where = environment.run(
            "-c",
            "import hessian_service, hessian_client; "
            "print(hessian_service.__file__); print(hessian_client.__file__)",
            cwd=elsewhere,
        )
        assert where.returncode == 0, where.stderr
        for file in where.stdout.split():
            assert Path(file).resolve().is_relative_to(environment.path.resolve() / "lib"), file
    finally:
        shutil.rmtree(environment.path, ignore_errors=True)


def test_client_alone_installs_none_of_the_server(client_venv: Venv, tmp_path: Path) -> None:
    for module in ("torch", "fastapi", "uvicorn"):
        result = client_venv.run("-c", f"import {module}", cwd=tmp_path)
        assert result.returncode == 1
        assert f"ModuleNotFoundError: No module named '{module}'" in result.stderr


def test_client_alone_gets_numpy_arrays(client_venv: Venv, server_url: str, tmp_path: Path) -> None:
    for readme in (ROOT / "README.md", ROOT / "clients" / "python" / "README.md"):
        assert CLIENT_ONLY_EXAMPLE in readme.read_text(), f"{readme} lost the client-alone block"
    code = CLIENT_ONLY_EXAMPLE.replace(QUICK_START_URL, server_url)
    result = client_venv.run("-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    _check_prints(code, result.stdout)
    # The bulk call writes files: numpy only, no torch involved.
    bulk = client_venv.run("-c", BULK_WITHOUT_TORCH, server_url, tmp_path / "h.npy", cwd=tmp_path)
    assert bulk.returncode == 0, bulk.stderr
    assert bulk.stdout.splitlines() == ["(3, 4, 4) float32", "True"]


def test_client_alone_refuses_tensors_before_sending(
    client_venv: Venv, server_url: str, tmp_path: Path
) -> None:
    before = _derivative_requests(server_url)
    result = client_venv.run("-c", TENSOR_WITHOUT_TORCH, server_url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["True True torch", TORCH_MISSING] * 4
    assert "pass as_numpy=True for numpy arrays" in TORCH_MISSING
    assert "pip install 'hessian-client[torch]'" in TORCH_MISSING
    assert _derivative_requests(server_url) == before  # nothing reached the server
    # The count does see this client's requests: the same call with numpy is one more.
    code = (
        "import sys; from hessian_client import Client; "
        "print(Client(sys.argv[1]).hessian('quadratic4', [2.0] * 4, output_index=2, "
        "as_numpy=True).ravel().tolist())"
    )
    numpy_call = client_venv.run("-c", code, server_url, cwd=tmp_path)
    assert numpy_call.stdout.strip() == str(QUADRATIC4_HESSIAN_2), numpy_call.stderr
    assert _derivative_requests(server_url) == before + 1


def test_client_commands_need_only_the_client(
    client_venv: Venv, source: Path, server_url: str, tmp_path: Path
) -> None:
    """The CLI module on the path of the client-only venv: ``models`` works without
    torch, FastAPI or uvicorn; ``serve`` says in one line what is missing."""
    env = {**_clean_env(), "PYTHONPATH": str(source)}  # hessian_service/cli.py, not installed
    listed = client_venv.run(
        "-m", "hessian_service.cli", "models", "--url", server_url, cwd=tmp_path, env=env
    )
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines()[1:]]
    assert set(BUNDLED_MODELS) <= set(names)
    serve = client_venv.run("-m", "hessian_service.cli", "serve", cwd=tmp_path, env=env)
    assert serve.returncode == 1
    (line,) = serve.stderr.splitlines()
    assert line.startswith("hessian-service serve: uvicorn, fastapi, torch not installed in ")
    assert line.endswith("not only hessian-client")
