"""Atomic file writes: readers (the gateway, Triton, a second builder) never see half a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from common.model_repository.errors import RepositoryError


def atomic_write_bytes(target: Path, data: bytes) -> None:
    """Write through a temporary sibling, then rename over ``target``."""
    target = Path(target)
    tmp: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
        tmp = None
    except OSError as e:
        raise RepositoryError(f"cannot write {target}: {e.strerror or e}") from e
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def atomic_write_text(target: Path, text: str) -> None:
    atomic_write_bytes(target, text.encode())
