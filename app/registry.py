"""Model manifests -> loaded, frozen, eval-mode models on their device.

A bundled model is a folder holding ``manifest.json`` and safetensors weights for an
architecture from the trusted zoo (``app.zoo``): loading never unpickles anything. A model
that fails to load is recorded with its error and does not stop the others.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError
from safetensors.torch import load_file
from torch import nn

from app import zoo
from app.engine import Curvature, classify, compute_hessian
from app.errors import NotFound, NotReady

logger = logging.getLogger(__name__)
MANIFEST_NAME = "manifest.json"


class Manifest(BaseModel):
    """What a model folder declares about its model."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    version: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
    description: str = ""
    architecture: str
    input_shape: list[PositiveInt] = Field(..., min_length=1)
    output_shape: list[PositiveInt] = Field(..., min_length=1)
    weights: str = "weights.safetensors"
    training: dict[str, Any] | None = None


@dataclass
class LoadedModel:
    """A ready model: float32 on its device, with a float64 twin made on first use."""

    manifest: Manifest
    module: nn.Module
    device: torch.device
    curvature: Curvature
    _twins: dict[torch.dtype, nn.Module] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def for_dtype(self, dtype: torch.dtype) -> nn.Module:
        """The module in ``dtype`` (float32 is the loaded one; others are cached copies)."""
        if dtype == torch.float32:
            return self.module
        with self._lock:
            if dtype not in self._twins:
                self._twins[dtype] = copy.deepcopy(self.module).to(dtype)
            return self._twins[dtype]


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


def load_model(folder: Path, device: torch.device) -> LoadedModel:
    """Load one model folder: manifest, zoo architecture, safetensors weights, warm-up."""
    manifest = Manifest.model_validate_json((folder / MANIFEST_NAME).read_bytes())
    weights_path = (folder / manifest.weights).resolve()
    if folder.resolve() not in weights_path.parents:
        raise ValueError(f"weights path {manifest.weights!r} leaves the model folder")
    module = zoo.build(manifest.architecture)
    module.load_state_dict(load_file(str(weights_path)), strict=True)
    module.eval().requires_grad_(False).to(device)
    with torch.no_grad():
        output = module(torch.zeros(1, *manifest.input_shape, device=device))
    if list(output.shape[1:]) != manifest.output_shape:
        raise ValueError(
            f"output shape {list(output.shape[1:])} differs from the manifest's "
            f"{manifest.output_shape}"
        )
    # The first use of the torch.func transforms costs about a second: pay it at start-up.
    compute_hessian(module, torch.zeros(1, *manifest.input_shape, device=device), output_index=0)
    return LoadedModel(manifest, module, device, classify(module))


class Registry:
    """The loaded models by name, and the folders that failed to load."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.models: dict[str, LoadedModel] = {}
        self.failed: dict[str, FailedModel] = {}
        self.ready = False

    def load_dir(self, models_dir: Path) -> None:
        """Load every folder of ``models_dir`` that holds a manifest."""
        for folder in sorted(p for p in models_dir.iterdir() if (p / MANIFEST_NAME).is_file()):
            try:
                loaded = load_model(folder, self.device)
            except (OSError, ValueError, KeyError, RuntimeError, ValidationError) as exc:
                logger.error("model folder %s failed to load: %s", folder, exc)
                self.failed[folder.name] = FailedModel(folder.name, f"{type(exc).__name__}: {exc}")
                continue
            self.models[loaded.manifest.name] = loaded
            logger.info("loaded model %s on %s", loaded.manifest.name, self.device)
        self.ready = True

    def get(self, name: str) -> LoadedModel:
        """The loaded model called ``name`` (404 naming the known models otherwise)."""
        if not self.ready:
            raise NotReady("models are still loading")
        if name in self.models:
            return self.models[name]
        if name in self.failed:
            raise NotFound(
                f"model {name!r} failed to load: {self.failed[name].error}", field="model"
            )
        known = ", ".join(sorted(self.models)) or "none"
        raise NotFound(f"model {name!r} is not loaded; loaded models: {known}", field="model")
