"""onnxruntime-genai's model builder: one Hugging Face causal-LM folder -> one genai folder.

The builder runs in a subprocess (``python -m onnxruntime_genai.models.builder``), offline
(``HF_HUB_OFFLINE=1``): it loads the whole model in torch and prints progress bars, and a
subprocess gives all that memory back after each precision, keeps its output out of ours
(its last line becomes the error message when it fails) and survives an abort in native code.
Its output is cached under ``$PRECISION_SERVE_CACHE/genai/<key>``, the key a hash of the
folder's files, the precision, the builder options and the onnxruntime-genai version, so an
unchanged variant is not rebuilt; the variant folder in the repository is a hard-linked (else
copied) copy of the cache entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from builder.cache import cache_root
from builder.errors import QuantizationError

log = logging.getLogger(__name__)

BUILD_TIMEOUT_S = 3600


@dataclass(frozen=True)
class GenaiRecipe:
    """What goes into one build: ``precision`` is the builder's ``-p``, ``options`` its
    ``--extra_options`` (key=value)."""

    precision: str
    options: Mapping[str, str] = field(default_factory=dict)

    def arguments(self) -> list[str]:
        extra = [f"{k}={v}" for k, v in sorted(self.options.items())]
        return ["-p", self.precision, "-e", "cpu", *(["--extra_options", *extra] if extra else [])]


def folder_digest(folder: Path) -> str:
    """A hash of every file in a Hugging Face folder (names and contents)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def cache_key(source_digest: str, recipe: GenaiRecipe) -> str:
    import onnxruntime_genai

    blob = json.dumps(
        {
            "source": source_digest,
            "precision": recipe.precision,
            "options": dict(sorted(recipe.options.items())),
            "onnxruntime_genai": onnxruntime_genai.__version__,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def run_builder(hf_folder: Path, out: Path, recipe: GenaiRecipe, scratch: Path) -> None:
    """Run onnxruntime-genai's model builder into ``out``; QuantizationError on failure."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder"]
    cmd += ["-i", str(hf_folder), "-o", str(out), "-c", str(scratch), *recipe.arguments()]
    try:
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, cwd=scratch
        )
    except subprocess.TimeoutExpired as e:
        raise QuantizationError(
            f"onnxruntime-genai's builder ({recipe.precision}) ran over {BUILD_TIMEOUT_S} s"
        ) from e
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        raise QuantizationError(
            f"onnxruntime-genai's builder failed for {recipe.precision} "
            f"(exit {done.returncode}): {lines[-1] if lines else 'no output'}"
        )
    if not (out / "genai_config.json").is_file():
        raise QuantizationError(f"onnxruntime-genai's builder wrote no genai_config.json in {out}")


def cached_build(hf_folder: Path, source_digest: str, recipe: GenaiRecipe) -> tuple[Path, bool]:
    """The genai folder for ``recipe`` (from the cache, else built into it) and whether it was
    a cache hit. Concurrent builds of the same key build once."""
    from filelock import FileLock

    root = cache_root() / "genai"
    target = root / cache_key(source_digest, recipe)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if (target / "genai_config.json").is_file():
            return target, True
        scratch = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            run_builder(hf_folder, scratch / "out", recipe, scratch)
            os.replace(scratch / "out", target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target, False


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def install_copy(genai: Path, dest: Path) -> None:
    """``genai`` into ``dest`` (hard links where the filesystem allows)."""
    shutil.copytree(genai, dest, copy_function=_link_or_copy)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
