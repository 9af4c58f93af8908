"""The Ray Serve deployment (hessian_service/ray_app.py) on a local Ray, 127.0.0.1 only.

One local Ray node (2 CPUs, no dashboard, 100 MB object store, usage stats off, nothing
downloaded: the replica's runtime_env holds environment variables only), Serve's HTTP proxy
on a free 127.0.0.1 port, and the same application ``serve run deploy/ray/serve_config.yaml``
builds (``build_app`` with that file's ``args``, validated by Serve's own config schema), at
one replica, on the CPU. Then real requests through the proxy with the
project's client, values checked against float64 references computed here:

- quadratic4, f_i(x) = i * x_i^2: the Hessian of output 2 is 4 at [2, 2] and 0 elsewhere,
  and of the sum objective diag(2 * arange(4)) (closed forms);
- digits_cnn, one digit: the float64 Hessian of output 3 against torch.func.hessian of the
  bundled weights (independent of the service's engine), to 1e-10 relative;
- a model that does not exist answers the service's own 404 problem+json through the proxy;
- the config's replica options: autoscaling 1..2 at 2 ongoing requests, 1 CPU, no GPU on a
  cluster without one.

ray missing: skipped here, failed in CI (``make test`` installs the ``[ray]`` extra).
Bounded: ~25 s on an idle 2-core machine (Ray's start and the replica's torch import), every
wait has a deadline; the module's fixture shuts Serve and Ray down.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import yaml
from hessian_client import Client
from safetensors.torch import load_file

from hessian_service.config import BUNDLED_MODELS_DIR
from hessian_service.local_server import LOCALHOST, free_port
from hessian_service.repository import zoo
from tests.device import TEST_DEVICE

pytestmark = [
    pytest.mark.e2e,
    # Ray Serve's own config models use pydantic v1-style Field extras (ray 2.60).
    pytest.mark.filterwarnings(r"ignore::DeprecationWarning:ray\."),
]

READY_SECONDS = 120.0
SERVE_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "ray" / "serve_config.yaml"


def config_args() -> dict[str, Any]:
    """The application's ``args`` in deploy/ray/serve_config.yaml, after Serve's own schema
    (``ServeDeploySchema``, what ``serve run`` / ``serve deploy`` check) accepted the file."""
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    (application,) = config.applications
    assert application.import_path == "hessian_service.ray_app:build_app"
    assert config.http_options.host == LOCALHOST
    return dict(application.args)


def _missing_ray(reason: str) -> None:
    message = f"{reason}; `make test` installs the [ray] extra (pip install -e '.[ray]')"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} -- CI must run the Ray smoke test")
    pytest.skip(message)


@pytest.fixture(scope="module")
def ray_url() -> Iterator[str]:
    """Serve's HTTP proxy URL, the app deployed at one replica and answering /health/ready."""
    try:
        import ray
        from ray import serve
    except ImportError as error:
        _missing_ray(f"ray is not installed ({error})")

    from hessian_service.ray_app import DEPLOYMENT_NAME, build_app

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # read by ray.init: no usage report
    started = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=0 if TEST_DEVICE == "cpu" else None,
        include_dashboard=False,
        object_store_memory=100 * 1024 * 1024,
        _node_ip_address=LOCALHOST,
        log_to_driver=False,
    )
    try:
        port = free_port()
        serve.start(http_options={"host": LOCALHOST, "port": port})
        settings = {"HESSIAN_DEVICE": TEST_DEVICE, "HESSIAN_COMPILE_AFTER": "0"}
        args = {**config_args(), "max_replicas": 1, "settings": settings}
        app = build_app(args)
        serve.run(app, name=DEPLOYMENT_NAME, route_prefix="/", blocking=False)
        url = f"http://{LOCALHOST}:{port}"
        _wait_ready(url, started + READY_SECONDS)
        print(f"ray start + deploy + ready: {time.perf_counter() - started:.1f} s")
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait_ready(url: str, deadline: float) -> None:
    """Poll /health/ready through the proxy until 200 (the replica's lifespan ran)."""
    last = "no answer"
    with httpx.Client(base_url=url, timeout=5.0, trust_env=False) as http:
        while time.perf_counter() < deadline:
            try:
                response = http.get("/health/ready")
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text[:200]}"
            except httpx.HTTPError as error:
                last = repr(error)
            time.sleep(0.5)
    pytest.fail(f"the Ray Serve app was not ready in {READY_SECONDS:.0f} s: {last}")


