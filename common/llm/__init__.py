"""Decoder LLMs run through onnxruntime-genai: what the builder, the embedded upstream and the
Triton python-backend model share (sampling parameters, token streaming, the model's tensors).

onnxruntime-genai is imported inside the functions that need it, so importing this package
costs nothing.
"""

from common.llm.errors import ContextLengthError, LlmError, LlmRequestError
from common.llm.generation import Chunk, GenaiModel, stream_text
from common.llm.sampling import SamplingParams

__all__ = [
    "Chunk",
    "ContextLengthError",
    "GenaiModel",
    "LlmError",
    "LlmRequestError",
    "SamplingParams",
    "stream_text",
]
