"""Model manifests -> loaded, frozen, eval-mode models on their device, by name and version.

A model is a folder holding ``manifest.json`` and one file: safetensors weights for an
architecture from the trusted zoo (``repository.zoo``), a TorchScript archive, or a
``torch.export`` archive (``repository.loaders``). Every file is checked before it is
loaded (``repository.archives``), and every loaded model is probed once
(``repository.capabilities``). A model that fails to load is recorded with its error and
does not stop the others.

Several versions of a model may be loaded side by side. ``name@version`` names one;
``name`` alone names the *latest*: the highest version, comparing runs of digits as
numbers and everything else as text (so ``10`` > ``9`` and ``1.10`` > ``1.9``).
Registration and removal swap in new dictionaries under a lock: a request that already
holds a ``LoadedModel`` keeps computing on it, whatever happens to the registry.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator
from torch import nn

from hessian_service.engine import Curvature, DerivativeKind, EnginePath
from hessian_service.errors import Conflict, InvalidInput, NotFound, NotReady
from hessian_service.names import FILE_PATTERN, NAME_PATTERN, VERSION_PATTERN
from hessian_service.repository.archives import Format
from hessian_service.repository.capabilities import Capabilities, probe
from hessian_service.repository.isolation import IsolationLimits, check_in_child
from hessian_service.repository.loaders import (
    DEFAULT_FILES,
    OneSampleAtATime,
    accepts_batches,
    freeze,
    load_checked_module,
    load_module,
)

logger = logging.getLogger(__name__)
MANIFEST_NAME = "manifest.json"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_MAX_UNPACKED_BYTES = 4 << 30
# Per-sample inputs larger than this could not have their Hessian computed anyway (n^2).
MAX_INPUT_ELEMENTS = 1 << 20


# A dimension is a JSON integer > 0: not true (pydantic's lax int reads it as 1), not "4".
Dimension = Annotated[StrictInt, Field(gt=0)]


class Manifest(BaseModel):
    """What a model folder (or an upload's ``manifest`` part) declares about its model."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=NAME_PATTERN)
    version: str = Field(..., pattern=VERSION_PATTERN)
    description: str = Field("", max_length=2000)
    format: Format = Field("zoo", description="zoo | torchscript | export")
    architecture: str | None = Field(
        None, description="For format 'zoo': a name in hessian_service.repository.zoo."
    )
    input_shape: list[Dimension] = Field(..., min_length=1, max_length=8)
    output_shape: list[Dimension] = Field(
        default_factory=list,
        max_length=8,
        description="Per-sample output shape; checked when given, measured when not.",
    )
    dtype: Literal["float32", "float64"] = Field(
        "float32", description="The dtype the model is loaded in; the other is a copy."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="auto: the service's device (HESSIAN_DEVICE); cuda falls back to the "
        "CPU, with a note, where there is no GPU.",
    )
    file: str | None = Field(
        None,
        pattern=FILE_PATTERN,
        description="The weights or archive in the folder; default weights.safetensors "
        "(zoo), model.pt (torchscript), model.pt2 (export).",
    )
    weights: str | None = Field(None, pattern=FILE_PATTERN, description="Older name of file.")
    training: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _format_fields(self) -> Manifest:
        if math.prod(self.input_shape) > MAX_INPUT_ELEMENTS:
            raise ValueError(
                f"input_shape: at most {MAX_INPUT_ELEMENTS} elements per sample, got "
                f"{math.prod(self.input_shape)}"
            )
        if self.format == "zoo" and not self.architecture:
            raise ValueError(
                "architecture: required for format 'zoo' (a name in hessian_service.repository.zoo)"
            )
        if self.format != "zoo" and self.architecture:
            raise ValueError(f"architecture: only for format 'zoo', not {self.format!r}")
        if self.file and self.weights:
            raise ValueError("give file or weights (its older name), not both")
        return self

    @property
    def file_name(self) -> str:
        return self.file or self.weights or DEFAULT_FILES[self.format]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(eq=False)  # identity: two loads of one file are two models
class LoadedModel:
    """A ready model on its device, its probe report, and a twin in the other dtype made
    on first use."""

    manifest: Manifest
    module: nn.Module
    device: torch.device
    curvature: Curvature
    capabilities: Capabilities | None = None
    source: str = "models_dir"  # models_dir | upload
    folder: Path | None = None
    _twins: dict[torch.dtype, nn.Module] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def for_dtype(self, dtype: torch.dtype) -> nn.Module:
        """The module in ``dtype`` (the manifest's dtype is the loaded one; others are
        cached copies)."""
        if dtype == DTYPES[self.manifest.dtype]:
            return self.module
        name = str(dtype).removeprefix("torch.")
        if self.capabilities is not None and name not in self.capabilities.precisions:
            raise InvalidInput(
                f"precision: model {self.manifest.ref} runs in "
                f"{', '.join(self.capabilities.precisions)} only (see its capability report)",
                field="precision",
            )
        with self._lock:
            if dtype not in self._twins:
                self._twins[dtype] = copy.deepcopy(self.module).to(dtype)
            return self._twins[dtype]

    def method(self, kind: DerivativeKind | str) -> EnginePath:
        """The engine path the probe chose for ``kind`` (``auto`` when not probed)."""
        if self.capabilities is None:
            return EnginePath.AUTO
        return self.capabilities.method_for(DerivativeKind(kind))


@dataclass
class FailedModel:
    """A model folder that could not be loaded, and why."""

    name: str
    error: str
    manifest: Manifest | None = None


def resolve_device(setting: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without CUDA is an error."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("HESSIAN_DEVICE=cuda but torch sees no CUDA device")
    return torch.device(setting)


def _model_device(preference: str, service_device: torch.device) -> torch.device:
    if preference == "auto":
        return service_device
    if preference == "cuda" and not torch.cuda.is_available():
        logger.warning("a manifest prefers cuda, but torch sees no CUDA device: using the CPU")
        return torch.device("cpu")
    return torch.device(preference)


def version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key of a version: digit runs compare as numbers, other runs as text."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.findall(r"\d+|\D+", version)
    )


def load_model(
    folder: Path,
    device: torch.device,
    *,
    source: str = "models_dir",
    max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES,
    isolation: IsolationLimits | None = None,
) -> LoadedModel:
    """Load one model folder: manifest, checked file, eval mode, device, warm-up, probe.

    With ``isolation`` (uploads), an archive is first scanned, loaded and run once in a
    child process under those limits (``repository.isolation``), and loaded here only if that
    succeeded, without scanning it a second time (inflating a large archive twice);
    torch's loads here stay weights-only all the same (``hessian_service.repository.loaders``).
    """
    manifest = Manifest.model_validate_json((folder / MANIFEST_NAME).read_bytes())
    path = (folder / manifest.file_name).resolve()
    if folder.resolve() not in path.parents:
        raise ValueError(f"file {manifest.file_name!r} leaves the model folder")
    if isolation is not None and manifest.format != "zoo":
        check_in_child(
            path,
            manifest.format,
            input_shape=manifest.input_shape,
            dtype=manifest.dtype,
            max_unpacked_bytes=max_unpacked_bytes,
            limits=isolation,
        )
        module = load_checked_module(path, manifest.format, architecture=manifest.architecture)
    else:
        module = load_module(
            path,
            manifest.format,
            architecture=manifest.architecture,
            max_unpacked_bytes=max_unpacked_bytes,
        )
    device = _model_device(manifest.device, device)
    dtype = DTYPES[manifest.dtype]
    module = freeze(module).to(device=device, dtype=dtype)
    sample = torch.zeros(1, *manifest.input_shape, device=device, dtype=dtype)
    with torch.no_grad():
        output = module(sample)
    if not isinstance(output, torch.Tensor) or output.shape[:1] != (1,):
        raise ValueError("the model must return one tensor with a leading batch dimension")
    batch = "any"
    if not accepts_batches(module, sample):
        module, batch = OneSampleAtATime(module), "one"
    measured = list(output.shape[1:]) or [1]
    if manifest.output_shape and measured != manifest.output_shape:
        raise ValueError(
            f"output shape {measured} differs from the manifest's {manifest.output_shape}"
        )
    manifest = manifest.model_copy(update={"output_shape": measured})
    # The probe also pays the first use of the torch.func transforms (about a second).
    capabilities = probe(module, manifest.input_shape, batch=batch, device=device, dtype=dtype)
    return LoadedModel(
        manifest,
        module,
        device,
        capabilities.curvature,
        capabilities=capabilities,
        source=source,
        folder=folder,
    )


class Registry:
    """The loaded models by name and version, and the folders that failed to load."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.versions: dict[str, dict[str, LoadedModel]] = {}
        self.models: dict[str, LoadedModel] = {}  # name -> its latest version
        self.failed: dict[str, FailedModel] = {}
        self.ready = False
        self._lock = threading.Lock()

    def load_dir(
        self,
        models_dir: Path,
        *,
        source: str = "models_dir",
        replace: bool = False,
        max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES,
    ) -> None:
        """Load every folder of ``models_dir`` that holds a manifest."""
        folders = sorted(p for p in models_dir.iterdir() if (p / MANIFEST_NAME).is_file())
        for folder in folders:
            try:
                loaded = load_model(
                    folder, self.device, source=source, max_unpacked_bytes=max_unpacked_bytes
                )
                self.add(loaded, replace=replace)
            except Exception as exc:  # any failure: record it and load the others
                logger.error("model folder %s failed to load: %s", folder, exc)
                self.failed[folder.name] = FailedModel(folder.name, f"{type(exc).__name__}: {exc}")
                continue
            logger.info("loaded model %s on %s", loaded.manifest.ref, loaded.device)
        self.ready = True

    def _publish(self, versions: dict[str, dict[str, LoadedModel]]) -> None:
        latest = {
            name: by_version[max(by_version, key=version_key)]
            for name, by_version in versions.items()
            if by_version
        }
        self.versions, self.models = versions, latest

    def add(self, loaded: LoadedModel, *, replace: bool = False) -> LoadedModel | None:
        """Register ``loaded``; returns the model it replaced. ``Conflict`` when that
        name and version is loaded and ``replace`` is false."""
        name, version = loaded.manifest.name, loaded.manifest.version
        with self._lock:
            current = self.versions.get(name, {})
            previous = current.get(version)
            if previous is not None and not replace:
                raise Conflict(
                    f"model {name}@{version} is already loaded; delete it first or ask "
                    "for replace=true",
                    field="manifest.version",
                )
            versions = dict(self.versions)
            versions[name] = {**current, version: loaded}
            self._publish(versions)
            self.failed.pop(name, None)
            return previous

    def remove(self, ref: str) -> list[LoadedModel]:
        """Unload ``name@version``, or every version of ``name``; returns what was removed.

        Requests that already resolved one of them finish on it: only the registry's
        dictionaries change.
        """
        name, _, version = ref.partition("@")
        with self._lock:
            current = self.versions.get(name)
            if not current or (version and version not in current):
                self._not_found(ref)
            versions = dict(self.versions)
            if version:
                removed = [current[version]]
                rest = {v: m for v, m in current.items() if v != version}
            else:
                removed, rest = [current[v] for v in sorted(current, key=version_key)], {}
            if rest:
                versions[name] = rest
            else:
                del versions[name]
            self._publish(versions)
            return removed

    def entries(self) -> list[LoadedModel]:
        """Every loaded version, by name then version."""
        versions = self.versions
        return [
            versions[name][v]
            for name in sorted(versions)
            for v in sorted(versions[name], key=version_key)
        ]

    def _not_found(self, ref: str) -> NoReturn:
        name, _, version = ref.partition("@")
        if name in self.failed and not version:
            raise NotFound(
                f"model {name!r} failed to load: {self.failed[name].error}", field="model"
            )
        if version and name in self.versions:
            known = ", ".join(sorted(self.versions[name], key=version_key))
            raise NotFound(
                f"model {name!r} has no version {version!r}; loaded versions: {known}",
                field="model",
            )
        known = ", ".join(sorted(self.models)) or "none"
        raise NotFound(f"model {ref!r} is not loaded; loaded models: {known}", field="model")

    def get(self, ref: str) -> LoadedModel:
        """The model ``name`` (its latest version) or ``name@version`` (404 otherwise)."""
        if not self.ready:
            raise NotReady("models are still loading")
        name, _, version = ref.partition("@")
        if not version and name in self.models:
            return self.models[name]
        if version and version in self.versions.get(name, {}):
            return self.versions[name][version]
        self._not_found(ref)