@pytest.fixture(scope="module")
def client(ray_url: str) -> Iterator[Client]:
    """The project's client on Ray's proxy: no proxy from the environment, no retries (a
    failure must show)."""
    with Client(ray_url, retries=0, trust_env=False, timeout=60.0) as http:
        yield http


@cache
def digits_cnn() -> torch.nn.Module:
    """The bundled digits_cnn, built from the zoo and its weights, in float64."""
    model = zoo.build("digits_cnn")
    model.load_state_dict(load_file(str(BUNDLED_MODELS_DIR / "digits_cnn" / "weights.safetensors")))
    model = model.to(torch.float64).eval()
    model.requires_grad_(False)
    return model


def test_quadratic4_hessians_match_the_closed_form(client: Client) -> None:
    x = np.array([[0.5, -1.0, 2.0, 3.0]], dtype=np.float64)
    one_output = client.hessian("quadratic4", x, output_index=2, precision="float64", as_numpy=True)
    expected = np.zeros((4, 4))
    expected[2, 2] = 4.0  # d2/dx2^2 of 2 * x_2^2
    np.testing.assert_allclose(one_output.reshape(4, 4), expected, rtol=0, atol=1e-12)

    summed = client.hessian(
        "quadratic4", x, objective={"type": "sum"}, precision="float64", as_numpy=True
    )
    np.testing.assert_allclose(
        summed.reshape(4, 4), np.diag(2.0 * np.arange(4)), rtol=0, atol=1e-12
    )


def test_digits_cnn_hessian_matches_torch_func(client: Client) -> None:
    sample = json.loads((BUNDLED_MODELS_DIR / "digits_sample.json").read_text())
    digit = np.asarray(sample["data"], np.float64).reshape(1, 1, 28, 28)
    answer = client.hessian("digits_cnn", digit, output_index=3, precision="float64", as_numpy=True)

    net = digits_cnn()

    def output_3(v: torch.Tensor) -> torch.Tensor:
        return net(v.reshape(1, 1, 28, 28))[0, 3]

    expected = torch.func.hessian(output_3)(torch.from_numpy(digit).reshape(-1)).numpy()
    assert np.abs(expected).max() > 1e-3, "a vacuous reference"
    error = np.abs(answer.reshape(784, 784) - expected).max() / np.abs(expected).max()
    assert error <= 1e-10, f"relative error {error:.2e} through Ray's proxy"


def test_service_errors_pass_through_the_proxy(ray_url: str) -> None:
    with httpx.Client(base_url=ray_url, timeout=30.0, trust_env=False) as http:
        x = {"name": "x", "shape": [4], "datatype": "FP32", "data": [0.0, 1.0, 2.0, 3.0]}
        response = http.post("/hessian", json={"model": "no_such_model", "inputs": [x]})
    assert response.status_code == 404, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["field"] == "model", response.json()


def test_config_replica_options(ray_url: str) -> None:
    from hessian_service.ray_app import ReplicaOptions

    options = ReplicaOptions.from_args(config_args()).deployment_options()
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 2.0,
    }
    assert options["max_ongoing_requests"] == 8
    actor = options["ray_actor_options"]
    assert (actor["num_cpus"], actor["num_gpus"]) == (1.0, 0.0)  # this Ray has no GPU
    assert actor["runtime_env"]["env_vars"]["OMP_WAIT_POLICY"] == "PASSIVE"
    with pytest.raises(ValueError, match="max_replicas"):
        ReplicaOptions.from_args({"max_replicas": 0})
