"""The service as a Ray Serve application: the same FastAPI app, one copy per replica.

    serve run deploy/ray/serve_config.yaml          # or:
    python -m hessian_service.ray_app --port 8000   # a local Ray, 127.0.0.1 only

``build_app(args)`` is a Serve *application builder*: ``serve run`` calls it with the
``args`` of the config file and deploys what it returns. The deployment is
``@serve.ingress`` of ``hessian_service.main.app`` -- the routes, errors, limits and
metrics are the ones ``make serve`` runs -- built inside each replica (Serve's
builder-function form of ``ingress``), so every replica loads the models in its own
lifespan and nothing of torch or FastAPI is pickled from the driver.

Ray is the optional ``[ray]`` extra: nothing else in the package imports this module,
and it imports ray only inside its functions, so the server itself never needs ray.

The replica settings (``ReplicaOptions``): autoscaling between ``min_replicas`` and
``max_replicas`` on Serve's ongoing-requests metric (``target_ongoing_requests`` per
replica), ``max_ongoing_requests`` per replica before Serve queues, ``num_cpus`` per
replica (Ray also sets the replica's ``OMP_NUM_THREADS`` to it, so it is torch's
intra-op thread count) and ``num_gpus``: ``auto`` asks one GPU per replica when the Ray
cluster has GPUs (Ray then sets the replica's ``CUDA_VISIBLE_DEVICES``, and the app's
``HESSIAN_DEVICE=auto`` picks it), else none. ``settings`` are the service's
``HESSIAN_*`` variables for the replicas (with the allocator and OpenMP defaults every
launcher sets: glibc and libgomp read them at process start, so they go into the
replica's ``runtime_env``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hessian_service.compute_env import with_compute_defaults
from hessian_service.local_server import ALLOCATOR_ENV, LOCALHOST

if TYPE_CHECKING:
    from fastapi import FastAPI

DEPLOYMENT_NAME = "hessian"
MAX_REPLICAS_LIMIT = 1024


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    number = int(value)
    if number < minimum or number > MAX_REPLICAS_LIMIT:
        raise ValueError(f"{name}: expected an integer in [{minimum}, {MAX_REPLICAS_LIMIT}]")
    return number


def _positive_float(name: str, value: Any) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError(f"{name}: expected a number > 0, got {value!r}")
    return number


@dataclass(frozen=True)
class ReplicaOptions:
    """How many replicas, of what size: the Serve deployment's options, from ``args``."""

    min_replicas: int = 1
    max_replicas: int = 2
    # Serve's default is 2; the service batches concurrent requests itself
    # (HESSIAN_MAX_BATCH_SIZE), so a replica is busy only beyond a few in flight.
    target_ongoing_requests: float = 2.0
    max_ongoing_requests: int = 8
    num_cpus: float = 1.0
    num_gpus: float | str = "auto"
    settings: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: Mapping[str, Any] | None) -> ReplicaOptions:
        """Parse a config file's ``args`` (every value may be a string); unknown names and
        out-of-range values are errors that name the argument."""
        args = dict(args or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown args {unknown}; expected some of {sorted(known)}")
        options = cls(
            min_replicas=_positive_int("min_replicas", args.get("min_replicas", 1), minimum=0),
            max_replicas=_positive_int("max_replicas", args.get("max_replicas", 2)),
            target_ongoing_requests=_positive_float(
                "target_ongoing_requests", args.get("target_ongoing_requests", 2.0)
            ),
            max_ongoing_requests=_positive_int(
                "max_ongoing_requests", args.get("max_ongoing_requests", 8)
            ),
            num_cpus=_positive_float("num_cpus", args.get("num_cpus", 1.0)),
            num_gpus=args.get("num_gpus", "auto"),
            settings={str(k): str(v) for k, v in dict(args.get("settings") or {}).items()},
        )
        if options.min_replicas > options.max_replicas:
            raise ValueError("min_replicas: expected at most max_replicas")
        if options.num_gpus != "auto" and float(options.num_gpus) < 0:
            raise ValueError("num_gpus: expected 'auto' or a number >= 0")
        bad = sorted(k for k in options.settings if not k.startswith("HESSIAN_"))
        if bad:
            raise ValueError(f"settings: expected HESSIAN_* variables only, got {bad}")
        return options

    def gpus_per_replica(self) -> float:
        """``num_gpus``, with ``auto`` resolved: 1 when the cluster (or, with no Ray
        connected, this machine) has a CUDA GPU, else 0."""
        if self.num_gpus != "auto":
            return float(self.num_gpus)
        import ray

        if ray.is_initialized():
            gpus = ray.cluster_resources().get("GPU", 0)  # type: ignore[no-untyped-call,unused-ignore]
            return 1.0 if gpus >= 1 else 0.0
        import torch

        return 1.0 if torch.cuda.is_available() else 0.0

    def replica_env(self) -> dict[str, str]:
        """The replica processes' environment additions: allocator and OpenMP defaults,
        then the service settings (which win)."""
        return with_compute_defaults({**ALLOCATOR_ENV, **self.settings})

    def deployment_options(self) -> dict[str, Any]:
        """The keyword arguments of ``serve.deployment`` for these options."""
        return {
            "name": DEPLOYMENT_NAME,
            "max_ongoing_requests": self.max_ongoing_requests,
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "initial_replicas": max(self.min_replicas, 1),
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            },
            "ray_actor_options": {
                "num_cpus": self.num_cpus,
                "num_gpus": self.gpus_per_replica(),
                "runtime_env": {"env_vars": self.replica_env()},
            },
        }


def build_asgi_app() -> FastAPI:
    """The service's FastAPI app, imported inside the replica (Serve calls this there)."""
    from hessian_service.main import app

    return app


def build_app(args: Mapping[str, Any] | None = None) -> Any:
    """The Serve application (``serve.Application``) for ``args`` (see ``ReplicaOptions``)."""
    from ray import serve

    options = ReplicaOptions.from_args(args)

    @serve.ingress(build_asgi_app)
    class HessianService:
        """One replica: the ingress wrapper runs the app's lifespan, which loads the models."""

    deployment = serve.deployment(**options.deployment_options())(HessianService)
    return deployment.bind()


def main(argv: list[str] | None = None) -> None:
    """Start a local Ray (127.0.0.1, no dashboard), deploy the app, serve until Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=LOCALHOST)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-replicas", type=int, default=2)
    parser.add_argument("--num-cpus", type=float, default=1.0)
    parsed = parser.parse_args(argv)

    import ray
    from ray import serve

    ray.init(address="local", include_dashboard=False, _node_ip_address=LOCALHOST)
    try:
        serve.start(http_options={"host": parsed.host, "port": parsed.port})
        app = build_app({"max_replicas": parsed.max_replicas, "num_cpus": parsed.num_cpus})
        serve.run(app, name=DEPLOYMENT_NAME, route_prefix="/")
        print(f"serving on http://{parsed.host}:{parsed.port} (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call,unused-ignore]
        ray.shutdown()  # type: ignore[no-untyped-call,unused-ignore]


if __name__ == "__main__":
    main()
