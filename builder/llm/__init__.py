"""Decoder LLMs: onnxruntime-genai builds (fp32 / int8 / int4 on CPU), their quality against fp32
(perplexity, KL, top-1 agreement on text) and speed (TTFT, inter-token latency, tokens/s),
laid out as decoupled python-backend Triton models (docs/llm.md).

onnxruntime-genai, torch and transformers are imported inside the functions that use them.
"""
