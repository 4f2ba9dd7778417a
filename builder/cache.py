"""Where the builder caches work between builds (trained demo weights, calibration ranges).

``$PRECISION_SERVE_CACHE``, default ``~/.cache/precision-serve``. Kept outside the model
repository because Triton treats every folder at a repository's root as a model and refuses to
start on one it cannot load. Entries are keyed by content hashes, so one cache serves every
repository.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("PRECISION_SERVE_CACHE") or Path.home() / ".cache" / "precision-serve"
    return Path(root)


def calibration_cache_dir(model: str) -> Path:
    return cache_root() / "calibration" / model
