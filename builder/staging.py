"""Atomic writes into the model repository: build in a temporary folder, rename into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from common.model_repository import MODEL_FILENAME, VERSION, RepositoryError


def ensure_writable(repository: Path) -> Path:
    repo = Path(repository)
    try:
        repo.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=repo, prefix=".write-test-"):
            pass
    except OSError as e:
        raise RepositoryError(f"model repository {repo} is not writable: {e.strerror or e}") from e
    return repo


def staging_dir(repository: Path, prefix: str) -> Path:
    """A hidden scratch folder inside the repository (same filesystem, so renames are atomic)."""
    return Path(tempfile.mkdtemp(prefix=f".{prefix}-", dir=repository))


def variant_layout(root: Path, filename: str = MODEL_FILENAME) -> Path:
    """``root/1/<filename>``: Triton's version folder. Returns the model file's path."""
    version_dir = root / VERSION
    version_dir.mkdir(parents=True, exist_ok=True)
    return version_dir / filename


def install(staged: Path, target: Path, trash: Path) -> None:
    """Move a finished variant folder into place; an older one is moved aside first."""
    try:
        if target.exists():
            trash.mkdir(parents=True, exist_ok=True)
            os.replace(target, trash / f"{target.name}.old")
        os.replace(staged, target)
    except OSError as e:
        raise RepositoryError(f"cannot install {target}: {e.strerror or e}") from e


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
