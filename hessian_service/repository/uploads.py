"""Where uploaded models live on disk: one folder per ``name@version`` under one root.

An upload is written to a staging folder, loaded and probed from there, and renamed to
its final folder only once it loaded; a failed upload leaves nothing behind. With
``HESSIAN_UPLOAD_DIR`` set, the folders persist and are loaded again at start-up; without
it they live in a temporary folder that is removed when the service stops.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import uuid
from pathlib import Path

STAGING_PREFIX = ".staging-"


class UploadStore:
    """The folders of uploaded models under ``root``."""

    def __init__(self, root: Path | None) -> None:
        self.configured = root
        self.root = root or Path(tempfile.gettempdir())  # set by start()
        # One registration at a time reaches the commit step (disk rename + registry swap).
        self.lock = threading.Lock()

    def start(self) -> None:
        """Create the folder (a temporary one when none is configured) and remove what
        an interrupted upload left behind."""
        if self.configured is None:
            self.root = Path(tempfile.mkdtemp(prefix="hessian-uploads-"))
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def stage(self) -> Path:
        """A new, empty staging folder."""
        folder = self.root / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        folder.mkdir()
        return folder

    def folder_for(self, name: str, version: str) -> Path:
        """The final folder of ``name@version`` (both already match the manifest's
        patterns, which allow no path separators)."""
        folder = (self.root / f"{name}@{version}").resolve()
        if folder.parent != self.root.resolve():
            raise ValueError(f"model folder {folder} leaves the upload folder")
        return folder

    def commit(self, staging: Path, name: str, version: str) -> Path:
        """Move a loaded staging folder to its final place, replacing an older one."""
        final = self.folder_for(name, version)
        if final.exists():
            self.discard(final)
        staging.rename(final)
        return final

    def discard(self, folder: Path) -> None:
        """Remove one model folder under ``root`` (never anything outside it)."""
        if folder.resolve().parent == self.root.resolve():
            shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        if self.configured is None:
            shutil.rmtree(self.root, ignore_errors=True)
