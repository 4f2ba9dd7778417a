"""``hf:FOLDER`` — a local Hugging Face text encoder, exported as a sentence-embedding model, or
a decoder LLM (config.json names a ``*ForCausalLM`` architecture), built by onnxruntime-genai
(builder/llm/, docs/llm.md).

The folder is loaded with transformers, offline (``local_files_only=True``, ``HF_HUB_OFFLINE=1``).
The exported graph takes ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the model
uses them), int64 ``[batch, sequence]`` with both dims dynamic, and returns one output,
``embeddings`` float32 ``[batch, hidden]``: the last hidden state mean-pooled over the attention
mask and L2-normalised (what sentence-transformers does for all-MiniLM-L6-v2).

Calibration and evaluation text is real English: sentences from CPython's bundled documentation
(``pydoc_data.topics``), filtered and de-duplicated deterministically, split into disjoint sets
and tokenized with the folder's tokenizer to a padded length of 128.
"""

from __future__ import annotations

import inspect
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from builder.errors import SourceError
from builder.sources.base import Dataset, LlmModel, LoadedModel, SourceCapabilities, Trainable
from builder.sources.common import export_torch_to_onnx, onnx_io_specs, sanitize_name
from common.model_repository import TensorSpec

SEQUENCE_LENGTH = 128
CALIBRATION_SENTENCES = 256
EVALUATION_SENTENCES = 200
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def doc_sentences() -> list[str]:
    """Deterministic list of unique English sentences from CPython's pydoc topics."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    out: list[str] = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            lines = para.splitlines()
            # Prose paragraphs only: skip code samples, grammar rules and headings.
            if not lines or any(ln.lstrip().startswith((">>>", "...", "::=")) for ln in lines):
                continue
            text = " ".join(ln.strip() for ln in lines)
            for sentence in _SENTENCE_END.split(text):
                s = sentence.strip()
                if not (40 <= len(s) <= 220) or not s[0].isupper() or not s.endswith("."):
                    continue
                letters = sum(c.isalpha() or c == " " for c in s)
                if letters / len(s) < 0.85 or "*" in s or "::" in s or s in seen:
                    continue
                seen.add(s)
                out.append(s)
    return out


def split_sentences(
    n_calibration: int = CALIBRATION_SENTENCES,
    n_evaluation: int = EVALUATION_SENTENCES,
    seed: int = 0,
) -> tuple[list[str], list[str]]:
    """Disjoint (calibration, evaluation) sentence lists, shuffled with a fixed seed."""
    sentences = doc_sentences()
    if len(sentences) < n_calibration + n_evaluation:
        raise SourceError(
            f"only {len(sentences)} sentences in pydoc_data.topics, "
            f"need {n_calibration + n_evaluation}"
        )
    order = np.random.default_rng(seed).permutation(len(sentences))
    picked = [sentences[i] for i in order]
    return picked[:n_calibration], picked[n_calibration : n_calibration + n_evaluation]


def training_sentences(
    n_calibration: int = CALIBRATION_SENTENCES,
    n_evaluation: int = EVALUATION_SENTENCES,
    seed: int = 0,
) -> list[str]:
    """The sentences ``split_sentences`` leaves over (after its calibration and evaluation
    ones, in the same shuffled order): more text for quantization-aware training, disjoint
    from the evaluation sentences."""
    sentences = doc_sentences()
    order = np.random.default_rng(seed).permutation(len(sentences))
    return [sentences[i] for i in order[n_calibration + n_evaluation :]]


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _pooled_encoder(model: Any, input_names: list[str]) -> Any:
    import torch

    class MeanPooledEncoder(torch.nn.Module):
        """Encoder -> mean over attention_mask -> L2 normalise."""

        def __init__(self) -> None:
            super().__init__()
            self.encoder = model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            kwargs = dict(zip(input_names, tensors, strict=True))
            hidden = self.encoder(**kwargs).last_hidden_state
            mask = kwargs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(summed / counts, p=2.0, dim=1)

    return MeanPooledEncoder()


class HfFolderSource:
    """Exports a local Hugging Face text encoder folder to ONNX with real-text data; a causal
    LM folder is handed to the LLM build as it is."""

    capabilities = SourceCapabilities(onnx=True, decoder_llm=True)

    def is_decoder_llm(self, reference: str) -> bool:
        from builder.sources.causal_lm import is_causal_lm, read_config

        folder = Path(reference).expanduser()
        return (folder / "config.json").is_file() and is_causal_lm(read_config(folder))

    def load_llm(self, reference: str, workdir: Path) -> LlmModel:
        from builder.sources.causal_lm import genai_architecture

        folder = Path(reference).expanduser()
        return LlmModel(
            name=sanitize_name(folder.name),
            source=f"hf:{reference}",
            hf_folder=folder,
            architecture=genai_architecture(folder),
            notes=[f"decoder LLM from the Hugging Face folder {folder}"],
        )

    def load(self, reference: str, workdir: Path) -> LoadedModel:
        folder = Path(reference).expanduser()
        return self.load_folder(
            folder, Path(workdir), sanitize_name(folder.name), f"hf:{reference}"
        )

    def load_folder(self, folder: Path, workdir: Path, name: str, source: str) -> LoadedModel:
        if not (folder / "config.json").is_file():
            raise SourceError(f"{folder} is not a Hugging Face model folder (no config.json)")
        _offline()
        try:
            import torch  # noqa: F401  (transformers needs it to build the model)
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise SourceError(f"hf: sources need transformers and torch installed ({e})") from e
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            model = AutoModel.from_pretrained(
                str(folder), local_files_only=True, attn_implementation="eager"
            )
        except Exception as e:
            raise SourceError(f"cannot load Hugging Face model from {folder}: {e}") from e
        model.eval()
        accepted = inspect.signature(model.forward).parameters
        input_names = ["input_ids", "attention_mask"]
        if "token_type_ids" in accepted:
            input_names.append("token_type_ids")

        calibration_text, evaluation_text = split_sentences()
        calibration = self._tokenize(tokenizer, calibration_text, input_names, "pydoc sentences")
        evaluation = self._tokenize(tokenizer, evaluation_text, input_names, "pydoc sentences")
        training = self._tokenize(
            tokenizer, training_sentences(), input_names, "more pydoc sentences (training only)"
        )

        wrapper = _pooled_encoder(model, input_names)
        example = {n: v[:2, :16] for n, v in evaluation.inputs.items()}
        axes = {n: {0: "batch", 1: "sequence"} for n in input_names}
        axes["embeddings"] = {0: "batch"}
        target = workdir / f"{name}.onnx"
        seconds = export_torch_to_onnx(wrapper, example, ["embeddings"], target, axes)
        hidden = int(model.config.hidden_size)
        proto = _record_hidden(target, hidden)
        inputs, outputs, _ = onnx_io_specs(proto)
        inputs = _bounded(inputs, model.config)

        def export(module: Any, path: Path) -> None:
            export_torch_to_onnx(module, example, ["embeddings"], path, axes)
            _record_hidden(path, hidden)

        expected = [TensorSpec("embeddings", "float32", [hidden])]
        if outputs != expected:
            raise SourceError(f"export of {folder} produced outputs {outputs}, expected {expected}")
        return LoadedModel(
            name=name,
            source=source,
            task="embedding",
            fp32_onnx=target,
            inputs=inputs,
            outputs=outputs,
            calibration=calibration,
            evaluation=evaluation,
            transformer=True,
            default_precisions=["fp32", "fp16", "bf16", "int8-dynamic"],
            max_batch_size=32,
            trainable=Trainable(wrapper, input_names, export, "encoder", "attention_mask"),
            training=training,
            notes=[
                f"exported from {folder} (mean pooling + L2 normalisation) to ONNX opset 17 "
                f"in {seconds:.1f} s",
                f"calibration: {len(calibration)} and evaluation: {len(evaluation)} disjoint "
                f"English sentences from CPython's pydoc topics, padded to {SEQUENCE_LENGTH} "
                "tokens; evaluation compares embeddings with FP32 (no labels)",
            ],
        )

    @staticmethod
    def _tokenize(tokenizer: Any, texts: list[str], names: list[str], what: str) -> Dataset:
        enc = tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=SEQUENCE_LENGTH,
            return_tensors="np",
        )
        inputs = {}
        for n in names:
            if n in enc:
                inputs[n] = np.asarray(enc[n], dtype=np.int64)
            else:  # a model that takes token_type_ids from a tokenizer that does not make them
                inputs[n] = np.zeros_like(np.asarray(enc["input_ids"]), dtype=np.int64)
        return Dataset(inputs, None, f"{len(texts)} {what}")


def _record_hidden(path: Path, hidden: int) -> Any:
    """The tracer loses the static hidden size through the pooling; it is known, so record it."""
    import onnx

    proto = onnx.load(str(path))
    out_dims = proto.graph.output[0].type.tensor_type.shape.dim
    if len(out_dims) == 2:
        out_dims[1].dim_value = hidden
        onnx.save(proto, str(path))
    return proto


def _bounded(inputs: list[TensorSpec], config: Any) -> list[TensorSpec]:
    """[sequence] inputs bounded by the model's position embeddings (longer ones cannot run)."""
    longest = getattr(config, "max_position_embeddings", None)
    if not isinstance(longest, int) or longest < 1:
        return inputs
    return [
        replace(s, max_shape=[longest]) if s.shape == [-1] and s.max_shape is None else s
        for s in inputs
    ]
