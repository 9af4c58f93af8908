"""The Kubernetes and KServe manifests (deploy/k8s/, deploy/kserve/), validated offline.

deploy/k8s/: every document of every YAML file, against the Kubernetes API's own schemas in
their strict form (unknown fields rejected), for the oldest and the newest Kubernetes minor
this suite vouches for, by kubernetes-validate: the schemas ship inside its wheel, so
nothing is downloaded at test time. A kind it has no schema for fails the test.

deploy/kserve/: KServe's CRDs are on no registry CI reaches, so the InferenceService and the
ServingRuntime are checked against JSON schemas derived from those CRDs
(tests/unit/kserve_schema.py), whose embedded Kubernetes types (Container, probes,
resources, ...) are kubernetes-validate's strict definitions.

Then what a schema cannot see: the probes hit real routes of the app, the ports agree with
the image, the Service, HPA and PodDisruptionBudget select the Deployment's pods, the GPU
variant differs from the CPU Deployment only where it must, and the InferenceService names
a runtime, format and protocol that the ServingRuntime declares.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

from hessian_service.api.routes import health, v2
from tests.unit import kserve_schema

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = REPO / "deploy" / "k8s"
KSERVE_DIR = REPO / "deploy" / "kserve"
# The oldest Kubernetes minor the manifests must work on, and the newest schemas shipped.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
IMAGE_PORT = 8000  # Dockerfile: EXPOSE 8000, uvicorn --port 8000


def _documents(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(folder.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found.append((str(path.relative_to(REPO)), document))
    return found


K8S_DOCUMENTS = _documents(K8S_DIR)
KSERVE_DOCUMENTS = _documents(KSERVE_DIR)


def _one(documents: list[tuple[str, dict[str, Any]]], kind: str, path: str) -> dict[str, Any]:
    matches = [doc for name, doc in documents if doc["kind"] == kind and name == path]
    assert len(matches) == 1, f"{path}: expected one {kind}, found {len(matches)}"
    return matches[0]


def deployment(path: str = "deploy/k8s/deployment.yaml") -> dict[str, Any]:
    return _one(K8S_DOCUMENTS, "Deployment", path)


def k8s_errors(document: dict[str, Any], version: str) -> str | None:
    """None when ``document`` is valid for Kubernetes ``version`` (strict); else why not."""
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return f"{'.'.join(str(p) for p in error.path)}: {error.message}"
    except kubernetes_validate.SchemaNotFoundError as error:
        return error.message
    return None


# --------------------------------------------------------------------------- schemas


def test_the_manifests_are_all_found() -> None:
    kinds = sorted(doc["kind"] for _, doc in K8S_DOCUMENTS)
    assert kinds == [
        "Deployment",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Service",
    ], kinds
    assert sorted(doc["kind"] for _, doc in KSERVE_DOCUMENTS) == [
        "InferenceService",
        "ServingRuntime",
    ]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    ("path", "document"),
    K8S_DOCUMENTS,
    ids=[f"{path}:{doc['kind']}" for path, doc in K8S_DOCUMENTS],
)
def test_k8s_manifest_is_valid(path: str, document: dict[str, Any], version: str) -> None:
    error = k8s_errors(document, version)
    assert error is None, f"{path} ({document['kind']}) against Kubernetes {version}: {error}"


@pytest.mark.parametrize(
    ("path", "document"),
    KSERVE_DOCUMENTS,
    ids=[f"{path}:{doc['kind']}" for path, doc in KSERVE_DOCUMENTS],
)
def test_kserve_manifest_is_valid(path: str, document: dict[str, Any]) -> None:
    errors = sorted(
        kserve_schema.validator(document["kind"]).iter_errors(document), key=lambda e: e.path
    )
    assert not errors, "\n".join(f"{path}: {list(e.path)}: {e.message}" for e in errors)


def _set(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``document`` with ``value`` at the dotted ``path`` (ints index lists)."""
    broken = copy.deepcopy(document)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    target: Any = broken
    for key in parents:
        target = target[key]
    target[last] = value
    return broken


# Each mutation is a mistake one makes in a manifest; the validator must name it.
K8S_BREAKAGES = [
    ("spec.template.spec.containers.0.readinesProbe", {"httpGet": {"path": "/", "port": 80}}),
    ("spec.template.spec.containers.0.ports.0.containerPort", "8000"),
    ("spec.template.spec.containers.0.resources.limit", {"cpu": "2"}),
    ("spec.template.spec.containers.0.env.1.value", 2),  # an unquoted number
    ("spec.replicas", "two"),
]


@pytest.mark.parametrize(("path", "value"), K8S_BREAKAGES, ids=[p for p, _ in K8S_BREAKAGES])
def test_a_broken_deployment_is_refused(path: str, value: Any) -> None:
    broken = _set(deployment(), path, value)
    error = k8s_errors(broken, K8S_VERSIONS[-1])
    assert error is not None, f"{path} = {value!r} passed validation"


def test_an_unknown_kind_is_refused_not_skipped() -> None:
    error = k8s_errors({"apiVersion": "apps/v1", "kind": "Deploymnt", "metadata": {}}, "1.30")
    assert error is not None and "Deploymnt" in error


KSERVE_BREAKAGES = [
    ("InferenceService", "spec.predictor.model.protocolVersion", "v3"),
    ("InferenceService", "spec.predictor.scaleMetric", "latency"),
    ("InferenceService", "spec.predictor.minReplica", 1),
    ("InferenceService", "spec.predictor.model.modelFormat", {"version": "1"}),
    ("ServingRuntime", "spec.containers.0.ports.0.containerPort", "8000"),
    ("ServingRuntime", "spec.containers.0.readinessProbe.httpGt", {}),
    ("ServingRuntime", "spec.supportedModelFormats.0.autoSelect", "yes"),
]


