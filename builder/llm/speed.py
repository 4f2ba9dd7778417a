"""Speed of decoder-LLM variants on this host: time to first token (the prompt's prefill and
the first token), inter-token latency and decode tokens/s of one greedy sequence, at a stated
prompt length and output length (every token generated: end of sequence is ignored).

The variants are timed round-robin, run by run, so that noise on a shared host hits them alike;
each figure is the median over ``runs`` (after one warm-up run per variant), once per thread
count (1 and the builder's threads).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

from common.llm import GenaiModel, SamplingParams
from common.model_repository import LlmSpeed

PROMPT_TOKENS = 128
OUTPUT_TOKENS = 64
RUNS = 3


def prompt_tokens(model: GenaiModel, text: str, length: int) -> list[int]:
    """The first ``length`` tokens of ``text`` (repeated where it is shorter)."""
    tokens = model.encode(text)
    while len(tokens) < length:
        tokens = tokens + tokens
    return tokens[:length]


def time_once(model: GenaiModel, prompt: list[int], output_tokens: int) -> tuple[float, float]:
    """(TTFT ms, mean inter-token latency ms) of one greedy generation."""
    params = SamplingParams(max_tokens=output_tokens, temperature=0.0)
    started = time.perf_counter()
    generator = model.generator(prompt, params, ignore_eos=True)
    generator.generate_next_token()
    generator.get_next_tokens()
    first = time.perf_counter()
    produced = 1
    while not generator.is_done():
        generator.generate_next_token()
        generator.get_next_tokens()
        produced += 1
    end = time.perf_counter()
    itl = (end - first) / max(1, produced - 1)
    return 1000 * (first - started), 1000 * itl


def measure(
    models: Mapping[str, GenaiModel],
    prompts: Mapping[str, list[int]],
    threads: int,
    output_tokens: int = OUTPUT_TOKENS,
    runs: int = RUNS,
) -> dict[str, LlmSpeed]:
    """Median speed of each variant (``models`` loaded with ``threads``), round-robin."""
    for name, model in models.items():  # warm-up
        time_once(model, prompts[name], min(8, output_tokens))
    ttft: dict[str, list[float]] = {n: [] for n in models}
    itl: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(runs):
        for name, model in models.items():
            first, between = time_once(model, prompts[name], output_tokens)
            ttft[name].append(first)
            itl[name].append(between)
    out = {}
    for name in models:
        median_itl = statistics.median(itl[name])
        out[name] = LlmSpeed(
            threads=threads,
            ttft_ms=round(statistics.median(ttft[name]), 2),
            itl_ms=round(median_itl, 3),
            decode_tok_s=round(1000.0 / median_itl, 2),
            runs=runs,
        )
    return out
