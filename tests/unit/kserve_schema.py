"""JSON schemas of the two KServe resources in deploy/kserve/, derived from KServe's CRDs.

KServe publishes its CRDs (``serving.kserve.io_inferenceservices.yaml``,
``serving.kserve.io_servingruntimes.yaml``) in its repository and release assets only: no
package registry that CI reaches ships them, and the test suite downloads nothing. So these
schemas restate, by hand, the part of each CRD's ``openAPIV3Schema`` that deploy/kserve/
uses -- the same field names, types, enums, minimums and required lists as KServe's CRDs
(read from KServe's main branch of 2026-08, v0.16+) -- and close every object with
``additionalProperties: false``, as the API server's strict field validation
(``kubectl apply --validate=strict``) rejects unknown fields. Two enums are tighter than the
CRD, which types them as plain strings: ``protocolVersion``/``protocolVersions`` take the
four values of KServe's ``InferenceServiceProtocol`` constants (v1, v2, grpc-v1, grpc-v2).

Where the CRD embeds a Kubernetes type (object metadata, a Container, resources, env,
probes, tolerations, volumes), the schema refers to kubernetes-validate's own strict
definition of it (``K8S_DEFINITIONS``), the same definitions deploy/k8s/ is checked with.
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

# The Kubernetes minor whose strict definitions the embedded types are checked against.
K8S_VERSION = "1.37"
_DEFS_ID = "https://kubernetes.io/api/_definitions.json"

PROTOCOLS = ["v1", "v2", "grpc-v1", "grpc-v2"]


def k8s(name: str) -> dict[str, str]:
    """A reference to one Kubernetes definition, e.g. ``k8s("core.v1.Container")``."""
    prefix = "io.k8s.apimachinery.pkg.apis." if name.startswith("meta.") else "io.k8s.api."
    return {"$ref": f"{_DEFS_ID}#/$defs/{prefix}{name}"}


def _closed(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        schema["required"] = required
    return schema


_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
_NON_NEGATIVE_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_MODEL_FORMAT = _closed({"name": {"type": "string"}, "version": {"type": "string"}}, ["name"])

# spec.predictor.model: the CRD's ModelSpec (a Container's fields plus the model's own).
_MODEL = _closed(
    {
        "modelFormat": _MODEL_FORMAT,
        "protocolVersion": {"type": "string", "enum": PROTOCOLS},
        "runtime": {"type": "string"},
        "runtimeVersion": {"type": "string"},
        "storageUri": {"type": "string"},
        "image": {"type": "string"},
        "args": {"type": "array", "items": {"type": "string"}},
        "env": {"type": "array", "items": k8s("core.v1.EnvVar")},
        "resources": k8s("core.v1.ResourceRequirements"),
        "readinessProbe": k8s("core.v1.Probe"),
        "livenessProbe": k8s("core.v1.Probe"),
    },
    ["modelFormat"],
)

# spec.predictor: the CRD's PredictorSpec (ComponentExtensionSpec and pod fields used here).
_PREDICTOR = _closed(
    {
        "minReplicas": _NON_NEGATIVE_INT32,
        "maxReplicas": _NON_NEGATIVE_INT32,
        "scaleMetric": {"type": "string", "enum": ["cpu", "memory", "concurrency", "rps"]},
        "scaleMetricType": {"type": "string", "enum": ["Utilization", "Value", "AverageValue"]},
        "scaleTarget": _INT32,
        "containerConcurrency": {"type": "integer", "minimum": 0},
        "timeout": {"type": "integer", "minimum": 0},
        "model": _MODEL,
        "serviceAccountName": {"type": "string"},
        "nodeSelector": _STRING_MAP,
        "tolerations": {"type": "array", "items": k8s("core.v1.Toleration")},
        "annotations": _STRING_MAP,
        "labels": _STRING_MAP,
    },
)

INFERENCE_SERVICE: dict[str, Any] = _closed(
    {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"},
        "kind": {"const": "InferenceService"},
        "metadata": k8s("meta.v1.ObjectMeta"),
        "spec": _closed({"predictor": _PREDICTOR}, ["predictor"]),
    },
    ["apiVersion", "kind", "metadata", "spec"],
)

SERVING_RUNTIME: dict[str, Any] = _closed(
    {
        "apiVersion": {"const": "serving.kserve.io/v1alpha1"},
        "kind": {"enum": ["ServingRuntime", "ClusterServingRuntime"]},
        "metadata": k8s("meta.v1.ObjectMeta"),
        "spec": _closed(
            {
                "annotations": _STRING_MAP,
                "labels": _STRING_MAP,
                "supportedModelFormats": {
                    "type": "array",
                    "items": _closed(
                        {
                            "name": {"type": "string"},
                            "version": {"type": "string"},
                            "autoSelect": {"type": "boolean"},
                            "priority": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
                        },
                        ["name"],
                    ),
                },
                "protocolVersions": {
                    "type": "array",
                    "items": {"type": "string", "enum": PROTOCOLS},
                },
                "multiModel": {"type": "boolean"},
                "disabled": {"type": "boolean"},
                "containers": {
                    "type": "array",
                    "minItems": 1,
                    "items": k8s("core.v1.Container"),
                },
                "volumes": {"type": "array", "items": k8s("core.v1.Volume")},
                "nodeSelector": _STRING_MAP,
                "tolerations": {"type": "array", "items": k8s("core.v1.Toleration")},
                "imagePullSecrets": {
                    "type": "array",
                    "items": k8s("core.v1.LocalObjectReference"),
                },
            },
            ["containers"],
        ),
    },
    ["apiVersion", "kind", "metadata", "spec"],
)

SCHEMAS = {"InferenceService": INFERENCE_SERVICE, "ServingRuntime": SERVING_RUNTIME}


@cache
def _registry() -> Registry:
    """kubernetes-validate's strict definitions for ``K8S_VERSION``, under their own $id."""
    folder = (
        files("kubernetes_validate") / "kubernetes-json-schema" / f"v{K8S_VERSION}.0-local-strict"
    )
    definitions = json.loads((folder / "_definitions.json").read_text())
    assert definitions["$id"] == _DEFS_ID, definitions["$id"]
    return Registry().with_resource(_DEFS_ID, Resource.from_contents(definitions))


def validator(kind: str) -> Draft202012Validator:
    """A validator of one KServe kind (``InferenceService`` or ``ServingRuntime``)."""
    schema = SCHEMAS[kind]
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, registry=_registry())