@pytest.mark.parametrize(
    ("kind", "path", "value"), KSERVE_BREAKAGES, ids=[p for _, p, _ in KSERVE_BREAKAGES]
)
def test_a_broken_kserve_manifest_is_refused(kind: str, path: str, value: Any) -> None:
    document = next(doc for _, doc in KSERVE_DOCUMENTS if doc["kind"] == kind)
    with pytest.raises(jsonschema.ValidationError):
        kserve_schema.validator(kind).validate(_set(document, path, value))


# --------------------------------------------------------------------------- what schemas miss


def _routes(router: Any) -> set[str]:
    return {route.path for route in router.routes}


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    containers = doc["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


@pytest.mark.parametrize("path", ["deploy/k8s/deployment.yaml", "deploy/k8s/gpu/deployment.yaml"])
def test_deployment_probes_hit_the_health_routes(path: str) -> None:
    container = _container(deployment(path))
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": IMAGE_PORT}
    probes = {name: container[name]["httpGet"] for name in ("startupProbe", "readinessProbe")}
    probes["livenessProbe"] = container["livenessProbe"]["httpGet"]
    assert probes["readinessProbe"]["path"] == "/health/ready"
    assert probes["livenessProbe"]["path"] == "/health/live"
    for name, probe in probes.items():
        assert probe["path"] in _routes(health.router), f"{name}: no such route"
        assert probe["port"] == "http"
    # The startup probe allows the torch import and model load before liveness counts.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


@pytest.mark.parametrize("path", ["deploy/k8s/deployment.yaml", "deploy/k8s/gpu/deployment.yaml"])
def test_deployment_resources_and_threads(path: str) -> None:
    container = _container(deployment(path))
    resources = container["resources"]
    assert set(resources) == {"requests", "limits"}
    for key in ("cpu", "memory"):
        assert key in resources["requests"] and key in resources["limits"]
    # torch's intra-op pool matches the CPU limit (else it counts the node's cores).
    assert _env(container)["HESSIAN_TORCH_THREADS"] == str(resources["limits"]["cpu"])
    security = deployment(path)["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001


def test_service_hpa_and_pdb_select_the_deployment() -> None:
    cpu = deployment()
    pod_labels = cpu["spec"]["template"]["metadata"]["labels"]
    assert cpu["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    service = _one(K8S_DOCUMENTS, "Service", "deploy/k8s/service.yaml")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port_names = {port["name"] for port in _container(cpu)["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= port_names

    hpa = _one(K8S_DOCUMENTS, "HorizontalPodAutoscaler", "deploy/k8s/hpa.yaml")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        cpu["apiVersion"],
        "Deployment",
        cpu["metadata"]["name"],
    )
    assert 1 <= hpa["spec"]["minReplicas"] <= cpu["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    # Utilization targets need CPU requests on the pods they average over.
    assert _container(cpu)["resources"]["requests"]["cpu"]

    pdb = _one(K8S_DOCUMENTS, "PodDisruptionBudget", "deploy/k8s/pdb.yaml")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "drains could never proceed"


def test_gpu_deployment_differs_only_in_device() -> None:
    cpu, gpu = deployment(), deployment("deploy/k8s/gpu/deployment.yaml")
    assert gpu["metadata"]["name"] == cpu["metadata"]["name"], "it replaces the CPU Deployment"
    gpu_container = _container(gpu)
    assert gpu_container["image"].endswith(":cuda")
    assert _env(gpu_container)["HESSIAN_DEVICE"] == "cuda"
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    tolerations = gpu["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations

    # Undo exactly those differences: what remains must be the CPU Deployment.
    undone = copy.deepcopy(gpu)
    container = _container(undone)
    container["image"] = _container(cpu)["image"]
    for item in container["env"]:
        if item["name"] == "HESSIAN_DEVICE":
            item["value"] = "cpu"
    del container["resources"]["limits"]["nvidia.com/gpu"]
    del undone["spec"]["template"]["spec"]["tolerations"]
    assert undone == cpu


def test_kserve_runtime_serves_what_the_inference_service_asks() -> None:
    runtime = _one(KSERVE_DOCUMENTS, "ServingRuntime", "deploy/kserve/servingruntime.yaml")
    isvc = _one(KSERVE_DOCUMENTS, "InferenceService", "deploy/kserve/inferenceservice.yaml")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] == "v2"
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    formats = {(f["name"], f.get("version")) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"].get("version")) in formats

    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container", "KServe's required container name"
    assert [port["containerPort"] for port in container["ports"]] == [IMAGE_PORT]
    v2_routes = _routes(v2.router)
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    for probe in ("readinessProbe", "livenessProbe"):
        http = container[probe]["httpGet"]
        assert http["path"] in v2_routes, f"{probe}: no such /v2 route"
        assert http["port"] == IMAGE_PORT
    infer = "/v2/models/{model_name}/infer"
    assert any(re.fullmatch(r"/v2/models/\{\w+\}/infer", path) for path in v2_routes), infer
    assert _env(container)["HESSIAN_TORCH_THREADS"] == container["resources"]["limits"]["cpu"]
    timeout = isvc["spec"]["predictor"]["timeout"]
    assert timeout > 60, "below the service's own deadline (HESSIAN_REQUEST_TIMEOUT_S=60)"
