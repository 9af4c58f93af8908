"""Registering and removing models at run time: staged on disk, checked, loaded, published.

An upload is written to a staging folder (``repository.uploads``), loaded and probed from
there with the upload-check child process (``repository.isolation``), and published only
once it loaded: the folder is renamed to its final place and the registry swaps in a new
dictionary under the store's lock, so a failed upload leaves nothing behind and a
concurrent request sees the old model or the new one, never half of one. The HTTP routes
(``api.routes.admin``) only parse the form and call these functions in a worker thread.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from hessian_service.errors import Conflict, InvalidInput
from hessian_service.repository.archives import UnsafeModelFile
from hessian_service.repository.isolation import IsolationLimits
from hessian_service.repository.registry import (
    MANIFEST_NAME,
    LoadedModel,
    Manifest,
    Registry,
    load_model,
)
from hessian_service.repository.uploads import UploadStore


@dataclass(frozen=True)
class UploadLimits:
    """What loading one upload may cost: inflated archive bytes, the child's limits."""

    max_unpacked_bytes: int
    isolation: IsolationLimits


def is_loaded(registry: Registry, manifest: Manifest) -> bool:
    """True when ``manifest``'s ``name@version`` is loaded."""
    return manifest.version in registry.versions.get(manifest.name, {})


def _conflict(manifest: Manifest) -> Conflict:
    return Conflict(
        f"model {manifest.ref} is already loaded; DELETE it first or ask for replace=true",
        field="manifest.version",
    )


def check_not_loaded(registry: Registry, manifest: Manifest) -> None:
    """409 when ``name@version`` is loaded (asked before staging, and again at publish)."""
    if is_loaded(registry, manifest):
        raise _conflict(manifest)


def stage(store: UploadStore, manifest: Manifest, file: BinaryIO) -> Path:
    """A staging folder holding ``manifest`` and the uploaded ``file``'s bytes."""
    staging = store.stage()
    (staging / MANIFEST_NAME).write_text(manifest.model_dump_json(exclude_none=True, indent=2))
    with (staging / manifest.file_name).open("wb") as out:
        file.seek(0)
        shutil.copyfileobj(file, out)
    return staging


def register(
    staging: Path,
    registry: Registry,
    store: UploadStore,
    limits: UploadLimits,
    *,
    replace: bool,
) -> LoadedModel:
    """Load and probe the staged model, then publish it; a 422 naming ``file`` when it is
    refused or fails to load, a 409 when its version was loaded meanwhile. Blocking: run
    it in a worker thread."""
    try:
        loaded = load_model(
            staging,
            registry.device,
            source="upload",
            max_unpacked_bytes=limits.max_unpacked_bytes,
            isolation=limits.isolation,
        )
    except UnsafeModelFile as error:
        store.discard(staging)
        raise InvalidInput(str(error), field="file") from None
    except Exception as error:  # whatever the model's own code raised while loading
        store.discard(staging)
        raise InvalidInput(
            f"file: the model failed to load: {type(error).__name__}: {error}", field="file"
        ) from None
    manifest = loaded.manifest
    with store.lock:
        if not replace and is_loaded(registry, manifest):
            store.discard(staging)
            raise _conflict(manifest)
        loaded.folder = store.commit(staging, manifest.name, manifest.version)
        registry.add(loaded, replace=replace)
    return loaded


def unregister(store: UploadStore, registry: Registry, ref: str) -> list[LoadedModel]:
    """Unload ``name`` (every version) or ``name@version``; an upload's folder is deleted,
    a folder of the models directory is the operator's and stays."""
    with store.lock:
        removed = registry.remove(ref)
        for entry in removed:
            if entry.source == "upload" and entry.folder is not None:
                store.discard(entry.folder)
    return removed
